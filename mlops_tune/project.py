"""Entry point of the ``MLproject``: ``python -m mlops_tune.project {train|tune} "<overrides>"``.

MLflow passes each project parameter as one quoted word; the overrides string is split
like a shell would (``"model=knn data=wine"`` -> two overrides) and handed to the command.
"""

from __future__ import annotations

import shlex
import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("train", "tune"):
        print("usage: python -m mlops_tune.project {train|tune} [OVERRIDES]", file=sys.stderr)
        sys.exit(2)
    command, rest = args[0], [part for arg in args[1:] for part in shlex.split(arg)]
    sys.argv = [f"mlops-{command}", *rest]
    if command == "train":
        from mlops_tune.train import main as run
    else:
        from mlops_tune.tune import main as run
    run()


if __name__ == "__main__":
    main()
