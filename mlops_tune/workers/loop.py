"""The worker loop: take a ticket, ask the study for a trial, train it, tell the result, repeat.

Every worker of a study runs this loop, wherever it runs (``mlops_tune.workers``). It uses
Optuna's ask-and-tell interface, and records the heartbeat of the trial it runs itself (as
``Study.optimize`` does), so the trial of a worker that died is failed as stale and run again.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlops_tune.records import claims, tracking
from mlops_tune.runners import TrialContext
from mlops_tune.runtime import faults, keys
from mlops_tune.runtime.errors import StudyAborted, TrialFailed
from mlops_tune.search import gate
from mlops_tune.search.optuna_setup import make_storage
from mlops_tune.show import report
from mlops_tune.show.progress import Progress
from mlops_tune.workers.objective import Objective
from mlops_tune.workers.plan import Plan

#: one ask at a time among this process's threads: two asks at once on one SQLite storage
#: could both try to take the same waiting trial
ASK_LOCK = threading.Lock()


def worker_id() -> str:
    """Identifies this process among the workers of a study (claims, logs)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Assignment:
    """What a worker needs to join a study that its coordinator opened."""

    name: str
    experiment_id: str
    parent_run_id: str
    #: the time.time() the study started (trial lines count their elapsed time from it)
    started_at: float
    #: the number of a waiting trial this worker asks for first (the probe), if still waiting
    first_trial: int | None = None
    #: how this worker's tickets name it (before its host-pid), so the study finds its trials if it dies
    owner: str = ""
    #: the trials this worker runs at most (None: until the budget or the gate ends the study)
    trials: int | None = None
    #: tags of every trial run of this worker (its own run, its image)
    tags: dict[str, str] = field(default_factory=dict)


class WorkerLoop:
    """Runs trials of ``study`` until the gate is met, the budget is spent, or ``stop`` is set."""

    def __init__(self, plan: Plan, study: optuna.Study, storage: Any, context: TrialContext, progress: Progress,
                 budget_key: str, started: float, first_trial: int | None = None, owner: str = "",
                 trials: int | None = None, after_first: Callable[[optuna.Study], None] | None = None) -> None:
        self.plan, self.study, self.storage, self.context = plan, study, storage, context
        self.study_id = int(storage.get_study_id_from_name(study.study_name))
        self.progress, self.started = progress, started
        self.budget = claims.Budget(plan.storage_url, budget_key, storage)  # this loop's: it holds its own ticket
        self.worker = f"{owner}-{worker_id()}" if owner else worker_id()
        self.first_trial, self.trials = first_trial, trials
        self.failures: list[str] = []  # errors of the failed trials since the last good one
        #: the study's complete trials as last read (one read serves a trial's line and the next gate check)
        self.done: list[FrozenTrial] | None = None
        #: run before this loop's second trial (the probe with one worker: it follows trial 0)
        self.after_first = after_first
        self.objective = Objective(plan, context, self.budget, progress)

    def run(self, stop: threading.Event) -> None:
        cfg = self.plan.cfg["study"]
        n_total, timeout, limit = int(cfg["n_trials"]), cfg["timeout"], int(cfg["max_consecutive_failures"])
        ran = 0
        while not stop.is_set() and ran != self.trials and not gate.met(self._done(), self.plan.gate):
            self.done = None  # read afresh at the next check
            faults.check_stopped()  # a stop whose first raise was lost: no next trial
            if len(self.failures) >= limit:
                raise StudyAborted(f"study '{self.plan.name}' stopped after {limit} failed trials in a row "
                                   f"(last error: {self.failures[-1]})")
            if timeout is not None and time.perf_counter() - self.started >= timeout:
                break
            if not self.budget.take(n_total, self.worker):
                break  # study.n_trials trials have been started, by this worker or others
            with self.budget.held():  # given back when no trial took it (stopped, failed before the trial)
                if self.after_first is not None and ran:
                    self.after_first(self.study)
                    self.after_first = None
                if hasattr(self.plan.sampler, "propose"):  # the mutation sampler enqueues its child
                    self.plan.sampler.propose(self.study)
                self._one_trial()
            ran += 1

    def _done(self) -> list[FrozenTrial]:
        """The study's complete trials: those its last trial line was drawn from, else read now."""
        if self.done is None:
            self.done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return self.done

    def _one_trial(self) -> None:
        """Ask, run the objective under the trial's heartbeat, tell; print the trial's line."""
        wanted, self.first_trial = self.first_trial, None
        trial = ask(self.study, self.storage, self.study_id, wanted)
        state, value = TrialState.FAIL, None
        try:
            with self._heartbeat(trial.number):
                value = self.objective(trial)
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except TrialFailed:
            pass
        except BaseException:
            with contextlib.suppress(Exception):  # the storage may be what failed
                self.study.tell(trial, state=TrialState.FAIL)
            raise
        frozen = self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        if keys.NOT_CHARGED not in frozen.user_attrs:  # charged: its ticket stays spent
            self.budget.spend(str(frozen.user_attrs.get(keys.TICKET, "")))
        self.progress.trial_finished(frozen.number, frozen.value, gate.judged(frozen))
        report.trial_line(self.study, frozen, self.plan.threshold, time.perf_counter() - self.started,
                          self.plan.gate, done=self._done())
        if self.plan.n_jobs > 1:  # the status line counts the trials other workers finished too
            best = gate.best_value(self._done(), self.plan.gate)
            self.progress.sync(sum(map(gate.judged, self.study.get_trials(deepcopy=False))),
                               best if math.isfinite(best) else None)
        self.failures = failures_in_a_row(self.failures, frozen)

    @contextlib.contextmanager
    def _heartbeat(self, number: int) -> Iterator[None]:
        """Record trial ``number``'s heartbeat every ``study.heartbeat_interval`` s while it runs
        (storages with heartbeats: RDB), as ``Study.optimize`` does; a dead worker's trial then goes stale."""
        interval = getattr(self.storage, "get_heartbeat_interval", lambda: None)()
        if not interval:
            yield
            return
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)
        done = threading.Event()

        def beat() -> None:
            while True:
                with contextlib.suppress(Exception):  # the storage failing: the trial meets it too
                    self.storage.record_heartbeat(trial_id)
                if done.wait(interval):
                    return

        # not a daemon: the interpreter must not finalize while it is inside the storage's C code
        # (a stop signal may cut the join below short; the beat then ends at its next look at `done`)
        thread = threading.Thread(target=beat, name="mlops-tune-heartbeat")
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def ask(study: optuna.Study, storage: Any, study_id: int, wanted: int | None = None) -> optuna.Trial:
    """The next trial of ``study`` (``study_id`` on ``storage``): trial ``wanted`` if it still waits,
    else what ``Study.ask`` gives (the oldest waiting trial, or a new one from the sampler).

    Taking ``wanted`` is one conditional write of the storage's public API
    (``set_trial_state_values`` to RUNNING succeeds for one caller only), as ``Study.ask`` takes
    the oldest waiting trial, so two workers never both take it (on SQLite, which cannot lock a
    row, that write holds a lock file: :class:`~mlops_tune.search.optuna_setup.SQLiteStorage`).
    One ask at a time among this process's threads."""
    with ASK_LOCK:
        if wanted is not None:
            try:
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, wanted)
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    return optuna.trial.Trial(study, trial_id)
            except (optuna.exceptions.UpdateFinishedTrialError, KeyError):
                pass
        with _no_ask_warning():
            return study.ask()


@contextlib.contextmanager
def _no_ask_warning() -> Iterator[None]:
    """``Study.ask`` warns that heartbeats belong to ``Study.optimize``: this loop records them itself."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def failures_in_a_row(failures: list[str], trial: FrozenTrial) -> list[str]:
    """The errors of the model failures since the last trial that trained (a trial given back
    because its environment failed neither counts nor resets the count)."""
    if trial.state != TrialState.FAIL:
        return []
    if keys.NOT_CHARGED in trial.user_attrs:
        return failures
    return [*failures, str(trial.user_attrs.get(keys.ERROR, "see its MLflow run"))]


def run_worker(plan: Plan, assignment: Assignment) -> None:
    """Join the study its coordinator opened and run trials until the gate is met or the budget is
    spent: no report, no promotion (the coordinator does both once every worker has ended)."""
    try:
        storage = make_storage(plan.cfg["study"])
        tracking.connect(plan.tracking_uri, plan.cfg["tracking"]["experiment"])
        with faults.classified(tracking_uri=plan.tracking_uri, storage_url=plan.storage_url):
            plan.name = assignment.name
            study = optuna.load_study(study_name=plan.name, storage=storage, sampler=plan.sampler,
                                      pruner=plan.pruner)
            plan.sampler.reseed_rng()  # a _target_ sampler: not the same points as other workers (search.seeding)
            progress = Progress(int(plan.cfg["study"]["n_trials"]), plan.threshold, str(plan.gate["metric"]),
                                plan.cfg["model"].get("epochs"), live=False)
            context = replace(study_context(plan, study, assignment.experiment_id, assignment.parent_run_id),
                              tags=dict(assignment.tags))
            # elapsed times in the trial lines count from the study's start, as its own worker's do
            started = time.perf_counter() - (time.time() - assignment.started_at)
            loop = WorkerLoop(plan, study, storage, context, progress, budget_key(plan.name, storage), started,
                              assignment.first_trial, assignment.owner, assignment.trials)
            plan.runner.start(plan.cfg)
            loop.run(threading.Event())
            plan.runner.drain()
    finally:
        plan.runner.close()


def budget_key(name: str, storage: Any) -> str:
    """The key of a study's claims: its name and storage id (a recreated study starts afresh)."""
    return f"{name}#{storage.get_study_id_from_name(name)}"


def study_context(plan: Plan, study: optuna.Study, experiment_id: str, parent_run_id: str,
                  on_epoch: Callable[[int, int, float], None] = lambda number, epoch, value: None) -> TrialContext:
    """What every trial of this worker shares."""
    return TrialContext(experiment_id, parent_run_id, plan.splits,
                        lambda: gate.best_value(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                                                plan.gate),
                        storage_url=plan.storage_url, pruner=plan.cfg["study"]["pruner"], parallel=plan.n_jobs > 1,
                        on_epoch=on_epoch)
