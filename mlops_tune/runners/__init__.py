"""Runners decide WHERE a trial runs; what a trial does is :func:`mlops_tune.trial.run_trial`.

``runner.name`` in the config picks one: ``inprocess`` (this Python process, frameworks
loaded once; the default), ``mlflow`` (every trial an MLflow Project run in a fresh
process, ``mlops_tune.worker``) or ``docker`` (the same Project runner, with the model
family's image as the project's ``docker_env``). A runner gets the trial's resolved
config and the Optuna trial (for pruning reports) and returns the trial's
:class:`~mlops_tune.trial.TrialOutcome`. Runners are the study's side: nothing here runs
in a trial's own process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlops_tune.errors import UsageError
from mlops_tune.runners._base import Runner, TrialContext

__all__ = ["RUNNERS", "Runner", "TrialContext", "get_runner"]

RUNNERS = {
    "inprocess": "mlops_tune.runners.inprocess:InProcessRunner",
    "mlflow": "mlops_tune.runners.project:ProjectRunner",
    "docker": "mlops_tune.runners.project:ProjectRunner",
}


def get_runner(runner_cfg: Mapping[str, Any]) -> Runner:
    """The runner named by ``runner.name``."""
    name = runner_cfg.get("name")
    if name not in RUNNERS:
        raise UsageError(f"runner.name: '{name}' is not one of {', '.join(RUNNERS)}")
    from hydra.utils import get_class

    runner: Runner = get_class(RUNNERS[name].replace(":", "."))(runner_cfg)
    return runner
