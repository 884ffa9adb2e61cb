"""A worker in an MLflow Project run: ``python -m mlops_tune.worker FOLDER`` (the ``worker``
entry point of the project a study with ``runner=mlflow`` or ``runner=docker`` generates, see
:mod:`mlops_tune.workers.projects`).

It runs the worker loop (:func:`mlops_tune.workers.loop.run_worker`), in a local process or
inside the model family's container, on the study ``FOLDER`` names: ``config.yaml`` (the
study's checked config; trials run in this process; the Optuna storage is the study's, or
``grpc://`` for the storage proxy it serves to containers; the MLflow server comes from
``MLFLOW_TRACKING_URI``) and its assignment (the study's parent run, this worker's own run and
how many trials it runs): ``assignment.yaml`` in ``FOLDER`` (runner=mlflow), or, in a container,
asked of the study once the model's framework and the stores' libraries are imported
(:mod:`mlops_tune.workers.handover`). Exit codes are those of ``mlops-tune``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlops_tune.workers import ASSIGNMENT_FILE, CONFIG_FILE

if TYPE_CHECKING:
    from mlops_tune.data import Splits

PROG = "mlops-tune worker"


def serve(folder: Path) -> int:
    """Join the study and run trials until the budget, the gate or this worker's trial count ends it."""
    import yaml
    from omegaconf import OmegaConf

    from mlops_tune.config import load_tune
    from mlops_tune.runtime.errors import EXIT_CRASH
    from mlops_tune.runtime.logs import quiet_libraries, set_verbose
    from mlops_tune.workers import handover
    from mlops_tune.workers.loop import Assignment, run_worker
    from mlops_tune.workers.plan import Plan

    # MLflow's variable names this worker's own run (the study made it): trial runs are new runs
    worker_run = os.environ.pop("MLFLOW_RUN_ID", "")
    # the model's section is checked by Plan.check below, once assigned: a container starts before
    # the study has checked it, and a study that finds it wrong says so and assigns no one
    cfg = load_tune(OmegaConf.load(folder / CONFIG_FILE), model=False)  # ${oc.env:MLFLOW_TRACKING_URI}
    set_verbose(bool(cfg.get("verbose")))
    quiet_libraries()
    splits = None
    if os.environ.get(handover.ADDRESS_ENV):  # a container, started while the study checks
        splits = _preload(cfg)
        try:
            fields = handover.ask(folder.name)
        except (OSError, EOFError):  # the study stopped before assigning it (or says why it could not)
            return EXIT_CRASH
        cfg["study"]["storage"] = fields.pop("storage")  # the study's storage proxy
    else:
        fields = yaml.safe_load((folder / ASSIGNMENT_FILE).read_text())
    fields["tags"] = {**fields.get("tags", {}), **container_tags()}
    assignment = Assignment(**fields)
    print(f"{PROG}: {folder.name} (run {worker_run or assignment.owner}) joins study '{assignment.name}'",
          flush=True)
    run_worker(Plan.check(cfg, splits=splits), assignment)
    return 0


def _preload(cfg: Mapping[str, Any]) -> Splits | None:
    """What the worker's trials and stores need, imported, and its data loaded, before it asks for
    its assignment (the seconds a container spends here overlap the study's own start-up). Returns
    the data's splits, or None when they do not load: the study's own checks say why (exit 2) and
    stop this container, or the worker's checks do once it is assigned."""
    import warnings

    import mlflow  # noqa: F401
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import GrpcStorageProxy

    from mlops_tune.data import load_splits
    from mlops_tune.families import settle_imports

    # the client imports gRPC and its protocol when it first makes a channel (a channel connects
    # only when called: this one, made and closed, never does)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        GrpcStorageProxy(host="127.0.0.1", port=9).close()
    settle_imports(str(cfg["model"]["family"]))
    try:
        return load_splits(cfg["data"], int(cfg["seed"]))
    except Exception:  # reported by whichever check runs next, with its one line
        return None


def container_tags() -> dict[str, str]:
    """In a trial image (``MLOPS_TUNE_IMAGE_FAMILY`` set by the Dockerfile): run tags saying
    which image, which user, the memory and CPU limits the trial ran under (cgroup v2
    format: bytes or ``max``; ``QUOTA PERIOD`` in microseconds) and, when set, the threads of its
    native pools (``OMP_NUM_THREADS``: see :func:`mlops_tune.runtime.threads.limit_to_quota`).
    Elsewhere: none."""
    family = os.environ.get("MLOPS_TUNE_IMAGE_FAMILY")
    if not family:
        return {}

    def read(*paths: str) -> str | None:
        for path in paths:
            with contextlib.suppress(OSError):
                return Path(path).read_text().strip()
        return None

    from mlops_tune.runtime.threads import CFS_PERIOD, CFS_QUOTA, CPU_MAX

    memory = read("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
    cpu = read(CPU_MAX)
    if cpu is None:  # cgroup v1: quota and period in two files
        quota, period = read(CFS_QUOTA), read(CFS_PERIOD)
        cpu = f"{'max' if quota == '-1' else quota} {period}" if quota and period else None
    tags = {"mlops_tune.image": family, "mlops_tune.uid": str(os.getuid())}
    tags.update({tag: value for tag, value in (("mlops_tune.memory_limit", memory), ("mlops_tune.cpu_quota", cpu),
                                               ("mlops_tune.threads", os.environ.get("OMP_NUM_THREADS")))
                 if value})
    return tags


def main(argv: list[str] | None = None) -> None:
    from mlops_tune.runtime import exits, faults, heap, secrets, threads  # none of them loads numpy
    from mlops_tune.runtime.errors import EXIT_USAGE
    from mlops_tune.workers import handover

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / CONFIG_FILE).is_file() or not (
            (Path(args[0]) / ASSIGNMENT_FILE).is_file() or os.environ.get(handover.ADDRESS_ENV)):
        print(f"usage: python -m mlops_tune.worker FOLDER (a folder with {CONFIG_FILE} and {ASSIGNMENT_FILE}, "
              f"or with {CONFIG_FILE} and {handover.ADDRESS_ENV} set: written and set by a study with "
              "runner=mlflow or runner=docker)", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    threads.limit_to_quota(tensorflow=True)  # a container of fewer CPUs than the cores; one trial at a time
    heap.defer()  # until the first trial: see mlops_tune.runtime.heap
    faults.install_signal_handlers(PROG)
    faults.quiet_background_faults()
    secrets.guard_streams()
    sys.exit(exits.run_mapped(lambda: serve(Path(args[0])), PROG))


if __name__ == "__main__":
    main()
