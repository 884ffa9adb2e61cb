"""Trials in this Python process: the frameworks are imported once for the whole study."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mlops_tune.families import settle_imports
from mlops_tune.records.backlog import Backlog
from mlops_tune.runners._base import Runner, TrialContext
from mlops_tune.runtime import keys
from mlops_tune.search.optuna_setup import reporting
from mlops_tune.trial import OptunaReporter, TrialOutcome, run_trial


class InProcessRunner(Runner):
    """Calls :func:`~mlops_tune.trial.run_trial` directly; a trial's params, config, dataset input
    and model are written by a thread while trials train (``mlops_tune.records.backlog``)."""

    def __init__(self, runner_cfg: Mapping[str, Any]) -> None:
        super().__init__(runner_cfg)
        self.backlog = Backlog()

    def drain(self) -> None:
        self.backlog.wait()

    def close(self) -> None:
        self.backlog.close()

    def start(self, cfg: Mapping[str, Any]) -> None:
        """Import the model's framework now, not in trial 0 (in a process mlops-tune started,
        with the garbage collector still off, which makes the imports faster)."""
        settle_imports(str(cfg["model"]["family"]))

    def run(self, trial_cfg: Mapping[str, Any], trial: Any, context: TrialContext,
            tags: Mapping[str, str]) -> TrialOutcome:
        return run_trial(
            trial_cfg,
            experiment_id=context.experiment_id,
            splits=context.splits,
            parent_run_id=context.parent_run_id,
            run_name=f"trial-{trial.number}",
            tags=tags,
            reporter=OptunaReporter(trial, lambda value, epoch: context.on_epoch(trial.number, epoch, value),
                                    *reporting(context.pruner, context.parallel), background=True),
            evaluate_test=False,
            should_log_model=lambda val_accuracy: val_accuracy > context.best_value(),
            on_run_started=lambda run_id: trial.set_user_attr(keys.RUN, run_id),
            backlog=self.backlog,
        )
