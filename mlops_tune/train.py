"""``mlops-train``: train and evaluate ONE model from the Hydra config, tracked in MLflow.

Examples::

    mlops-train                                   # base ANN on digits
    mlops-train model=knn data=breast_cancer
    mlops-train data=csv data.path=iris.csv data.target=species
    mlops-train --config-path outputs/best --config-name best_config   # a study's best trial
"""

from __future__ import annotations

from typing import Any

from mlops_tune.cli import hydra_main, record_job
from mlops_tune.errors import EXIT_OK

PROG = "mlops-train"


def train(cfg: Any) -> int:
    """The ``mlops-train`` task: validate, load the data, run one tracked trial, print a summary."""
    from mlops_tune import faults, tracking
    from mlops_tune.config import to_plain, validate_train
    from mlops_tune.data import load_splits
    from mlops_tune.trial import run_trial

    plain = to_plain(cfg)
    validate_train(plain)
    splits = load_splits(plain["data"], plain["seed"])
    uri = plain["tracking"]["uri"]
    experiment_id = tracking.connect(uri, plain["tracking"]["experiment"])
    model, data = plain["model"]["name"], plain["data"]["name"]
    storage = str((plain.get("trial") or {}).get("storage", ""))
    with faults.classified(tracking_uri=uri, storage_url=storage):
        if plain.get("trial"):  # a study's trial in its own process (runner=mlflow|docker)
            return _study_trial(plain, experiment_id, splits)
        outcome = run_trial(plain, experiment_id=experiment_id, splits=splits)
    epochs = f"{outcome.epochs} epoch{'s' if outcome.epochs != 1 else ''}, " if "epochs" in plain["model"] else ""
    print(
        f"{PROG}: {model} on {data}: val_accuracy={outcome.val_accuracy:.4f} "
        f"test_accuracy={outcome.test_accuracy:.4f} ({epochs}"
        f"fit {outcome.fit_seconds:.1f} s, {outcome.n_params:,} params)\n"
        f"  MLflow run {outcome.run_id} in experiment '{plain['tracking']['experiment']}' at "
        f"{tracking.redact(plain['tracking']['uri'])}",
        flush=True,
    )
    return EXIT_OK


def _study_trial(plain: dict[str, Any], experiment_id: str, splits: Any) -> int:
    """One trial of a study: report epochs to its Optuna trial; its MLflow run tells the outcome."""
    from optuna import TrialPruned

    from mlops_tune.runners.docker import container_tags
    from mlops_tune.runners.mlflow import trial_process_link
    from mlops_tune.trial import run_trial

    reporter, should_log_model = trial_process_link(plain["trial"])
    tags = container_tags()  # in a trial image: which image, user and limits
    try:
        outcome = run_trial(plain, experiment_id=experiment_id, splits=splits, reporter=reporter,
                            evaluate_test=False, should_log_model=should_log_model, tags=tags)
    except TrialPruned as exc:
        print(f"{PROG}: trial pruned: {exc}", flush=True)
        return EXIT_OK
    print(f"{PROG}: trial val_accuracy={outcome.val_accuracy:.4f}", flush=True)
    return EXIT_OK


def _job(cfg: Any) -> int:
    return record_job(train, cfg, PROG)


def main() -> None:
    hydra_main("train", _job, PROG)


if __name__ == "__main__":
    main()
