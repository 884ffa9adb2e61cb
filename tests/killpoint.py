"""``mlops-tune`` killed (SIGKILL, by itself) at one point of its code, to leave exactly the state
a kill at that instant leaves; for the tests of what the next run recovers.

    python -m tests.killpoint mlops_tune.records.registry:set_champion -- model=knn ...
    python -m tests.killpoint mlops_tune.runners.inprocess:InProcessRunner.drain \\
        hang=mlops_tune.trial:write_model -- ...   # the model's files never written

``MODULE:ATTR`` is replaced by a function that kills the process when called; ``hang=MODULE:ATTR``
by one that never returns (a write the kill interrupts).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any


def _replace(spec: str, function: Callable[..., Any]) -> None:
    module, _, attr = spec.partition(":")
    owner: Any = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    assert hasattr(owner, name), spec
    setattr(owner, name, function)


def _kill(*_args: Any, **_kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hang(*_args: Any, **_kwargs: Any) -> None:
    threading.Event().wait()


def main() -> None:
    split = sys.argv.index("--")
    for point in sys.argv[1:split]:
        _replace(point.removeprefix("hang="), _hang if point.startswith("hang=") else _kill)
    sys.argv = ["mlops-tune", *sys.argv[split + 1:]]
    from mlops_tune.tune import main as tune

    tune()


if __name__ == "__main__":
    main()
