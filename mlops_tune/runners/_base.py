"""The runner interface."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mlops_tune.data import Splits
from mlops_tune.runtime import heap
from mlops_tune.trial import TrialOutcome, run_trial


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a study shares."""

    experiment_id: str
    parent_run_id: str
    splits: Splits
    #: the best validation accuracy of the study so far (-inf before any trial completed);
    #: a trial logs its model only when it beats it
    best_value: Callable[[], float]
    #: the Optuna storage URL and pruner spec, for trials that run in another process
    storage_url: str = ""
    pruner: Any = "median"
    #: other processes run trials of the study at once (study.n_jobs > 1): ask the pruner every epoch
    parallel: bool = False
    #: progress of a trial that runs in this process: (trial number, epoch, val_accuracy)
    on_epoch: Callable[[int, int, float], None] = lambda number, epoch, value: None
    #: tags of every trial run of this worker (a Project worker's own run, its image)
    tags: Mapping[str, str] = field(default_factory=dict)


class Runner(abc.ABC):
    """Trains one trial in a worker and returns its outcome."""

    def __init__(self, runner_cfg: Mapping[str, Any]) -> None:
        self.cfg = dict(runner_cfg)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the runner started for the study (processes, servers, temp files)."""

    def start(self, cfg: Mapping[str, Any]) -> None:
        """The study's trials are next: what is worth doing once, before them (in a process
        mlops-tune started, the imports leave the garbage collector's sweeps: ``mlops_tune.runtime.heap``)."""
        heap.settle()

    def drain(self) -> None:  # noqa: B027 - optional hook
        """The worker's trials are over: wait for what they left to write (the in-process runner's
        models, see ``mlops_tune.records.backlog``); raise a write that failed."""

    @abc.abstractmethod
    def run(self, trial_cfg: Mapping[str, Any], trial: Any, context: TrialContext,
            tags: Mapping[str, str]) -> TrialOutcome:
        """Train and track one trial; raise ``optuna.TrialPruned`` when pruned."""

    def retrain(self, trial_cfg: Mapping[str, Any], context: TrialContext, run_name: str,
                tags: Mapping[str, str]) -> TrialOutcome:
        """Train a trial's config once more (``gate.confirm``: another seed) where this runner runs
        trials, as a child run of the study that reports to no Optuna trial and logs no model.
        This default trains in the study's process."""
        return run_trial(trial_cfg, experiment_id=context.experiment_id, splits=context.splits,
                         parent_run_id=context.parent_run_id, run_name=run_name, tags=tags,
                         evaluate_test=False, should_log_model=lambda _value: False)
