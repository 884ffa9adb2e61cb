"""``mlops-train``: train and evaluate ONE model from the Hydra config, tracked in MLflow.

Examples::

    mlops-train                                   # base ANN on digits
    mlops-train model=knn data=breast_cancer
    mlops-train data=csv data.path=iris.csv data.target=species
    mlops-train --config-path outputs/best --config-name best_config   # a study's best trial
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from mlops_tune.cli import hydra_main, record_job
from mlops_tune.errors import EXIT_OK

PROG = "mlops-train"


def train(cfg: Any) -> int:
    """The ``mlops-train`` task: validate, load the data, run one tracked trial, print a summary."""
    from mlops_tune import tracking
    from mlops_tune.config import to_plain, validate_train
    from mlops_tune.data import load_splits
    from mlops_tune.trial import run_trial

    plain = to_plain(cfg)
    validate_train(plain)
    splits = load_splits(plain["data"], plain["seed"])
    experiment_id = tracking.connect(plain["tracking"]["uri"], plain["tracking"]["experiment"])
    model, data = plain["model"]["name"], plain["data"]["name"]
    if plain.get("trial"):  # a study's trial in its own process (runner=mlflow|docker)
        return _study_trial(plain, experiment_id, splits)
    outcome = run_trial(plain, experiment_id=experiment_id, splits=splits)
    print(
        f"{PROG}: {model} on {data}: val_accuracy={outcome.val_accuracy:.4f} "
        f"test_accuracy={outcome.test_accuracy:.4f} ({outcome.epochs} epochs, "
        f"fit {outcome.fit_seconds:.1f} s, {outcome.n_params:,} params)\n"
        f"  MLflow run {outcome.run_id} in experiment '{plain['tracking']['experiment']}' at "
        f"{tracking.redact(plain['tracking']['uri'])}",
        flush=True,
    )
    return EXIT_OK


def _study_trial(plain: dict[str, Any], experiment_id: str, splits: Any) -> int:
    """One trial of a study: report epochs to its Optuna trial; its MLflow run tells the outcome."""
    from optuna import TrialPruned

    from mlops_tune.runners.mlflow import trial_process_link
    from mlops_tune.trial import run_trial

    reporter, should_log_model = trial_process_link(plain["trial"])
    tags = {}
    if os.environ.get("MLOPS_TUNE_IMAGE_FAMILY"):  # set in the trial images (docker/*.Dockerfile)
        tags = {"mlops_tune.image": os.environ["MLOPS_TUNE_IMAGE_FAMILY"], "mlops_tune.uid": str(os.getuid()),
                **_container_limits()}
    try:
        outcome = run_trial(plain, experiment_id=experiment_id, splits=splits, reporter=reporter,
                            evaluate_test=False, should_log_model=should_log_model, tags=tags)
    except TrialPruned as exc:
        print(f"{PROG}: trial pruned: {exc}", flush=True)
        return EXIT_OK
    print(f"{PROG}: trial val_accuracy={outcome.val_accuracy:.4f}", flush=True)
    return EXIT_OK


def _container_limits() -> dict[str, str]:
    """The memory and CPU limits this process runs under, as run tags (cgroup v2 format:
    bytes or ``max``; ``QUOTA PERIOD`` in microseconds)."""

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
    return {tag: value for tag, value in (("mlops_tune.memory_limit", memory), ("mlops_tune.cpu_quota", cpu))
            if value}


def _job(cfg: Any) -> int:
    return record_job(train, cfg, PROG)


def main() -> None:
    hydra_main("train", _job, PROG)


if __name__ == "__main__":
    main()
