"""The study's own process: the coordinator of its workers."""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.trial import TrialState

from mlops_tune.records import claims, tracking
from mlops_tune.runtime import faults, keys, threads
from mlops_tune.runtime.secrets import redact_text
from mlops_tune.search.gate import best_value, judged
from mlops_tune.search.optuna_setup import make_storage
from mlops_tune.show import report
from mlops_tune.show.progress import Progress
from mlops_tune.show.report import StudyResult
from mlops_tune.study.finish import finish
from mlops_tune.study.runs import (
    TAG_START,
    objective_of,
    others_running,
    parent_run,
    reconcile,
    remember_identity,
    study_for,
    study_params,
)
from mlops_tune.study.start import probe, start_point
from mlops_tune.trial import data_source
from mlops_tune.workers.local import LocalProcesses
from mlops_tune.workers.loop import Assignment, WorkerLoop, budget_key, study_context, worker_id
from mlops_tune.workers.plan import Plan


class Study:
    """One study of one base model: checks, stores, the parent run, trial 0 and the probe, the
    workers (this process's, and ``study.n_jobs`` - 1 helper processes), the verdict, the promotion."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        """Check everything that can fail on bad input, writing nothing (exit 2). With
        ``study.n_jobs`` > 1 the helper processes start first and import while this one checks."""
        self.cfg, self.worker = cfg, worker_id()
        self.n_jobs = threads.resolve_n_jobs(cfg["study"]["n_jobs"], str(cfg["runner"]["name"]),
                                             str(cfg["model"]["family"]), int(cfg["study"]["n_trials"]))
        # TensorFlow's thread pools sized for the trials that share the cores (before it starts)
        threads.limit_threads(self.n_jobs if self.n_jobs > 1 else int(cfg["runner"].get("workers") or 1))
        self.helpers = LocalProcesses(cfg, self.n_jobs - 1) if self.n_jobs > 1 else None
        try:
            self.plan = Plan.check(cfg, self.n_jobs)
            if self.helpers is not None:
                self.helpers.checked(self.plan.splits)
        except BaseException as exc:
            if self.helpers is not None:
                self.helpers.stop(exc)
            raise

    def run(self) -> StudyResult:
        """Run the study. Raises :class:`EnvironmentFault` when a store or the disk fails meanwhile."""
        plan = self.plan
        try:
            # runner=mlflow|docker|ray: the storage proxy (docker) starts now, the workers once the parent run exists
            with plan.launcher or contextlib.nullcontext():
                print(f"study '{plan.name}': opening the stores (Optuna {redact_text(plan.storage_url)}, "
                      f"MLflow {redact_text(plan.tracking_uri)}) ...", flush=True)
                experiment_id = tracking.connect(plan.tracking_uri, self.cfg["tracking"]["experiment"])  # no study yet
                storage = make_storage(self.cfg["study"])
                with faults.classified(tracking_uri=plan.tracking_uri, storage_url=plan.storage_url):
                    plan.name = study_for(storage, plan.name, plan.splits.fingerprint, objective_of(self.cfg),
                                          self.cfg["study"]["on_data_change"])
                    return self._run(storage, experiment_id)
        except BaseException as exc:
            if self.helpers is not None:
                self.helpers.stop(exc)
            raise
        finally:
            plan.runner.close()

    def _run(self, storage: Any, experiment_id: str) -> StudyResult:
        plan = self.plan
        start, origin = start_point(plan)
        study = optuna.create_study(study_name=plan.name, storage=storage, direction="maximize",
                                    sampler=plan.sampler, pruner=plan.pruner, load_if_exists=True)
        existing = len(study.get_trials(deepcopy=False))
        budget = claims.Budget(plan.storage_url, budget_key(plan.name, storage), storage)
        first, later = self._enqueue_start(study, budget, start, origin, existing)
        parent_run_id, created = parent_run(study, experiment_id, budget)
        reconcile(study, experiment_id, parent_run_id, budget)  # before any worker of this run starts a trial
        started = time.perf_counter()
        assignment = Assignment(plan.name, experiment_id, parent_run_id, time.time(), first)
        if plan.launcher is not None:  # runner=mlflow|docker|ray: they start while this process finishes opening
            plan.launcher.start(assignment)
        with tracking.run(experiment_id, plan.name, resume_run_id=parent_run_id,
                          tags={tracking.TAG_STUDY: plan.name}) as run_id:
            if created:
                tracking.log_batch(params=study_params(self.cfg), tags={
                    tracking.TAG_DATA: plan.splits.fingerprint, TAG_START: origin or "base"})
                tracking.log_data(str(self.cfg["data"]["name"]), plan.splits.fingerprint, plan.splits.x_train,
                                  plan.splits.y_train, data_source(self.cfg["data"]))
            progress = study_progress(self.cfg, plan, study.get_trials(deepcopy=False))
            context = study_context(plan, study, experiment_id, run_id, on_epoch=progress.epoch)
            report.study_header(plan.name, self.cfg, plan.space, existing)

            new_loop = functools.partial(WorkerLoop, plan, study, storage, context, progress, budget.key, started,
                                         first, after_first=later)
            others = functools.partial(others_running, study, storage, plan.gate, budget)
            with progress:
                if plan.launcher is not None:  # runner=mlflow|docker|ray: no trial trains in this process
                    plan.launcher.run(study, storage, budget, assignment, started)
                    while others():  # a dead process's trial taken back: new workers run it
                        plan.launcher.run(study, storage, budget, assignment, started)
                else:
                    self._work(new_loop, assignment, others)
            reconcile(study, experiment_id, run_id, budget)
            return finish(study, self.cfg, plan.space, plan.family, plan.splits, run_id, budget, self.worker)

    def _enqueue_start(self, study: optuna.Study, budget: claims.Budget, start: dict[str, Any], origin: str,
                       existing: int) -> tuple[int | None, Callable[[optuna.Study], None] | None]:
        """Trial 0 and the probe, enqueued once per study (by claim). Returns the trial workers ask for
        first (the probe, with helper processes) and what to enqueue after this process's first trial."""
        plan = self.plan
        if budget.claim("base_trial", self.worker) != self.worker:  # joining: another worker or a resume
            plan.sampler.reseed_rng()  # workers seeded alike must not propose the same points
            return None, None
        remember_identity(study, plan.splits.fingerprint, self.cfg)
        study.enqueue_trial(plan.space.encode(start), user_attrs={
            keys.PARENT: keys.ROOT, **({keys.START: origin} if origin else {})})
        found = probe(plan, start)
        if found is None:
            return None, None
        params = plan.space.encode(found[0])
        lineage = {keys.PARENT: keys.BASE if not origin else existing, keys.MUTATIONS: ",".join(found[1])}
        enqueue = functools.partial(optuna.Study.enqueue_trial, params=params, user_attrs=lineage)
        if self.n_jobs == 1 and plan.launcher is None:
            return None, enqueue
        enqueue(study)  # another worker takes it beside trial 0
        number = max(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        return (number if self.helpers is not None else None), None

    def _work(self, new_loop: Callable[..., WorkerLoop], assignment: Assignment, others: Callable[[], bool]) -> None:
        """This process's workers until all ended; lost trials (a killed helper's, a dead process's) run here."""
        helpers, plan = self.helpers, self.plan
        if helpers is not None:
            helpers.release(assignment)
            print(f"study '{plan.name}': {helpers.describe(self.n_jobs)}", flush=True)
        plan.runner.start(self.cfg)
        # a failure or a signal here reaches Study.run, which stops the helper processes
        new_loop().run(threading.Event())
        if helpers is not None:
            self.helpers = None  # waited for: nothing left to stop
            helpers.wait_and_rerun_lost(new_loop())
        while others():
            new_loop(after_first=None).run(threading.Event())  # the probe, if any, is enqueued already
        plan.runner.drain()  # the models its trials logged are written: the best is judged next


def study_progress(cfg: Mapping[str, Any], plan: Plan, trials: list[optuna.trial.FrozenTrial]) -> Progress:
    """The study's progress display, from where the study stands (a resumed study's count and best)."""
    best = best_value(trials, plan.gate)
    return Progress(int(cfg["study"]["n_trials"]), plan.threshold, str(plan.gate["metric"]), cfg["model"].get("epochs"),
                    done=sum(map(judged, trials)), best=best if math.isfinite(best) else None,
                    timeout=cfg["study"]["timeout"],
                    live=False if plan.launcher is not None else None)  # launched workers print their own lines
