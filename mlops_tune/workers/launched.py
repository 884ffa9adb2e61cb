"""What every launcher of workers outside the study's process shares (MLflow Project runs and
containers: :mod:`~mlops_tune.workers.projects`; Ray tasks: :mod:`~mlops_tune.workers.cluster`).

Such a worker has an MLflow run of its own, a child of the study's run, made by the study before
it starts; its trial tickets name that run (the ticket's owner), so the study finds the trials of
a worker that died and gives them back (:func:`~mlops_tune.workers.objective.give_back_lost`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

import optuna

from mlops_tune.records import claims
from mlops_tune.runtime import keys
from mlops_tune.search import gate
from mlops_tune.workers.loop import Assignment

#: workers in a row that end before finishing any trial, before the study gives up (exit 3)
MAX_FRUITLESS_WORKERS = 2
#: seconds a stopped worker has to close its runs before it is killed
STOP_GRACE = 20


def work_left(cfg: Mapping[str, Any], study: optuna.Study, budget: claims.Budget, assignment: Assignment) -> bool:
    """Trials given back wait, or the gate is not met, tickets are left and time too."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == optuna.trial.TrialState.WAITING for t in trials):
        return True
    timeout = cfg["study"]["timeout"]
    if timeout is not None and time.time() - assignment.started_at >= float(timeout):
        return False
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return not gate.met(done, cfg["gate"]) and budget.tickets.held() < int(cfg["study"]["n_trials"])


def finished_by(study: optuna.Study, owner: str) -> int:
    """The trials worker ``owner`` finished (their tickets name it)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished()
               and keys.NOT_CHARGED not in t.user_attrs
               and str(t.user_attrs.get(keys.TICKET, "")).partition(" ")[2].startswith(owner))


def close_run(run_id: str, status: str) -> None:
    """The status the study decided for a worker's run, over what the worker (or MLflow) left:
    KILLED always, else only a run still RUNNING (best effort)."""
    import mlflow

    with contextlib.suppress(Exception):
        client = mlflow.MlflowClient()
        if status == "KILLED" or client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
