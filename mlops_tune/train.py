"""``mlops-train``: train and evaluate ONE model from the Hydra config, tracked in MLflow.

Examples::

    mlops-train                                   # base ANN on digits
    mlops-train model=knn data=breast_cancer
    mlops-train data=csv data.path=iris.csv data.target=species
    mlops-train --config-path outputs/best --config-name best_config   # a study's best trial
"""

from __future__ import annotations

from typing import Any

from mlops_tune.config.cli import hydra_main, record_job
from mlops_tune.runtime.errors import EXIT_OK

PROG = "mlops-train"


def train(cfg: Any) -> int:
    """The ``mlops-train`` task: validate, load the data, run one tracked trial, print a summary."""
    from mlops_tune.config import load_train
    from mlops_tune.data import load_splits
    from mlops_tune.records import tracking
    from mlops_tune.runtime import faults
    from mlops_tune.runtime.logs import set_verbose
    from mlops_tune.runtime.secrets import redact
    from mlops_tune.trial import run_trial

    set_verbose(bool(cfg.get("verbose")))
    plain = load_train(cfg)
    splits = load_splits(plain["data"], plain["seed"])
    uri = plain["tracking"]["uri"]
    experiment_id = tracking.connect(uri, plain["tracking"]["experiment"])
    model, data = plain["model"]["name"], plain["data"]["name"]
    with faults.classified(tracking_uri=uri):
        outcome = run_trial(plain, experiment_id=experiment_id, splits=splits)
    epochs = f"{outcome.epochs} epoch{'s' if outcome.epochs != 1 else ''}, " if "epochs" in plain["model"] else ""
    print(
        f"{PROG}: {model} on {data}: val_accuracy={outcome.val_accuracy:.4f} "
        f"test_accuracy={outcome.test_accuracy:.4f} ({epochs}"
        f"fit {outcome.fit_seconds:.1f} s, {outcome.n_params:,} params)\n"
        f"  MLflow run {outcome.run_id} in experiment '{plain['tracking']['experiment']}' at "
        f"{redact(plain['tracking']['uri'])}",
        flush=True,
    )
    return EXIT_OK


def _job(cfg: Any) -> int:
    return record_job(train, cfg, PROG)


def main() -> None:
    from mlops_tune.runtime import threads

    threads.limit_to_quota(tensorflow=True)  # under a CPU quota below the cores, before numpy loads
    hydra_main("train", _job, PROG)


if __name__ == "__main__":
    main()
