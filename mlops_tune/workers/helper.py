"""The entry of a study's helper process (``mlops_tune.workers.local``): what the spawned
interpreter runs. Only the standard library at import, so that the garbage collector is off
(``mlops_tune.runtime.heap``) before the heavy imports start."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any

PROG = "mlops-tune worker"


def serve(cfg: dict[str, Any], index: int, n_jobs: int, queue: Any, env: Mapping[str, str],
          outputs: list[Any] | None = None) -> None:
    """A helper process: the worker loop on the study its queue names (exit codes as ``mlops-tune``).
    ``outputs``: the pipes its stdout and stderr go to (the study prints their lines whole)."""
    if outputs:
        for fd, pipe in zip((1, 2), outputs, strict=True):
            os.dup2(pipe.fileno(), fd)  # C code's writes too (a library writing to the fds)
            pipe.close()
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(line_buffering=True)  # a pipe: Python would buffer whole blocks
    # not MLFLOW_RUN_ID (under `mlflow run`: the study's own run, which a helper must not resume)
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ["MLOPS_TUNE_LIVE"] = "0"
    for key, value in env.items():
        os.environ.setdefault(key, value)
    from mlops_tune.runtime import exits, faults, heap, secrets

    heap.defer()  # until the first trial: see mlops_tune.runtime.heap
    faults.install_signal_handlers(f"{PROG} {index}")
    faults.quiet_background_faults()
    secrets.guard_streams()
    _stop_with_parent()
    sys.exit(exits.run_mapped(lambda: _serve(cfg, n_jobs, queue), f"{PROG} {index}"))


def _serve(cfg: dict[str, Any], n_jobs: int, queue: Any) -> int:
    from mlops_tune.families import get_family
    from mlops_tune.records import tracking
    from mlops_tune.runtime.logs import quiet_libraries, set_verbose
    from mlops_tune.workers.loop import run_worker
    from mlops_tune.workers.plan import Plan

    set_verbose(bool(cfg.get("verbose")))
    quiet_libraries()
    # imports first, while the study checks the config and loads the data (this helper's
    # critical path is CPU: the framework and MLflow's store take most of it)
    get_family(cfg["model"]["family"]).preload()
    tracking.preload(str(cfg["tracking"]["uri"]))
    plan = Plan.check(cfg, n_jobs=n_jobs, splits=queue.get())
    run_worker(plan, queue.get())
    return 0


def _stop_with_parent() -> None:
    """SIGTERM to this process when the study's process is gone (its sentinel closes)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="mlops-tune-parent-watch", daemon=True).start()
