"""The trial's own process: ``python -m mlops_tune.worker TRIAL_DIR`` (MLproject entry point ``trial``).

With ``runner=mlflow`` or ``runner=docker`` the study submits each trial as an MLflow
Project run (``mlops_tune.runners.project``); this module is what runs on the other side,
in a fresh process or inside the family's container. ``TRIAL_DIR`` holds two files the
study wrote:

* ``config.yaml``: the trial's own config (model, data, seed, tracking), the same YAML
  ``mlops-train --config-path`` reproduces the trial from;
* ``link.yaml``: how to reach the study: its Optuna storage (a URL, or ``grpc://`` for the
  study's storage proxy), the study name, the trial number, the pruner, and the validation
  accuracy above which the model is worth logging.

The trial reports every epoch to its Optuna trial, so the study's pruner decides here as it
does in-process; its outcome goes to the MLflow run the study created (``MLFLOW_RUN_ID``),
where the study reads it back. Exit codes are those of ``mlops-train``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlops_tune.trial import TRIAL_CONFIG_FILE, TRIAL_LINK_FILE

PROG = "mlops-tune trial"


def run(folder: Path) -> int:
    """Run the trial described in ``folder``; its MLflow run records the outcome."""
    import yaml
    from omegaconf import OmegaConf
    from optuna import TrialPruned

    from mlops_tune import faults, tracking
    from mlops_tune.config import load_train
    from mlops_tune.data import load_splits
    from mlops_tune.errors import EXIT_OK
    from mlops_tune.trial import run_trial

    plain = load_train(OmegaConf.load(folder / TRIAL_CONFIG_FILE))  # ${oc.env:MLFLOW_TRACKING_URI} in a container
    link = yaml.safe_load((folder / TRIAL_LINK_FILE).read_text())
    splits = load_splits(plain["data"], plain["seed"])
    uri = plain["tracking"]["uri"]
    experiment_id = tracking.connect(uri, plain["tracking"]["experiment"])
    with faults.classified(tracking_uri=uri, storage_url=str(link["storage"])):
        reporter, should_log_model = study_link(link)
        try:
            outcome = run_trial(plain, experiment_id=experiment_id, splits=splits, reporter=reporter,
                                evaluate_test=False, should_log_model=should_log_model, tags=container_tags())
        except TrialPruned as exc:
            print(f"{PROG}: pruned: {exc}", flush=True)
            return EXIT_OK
    print(f"{PROG}: val_accuracy={outcome.val_accuracy:.4f}", flush=True)
    return EXIT_OK


def study_link(link: Mapping[str, Any]) -> tuple[Any, Callable[[float], bool]]:
    """The Optuna reporter for the study's trial, and when to log the model."""
    import optuna

    from mlops_tune.optuna_setup import make_pruner, open_storage
    from mlops_tune.trial import OptunaReporter

    storage = optuna.storages.get_storage(open_storage(str(link["storage"])))
    study = optuna.load_study(study_name=str(link["study"]), storage=storage,
                              pruner=make_pruner(link.get("pruner", "median")))
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(link["trial"]))
    reporter = OptunaReporter(optuna.trial.Trial(study, trial_id))
    above = float(link.get("log_model_above", -math.inf))
    return reporter, lambda val_accuracy: val_accuracy > above


def container_tags() -> dict[str, str]:
    """In a trial image (``MLOPS_TUNE_IMAGE_FAMILY`` set by the Dockerfile): run tags saying
    which image, which user, and the memory and CPU limits the trial ran under (cgroup v2
    format: bytes or ``max``; ``QUOTA PERIOD`` in microseconds). Elsewhere: none."""
    family = os.environ.get("MLOPS_TUNE_IMAGE_FAMILY")
    if not family:
        return {}

    def read(*paths: str) -> str | None:
        for path in paths:
            with contextlib.suppress(OSError):
                return Path(path).read_text().strip()
        return None

    memory = read("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
    cpu = read("/sys/fs/cgroup/cpu.max")
    if cpu is None:  # cgroup v1: quota and period in two files
        quota, period = read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        cpu = f"{'max' if quota == '-1' else quota} {period}" if quota and period else None
    tags = {"mlops_tune.image": family, "mlops_tune.uid": str(os.getuid())}
    tags.update({tag: value for tag, value in (("mlops_tune.memory_limit", memory), ("mlops_tune.cpu_quota", cpu))
                 if value})
    return tags


def main(argv: list[str] | None = None) -> None:
    from mlops_tune import faults, secrets
    from mlops_tune.cli import run_task
    from mlops_tune.errors import EXIT_USAGE

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / TRIAL_LINK_FILE).is_file():
        print(f"usage: python -m mlops_tune.worker TRIAL_DIR (a folder with {TRIAL_CONFIG_FILE} and {TRIAL_LINK_FILE}, "
              "written by a study with runner=mlflow or runner=docker)", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    faults.install_signal_handlers()
    faults.quiet_background_faults()
    secrets.guard_streams()
    sys.exit(run_task(lambda _: run(Path(args[0])), None, PROG))


if __name__ == "__main__":
    main()
