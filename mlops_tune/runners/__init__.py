"""Runners train a trial in a worker's process; what a trial does is :func:`mlops_tune.trial.run_trial`.

Every worker trains its trials in its own process (:class:`~mlops_tune.runners.inprocess.InProcessRunner`,
frameworks loaded once). ``runner.name`` decides where the workers run: ``inprocess`` (the
study's process, and ``study.n_jobs`` - 1 local helper processes), ``mlflow`` (MLflow Project
runs), ``docker`` (the same, in the model family's image) or ``ray`` (Ray tasks on a
cluster): :mod:`mlops_tune.workers` starts them. A runner gets the trial's resolved config and
the Optuna trial (for pruning reports) and returns the trial's :class:`~mlops_tune.trial.TrialOutcome`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlops_tune.runners._base import Runner, TrialContext
from mlops_tune.runtime.errors import UsageError

__all__ = ["RUNNERS", "Runner", "TrialContext", "get_runner"]

#: ``runner.name``: where the study's workers run (``mlops_tune.workers``)
RUNNERS = ("inprocess", "mlflow", "docker", "ray")


def get_runner(runner_cfg: Mapping[str, Any]) -> Runner:
    """The runner that trains a worker's trials (checks ``runner.name``)."""
    name = runner_cfg.get("name")
    if name not in RUNNERS:
        raise UsageError(f"runner.name: '{name}' is not one of {', '.join(RUNNERS)}")
    from mlops_tune.runners.inprocess import InProcessRunner

    return InProcessRunner(runner_cfg)
