"""The tuning loop: one Optuna study of mutations of the base model, gated by accuracy.

:class:`Study` validates everything first (nothing is written for a bad config); its
:meth:`Study.run` opens or resumes the study, enqueues the base model as trial 0, runs
trials through the configured runner until the gate is met or the budget is spent, and
finishes with the test-split evaluation of the best model, the study's artifacts and
the promotion (``registry``). Several workers may run the same study (see ``claims``):
each trial holds a budget ticket, and a trial that did not train gives it back.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlops_tune import attrs, claims, faults, gate, registry, report, stores, threads, tracking
from mlops_tune.data import Splits, load_splits, save_splits
from mlops_tune.errors import EnvironmentFault, StudyAborted, TrialFailed, UsageError, WorkerLost, first_line
from mlops_tune.families import get_family
from mlops_tune.optuna_setup import check_writable, make_pruner, make_sampler, make_storage
from mlops_tune.progress import Progress
from mlops_tune.report import StudyResult
from mlops_tune.runners import Runner, TrialContext, get_runner
from mlops_tune.search import SearchSpace
from mlops_tune.secrets import redact_text, write_private
from mlops_tune.trial import TrialOutcome, data_source, run_trial, trial_config

#: a study's parent run: what trial 0 was (``base`` or the champion it started from)
TAG_START = "mlops_tune.start_from"
#: a confirmation run (gate.confirm): the number of the trial it retrains with another seed
TAG_CONFIRM_OF = "mlops_tune.confirm_of"


class Study:
    """One study of one base model; :meth:`run` is the whole loop."""

    def __init__(self, cfg: Mapping[str, Any], lane: int = 0, splits: Splits | None = None) -> None:
        """Validate and prepare everything that can fail on bad input, writing nothing.

        With ``study.n_jobs`` > 1 the extra lanes' processes start first, so that they import
        while this one checks; they are ended when a check fails, and :meth:`run` releases them.

        ``lane`` > 0: this process is one of the study's extra trial lanes, started by the
        study's own process (:meth:`run_lane`), with the ``splits`` that process loaded."""
        self.cfg = cfg
        self.helpers: HelperLanes | None = None
        self.n_jobs = threads.resolve_n_jobs(cfg["study"]["n_jobs"], str(cfg["runner"]["name"]),
                                             str(cfg["model"]["family"]), int(cfg["study"]["n_trials"]))
        # TensorFlow's thread pools sized for the trials that share the cores (before it starts)
        threads.limit_threads(self.n_jobs if self.n_jobs > 1 else int(cfg["runner"].get("workers") or 1))
        if self.n_jobs > 1 and not lane:
            self.helpers = HelperLanes(cfg, self.n_jobs - 1)
        try:
            self._check(cfg, splits)
            if self.helpers is not None:
                self.helpers.checked(self.splits)
        except BaseException as exc:
            if self.helpers is not None:
                self.helpers.stop(exc)
            raise

    def _check(self, cfg: Mapping[str, Any], splits: Splits | None) -> None:
        self.name, self.threshold = str(cfg["study"]["name"]), float(cfg["gate"]["threshold"])
        if cfg["registry"]["promote"]:
            registry.check_name(cfg["registry"]["name"])
        self.space = SearchSpace.from_config((cfg.get("search") or {}).get("space"), cfg)
        self.family = get_family(cfg["model"]["family"])
        self.gate = cfg["gate"]
        self.sampler = make_sampler(cfg["study"], self.space, int(cfg["seed"]), self.gate)
        self.pruner = make_pruner(cfg["study"]["pruner"])
        if self.n_jobs > 1:  # a lane's trial in flight stops at its next epoch once another met the gate
            self.pruner = GateAwarePruner(self.pruner, self.gate)
        if splits is None:
            print(f"study '{self.name}': loading data '{cfg['data']['name']}' ...", flush=True)
            splits = load_splits(cfg["data"], int(cfg["seed"]))
        self.splits: Splits = splits
        # rejects e.g. a CNN on tabular data, or a base model too large for model.max_params, now
        self.family.check_data(cfg["model"], self.splits.as_input(self.family.input_kind))
        self.storage_url, self.tracking_uri = str(cfg["study"]["storage"]), str(cfg["tracking"]["uri"])
        # stores that cannot be written are bad set-ups (exit 2), found before anything is created
        stores.check_reachable(self.tracking_uri)
        check_writable(self.storage_url)
        #: identifies this process among the workers of a study (claims, logs)
        self.worker = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.budget = claims.Budget(self.storage_url, self.name)  # the key gets the storage's study id
        self.failures: list[str] = []  # errors of the failed trials since the last good one
        #: the probe's params and lineage until it is enqueued (by the process that enqueued trial 0)
        self.pending_probe: tuple[dict[str, Any], dict[str, Any]] | None = None
        self.runner: Runner = get_runner(cfg["runner"])
        try:
            self.runner.check(cfg)
        except BaseException:
            self.runner.close()
            raise

    def run(self) -> StudyResult:
        """Run the study. Raises :class:`EnvironmentFault` when a store or the disk fails meanwhile."""
        try:
            print(f"study '{self.name}': opening the stores (Optuna {redact_text(self.storage_url)}, "
                  f"MLflow {redact_text(self.tracking_uri)}) ...", flush=True)
            storage = make_storage(self.cfg["study"])
            experiment_id = tracking.connect(self.tracking_uri, self.cfg["tracking"]["experiment"])
            with faults.classified(tracking_uri=self.tracking_uri, storage_url=self.storage_url):
                self.name = study_for_data(storage, self.name, self.splits.fingerprint,
                                           self.cfg["study"]["on_data_change"])
                self.start, self.start_origin = self._start_point()
                return self._run(storage, experiment_id)
        except BaseException as exc:
            if self.helpers is not None:
                self.helpers.stop(exc)
            raise
        finally:
            self.runner.close()

    def _run(self, storage: optuna.storages.BaseStorage, experiment_id: str) -> StudyResult:
        study = optuna.create_study(study_name=self.name, storage=storage, direction="maximize",
                                    sampler=self.sampler, pruner=self.pruner, load_if_exists=True)
        #: the trial every lane asks for first (the probe): the first lane ready runs it
        self.first_trial: int | None = None
        existing = len(study.get_trials(deepcopy=False))
        self.budget.key = f"{self.name}#{storage.get_study_id_from_name(self.name)}"  # a recreated study: afresh
        if self.budget.claim("base_trial", self.worker) == self.worker:  # one writer, however many start at once
            if self.splits.fingerprint and attrs.DATA_FINGERPRINT not in study.user_attrs:
                study.set_user_attr(attrs.DATA_FINGERPRINT, self.splits.fingerprint)
            study.enqueue_trial(self.space.encode(self.start), user_attrs={
                attrs.PARENT: attrs.ROOT, **({attrs.START: self.start_origin} if self.start_origin else {})})
            probe = self._probe()
            if probe is not None:
                point, ops = probe
                self.pending_probe = (self.space.encode(point), {
                    attrs.PARENT: attrs.BASE if not self.start_origin else existing, attrs.MUTATIONS: ",".join(ops)})
                if self.n_jobs > 1 or self.runner.lanes > 1:  # another lane takes it beside trial 0
                    probe_number = self._enqueue_probe(study)
                    if self.helpers is not None:  # lanes of their own, ready in whatever order
                        self.first_trial = probe_number
        else:  # joining (another worker, a resume): workers seeded alike must not propose the same points
            self.sampler.reseed_rng()
        parent_run_id, created = parent_run(study, experiment_id, self.budget)
        with tracking.run(experiment_id, self.name, resume_run_id=parent_run_id,
                          tags={tracking.TAG_STUDY: self.name}) as run_id:
            if created:
                tracking.log_batch(params=study_params(self.cfg), tags={
                    tracking.TAG_DATA: self.splits.fingerprint, TAG_START: self.start_origin or "base"})
                tracking.log_data(str(self.cfg["data"]["name"]), self.splits.fingerprint, self.splits.x_train,
                                  self.splits.y_train, data_source(self.cfg["data"]))
            reconcile(study, experiment_id, run_id, self.budget)
            progress = Progress(int(self.cfg["study"]["n_trials"]), self.threshold, str(self.cfg["gate"]["metric"]),
                                self.cfg["model"].get("epochs"), done=sum(judged(t) for t in study.get_trials()),
                                timeout=self.cfg["study"]["timeout"])
            context = TrialContext(experiment_id, run_id, self.splits, lambda: best_value(study, self.gate),
                                   storage_url=self.storage_url, pruner=self.cfg["study"]["pruner"],
                                   lanes=self.n_jobs > 1, on_epoch=progress.epoch)
            report.study_header(self.name, self.cfg, self.space, existing)
            self.progress = progress
            with progress:
                self._optimize(one_ask_at_a_time(study, self.first_trial), context)
            reconcile(study, experiment_id, run_id, self.budget)
            return finish(study, self.cfg, self.space, self.family, self.splits, run_id, self.budget, self.worker)

    def _optimize(self, study: optuna.Study, context: TrialContext) -> None:
        """Run trials until the gate is met or the budget is spent; one lane per trial run at once
        (``study.n_jobs`` > 1: the other lanes are processes of their own, see :class:`HelperLanes`)."""
        started = time.perf_counter()
        helpers = self.helpers
        if helpers is not None:
            helpers.release(self.name, context.experiment_id, context.parent_run_id, started_at=time.time(),
                            first_trial=self.first_trial)
            print(f"study '{self.name}': {self.n_jobs} trials at once ({self.n_jobs - 1} more process"
                  f"{'es' if self.n_jobs > 2 else ''}; TF threads per process: "
                  f"{os.environ.get('TF_NUM_INTRAOP_THREADS')} intra-op, "
                  f"{os.environ.get('TF_NUM_INTEROP_THREADS')} inter-op)", flush=True)
        self.runner.start(self.cfg)
        # a failure or a signal here reaches Study.run, which stops the other lanes
        in_lanes(self.runner.lanes, lambda stop: self._lane(study, context, started, stop), self.runner.interrupt)
        self.runner.drain()  # the models its trials logged are written: the best is judged next
        if helpers is not None:
            self.helpers = None  # waited for: nothing left to stop
            helpers.wait()

    def run_lane(self, experiment_id: str, parent_run_id: str, started_at: float | None = None,
                 first_trial: int | None = None) -> None:
        """Run this process's lane of a study that the study's own process opened (its
        ``study.n_jobs`` > 1): trials until the gate is met or the budget is spent; no report,
        no promotion (the study's process does both once every lane has ended)."""
        try:
            storage = make_storage(self.cfg["study"])
            tracking.connect(self.tracking_uri, self.cfg["tracking"]["experiment"])
            with faults.classified(tracking_uri=self.tracking_uri, storage_url=self.storage_url):
                study = one_ask_at_a_time(optuna.load_study(study_name=self.name, storage=storage,
                                                            sampler=self.sampler, pruner=self.pruner), first_trial)
                self.budget.key = f"{self.name}#{storage.get_study_id_from_name(self.name)}"
                self.sampler.reseed_rng()  # lanes seeded alike must not propose the same points
                self.progress = Progress(int(self.cfg["study"]["n_trials"]), self.threshold,
                                         str(self.cfg["gate"]["metric"]), self.cfg["model"].get("epochs"),
                                         live=False)
                context = TrialContext(experiment_id, parent_run_id, self.splits,
                                       lambda: best_value(study, self.gate), storage_url=self.storage_url,
                                       pruner=self.cfg["study"]["pruner"], lanes=True)
                # elapsed times in the trial lines count from the study's start, as its own lane's do
                started = time.perf_counter() - (time.time() - started_at if started_at else 0.0)
                self.runner.start(self.cfg)
                self._lane(study, context, started, threading.Event())
                self.runner.drain()
        finally:
            self.runner.close()

    def _lane(self, study: optuna.Study, context: TrialContext, started: float, stop: threading.Event) -> None:
        n_total, timeout = int(self.cfg["study"]["n_trials"]), self.cfg["study"]["timeout"]
        limit = int(self.cfg["study"]["max_consecutive_failures"])
        budget = claims.Budget(self.storage_url, self.budget.key)  # this lane's: it holds its own ticket

        def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            self.progress.trial_finished(trial.number, trial.value, judged(trial))
            report.trial_line(study, trial, self.threshold, time.perf_counter() - started, self.gate)
            self.failures = failures_in_a_row(self.failures, trial)

        ran = 0
        # one trial per optimize(): every worker of the study stops at its next trial once the gate is met
        while not stop.is_set() and not gate_met(study, self.gate):
            faults.check_stopped()  # a stop whose first raise was lost: no next trial
            if len(self.failures) >= limit:
                raise StudyAborted(f"study '{self.name}' stopped after {limit} failed trials in a row "
                                   f"(last error: {self.failures[-1]})")
            if timeout is not None and time.perf_counter() - started >= timeout:
                break
            if not budget.take(n_total, self.worker):
                break  # study.n_trials trials have been started, by this worker or others
            with budget.held():  # given back when no trial took it (stopped, failed before the trial)
                if self.pending_probe is not None and ran:  # one lane: the probe follows trial 0
                    self._enqueue_probe(study)
                if hasattr(self.sampler, "propose"):  # the mutation sampler enqueues its child
                    self.sampler.propose(study)
                study.optimize(lambda trial: self._run_trial(trial, context, budget), n_trials=1,
                               callbacks=[after_trial], catch=(TrialFailed,), gc_after_trial=False)
            ran += 1

    def _run_trial(self, trial: optuna.Trial, context: TrialContext, budget: claims.Budget) -> float:
        """The objective: run one trial; judge a failure as the model's or the environment's."""
        self.progress.trial_started(trial.number)
        ticket = budget.hand_over()
        if ticket:
            trial.set_user_attr(attrs.TICKET, ticket)
        trial_cfg = trial_config(self.space.apply(self.cfg, self.space.suggest(trial)))
        try:
            outcome = self.runner.run(trial_cfg, trial, context, trial_tags(self.name, trial))
        except optuna.TrialPruned:
            if self.n_jobs > 1 and gate_met(trial.study, self.gate):  # not the model's doing: say so
                trial.set_user_attr(attrs.GATE_STOP, True)
            raise
        except KeyboardInterrupt as exc:
            give_back(trial, str(exc) or "interrupted", budget)
            raise
        except WorkerLost as exc:  # not the model's doing: runs again, the study goes on
            give_back(trial, str(exc), budget)
            raise TrialFailed(str(exc)) from exc
        except Exception as exc:
            fault = faults.classify(exc, tracking_uri=self.tracking_uri, storage_url=self.storage_url)
            if fault is not None:
                give_back(trial, str(fault), budget)
                raise fault from exc
            message = first_line(exc, 480) if str(exc).strip() else ""
            trial.set_user_attr(attrs.ERROR, redact_text(f"{type(exc).__name__}: {message}")[:500])
            raise TrialFailed(message) from exc
        record_outcome(trial, outcome)
        for key, value in gate.constraints(trial, self.gate).items():
            trial.set_constraint(key, value)
        if gate.needs_confirmation(outcome.val_accuracy, gate.violations(trial, self.gate), self.gate):
            confirm(trial, trial_cfg, outcome, context, self.gate, self.name)
        return outcome.val_accuracy

    def _enqueue_probe(self, study: optuna.Study) -> int:
        """Enqueue the probe; its trial number."""
        assert self.pending_probe is not None
        params, lineage = self.pending_probe
        self.pending_probe = None
        study.enqueue_trial(params, user_attrs=lineage)
        return max(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))

    def _probe(self) -> tuple[dict[str, Any], list[str]] | None:
        """Trial 1 (``study.probe=widest``): trial 0 with every layer as wide as the search space
        allows, so the study learns early whether capacity alone reaches the gate (on digits it
        did on every seed; ``docs/architecture.md``, "The probe"). None when the space has no
        layers to widen, or when the widest model breaks ``model.max_params`` or ``gate.max_params``."""
        if self.cfg["study"]["probe"] != "widest" or int(self.cfg["study"]["n_trials"]) < 2:
            return None
        probe = self.space.widest(self.start)
        if probe is None:
            return None
        point, ops = probe
        model_cfg, inputs = self.space.apply(self.cfg, point)["model"], self.splits.as_input(self.family.input_kind)
        checks: list[tuple[dict[str, Any], str | None]] = [(model_cfg, None)]  # None: the error says why
        limit = self.gate.get("max_params")
        if limit is not None:  # a model that cannot pass the gate is not worth a trial
            checks.append(({**model_cfg, "max_params": int(limit)}, f"over gate.max_params={int(limit):,}"))
        for checked, reason in checks:
            try:
                self.family.check_data(checked, inputs)
            except UsageError as exc:
                print(f"study '{self.name}': no probe of the widest layers ({reason or exc})", flush=True)
                return None
        return point, ops

    def _start_point(self) -> tuple[dict[str, Any], str]:
        """Trial 0: the base model, or with ``study.start_from=champion`` the registry's champion
        (the space widened to hold it, still anchored on the base model)."""
        if self.cfg["study"]["start_from"] != "champion":
            return dict(self.space.base), ""
        found = registry.champion_config(str(self.cfg["registry"]["name"]))
        if found is None:
            print(f"study '{self.name}': no '{registry.CHAMPION_ALIAS}' in {self.cfg['registry']['name']} yet: "
                  "trial 0 is the base model", flush=True)
            return dict(self.space.base), ""
        champion_cfg, origin = found
        family = (champion_cfg.get("model") or {}).get("family")
        if family != self.cfg["model"]["family"]:
            print(f"study '{self.name}': the champion {origin} is a {family} model, not "
                  f"{self.cfg['model']['family']}: trial 0 is the base model", flush=True)
            return dict(self.space.base), ""
        point = self.space.point_of(champion_cfg)
        self.space = self.space.including(point)
        self.sampler = make_sampler(self.cfg["study"], self.space, int(self.cfg["seed"]), self.gate)
        print(f"study '{self.name}': trial 0 is the champion {origin}", flush=True)
        return point, f"champion {origin}"


# ----------------------------------------------------------------------------- around the loop
def one_ask_at_a_time(study: optuna.Study, first: int | None = None) -> optuna.Study:
    """``study`` whose ``ask`` is serialized across this process's threads (the lanes).

    ``ask`` takes an enqueued trial with a read and then a write; two lanes asking at the same
    moment could both take the same trial from a SQLite storage. One ask at a time (the trials
    themselves still run in parallel).

    ``first``: the number of an enqueued trial this process's first ask takes, if it is still
    waiting then (else the oldest waiting one, as Optuna's ``ask`` does). Every lane of a
    study asks first for the probe (trial 1): the lane ready first runs it, the next one the
    base model (trial 0), whichever process is ready first.
    """
    ask, lock = study.ask, threading.Lock()
    wanted = [first] if first is not None else []

    def serialized(*args: Any, **kwargs: Any) -> optuna.Trial:
        with lock:
            if wanted and not args and not kwargs:
                trial = _take_waiting(study, wanted.pop())
                if trial is not None:
                    return trial
            return ask(*args, **kwargs)

    study.ask = serialized  # type: ignore[method-assign]
    return study


def _take_waiting(study: optuna.Study, number: int) -> optuna.Trial | None:
    """Trial ``number`` of ``study``, set RUNNING, if it is still waiting (as ``Study.ask``
    takes the oldest waiting trial: one conditional write, so two processes never both take it)."""
    waiting = [t for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) if t.number == number]
    try:
        if not waiting or not study._storage.set_trial_state_values(waiting[0]._trial_id, state=TrialState.RUNNING):
            return None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    study._thread_local.cached_all_trials = None  # as ask does: the trial reads the storage afresh
    return optuna.Trial(study, waiting[0]._trial_id)


class GateAwarePruner(optuna.pruners.BasePruner):
    """``inner``, and once any trial of the study met the gate, every trial still running
    (in another lane) stops at its next epoch: its result can no longer change the outcome."""

    #: seconds between two looks at the study (one storage read), whatever the epochs' pace
    CHECK_EVERY = 1.0

    def __init__(self, inner: optuna.pruners.BasePruner, gate_cfg: Mapping[str, Any]) -> None:
        self.inner, self.gate_cfg = inner, gate_cfg
        self._checked, self._met = -math.inf, False

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if not self._met and time.monotonic() - self._checked >= self.CHECK_EVERY:
            self._checked, self._met = time.monotonic(), gate_met(study, self.gate_cfg)
        return self._met or self.inner.prune(study, trial)


class HelperLanes:
    """The extra lanes of a study with ``study.n_jobs`` > 1: ``python -m mlops_tune.lane``
    processes on the same storage and parent run, as scale-out workers are, started by the
    study's process and ended with it (a signal it gets is passed on; they die with it).

    They start before the study checks its config and data, import what they need meanwhile,
    take the checked data from :meth:`checked` (written by the study, not loaded again) and wait
    until :meth:`release` names the study and its parent run. The config travels in a file only
    this user can read; the passwords moved out of the URLs into the environment
    (``mlops_tune.secrets``) reach the lanes through it."""

    #: seconds a stopped lane has to close its runs before it is killed
    STOP_GRACE = 20
    SPEC, CHECKED, SPLITS, READY = "lane.json", "checked.json", "splits.npz", "ready.json"

    def __init__(self, cfg: Mapping[str, Any], n: int) -> None:
        import subprocess
        import sys
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="mlops-tune-lanes-")
        spec = os.path.join(self.folder, self.SPEC)
        self._write(spec, {"cfg": dict(cfg)})
        # not MLFLOW_RUN_ID (under `mlflow run`: the study's own run, which a lane must not resume)
        env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}, **threads.thread_env(n + 1),
               "MLOPS_TUNE_LIVE": "0"}
        self.procs = [subprocess.Popen([sys.executable, "-m", "mlops_tune.lane", spec, str(lane)], env=env,
                                       preexec_fn=_die_with_parent)
                      for lane in range(1, n + 1)]
        self.released = False

    @staticmethod
    def _write(path: str, content: Mapping[str, Any]) -> None:
        """Write JSON that appears whole, readable by this user only."""
        import json

        write_private(path, json.dumps(content))

    def checked(self, splits: Splits) -> None:
        """The config and the data passed every check: the lanes may build their study on ``splits``."""
        path = os.path.join(self.folder, self.SPLITS)
        save_splits(splits, path)
        self._write(os.path.join(self.folder, self.CHECKED), {"splits": path})

    def release(self, study_name: str, experiment_id: str, parent_run_id: str, started_at: float,
                first_trial: int | None = None) -> None:
        """The stores are open and the parent run exists: the lanes start taking trials (first
        ``first_trial``, if no other lane took it yet)."""
        self._write(os.path.join(self.folder, self.READY),
                    {"name": study_name, "experiment_id": experiment_id, "parent_run_id": parent_run_id,
                     "started_at": started_at, "first_trial": first_trial})
        self.released = True

    def wait(self) -> None:
        """Wait for every lane; one that failed fails the study (exit 3), as the study's own lane would."""
        try:
            codes = [proc.wait() for proc in self.procs]
        finally:
            self._clean()
        failed = [(lane, code) for lane, code in enumerate(codes, 1) if code != 0]
        if failed:
            lane, code = failed[0]
            message = f"trial lane {lane} of {len(codes) + 1} ended with exit code {code} (its error is above)"
            if code == 3:
                raise EnvironmentFault("trial lane", message)
            raise StudyAborted(message)

    def stop(self, exc: BaseException) -> None:
        """The study failed or was stopped: lanes still waiting are ended at once (they wrote
        nothing); lanes at work get the signal and close their runs as KILLED."""
        import signal
        import subprocess

        signum = getattr(exc, "signum", signal.SIGTERM)
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.send_signal(signum) if self.released else proc.kill()
        for proc in self.procs:
            try:
                proc.wait(self.STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._clean()

    def _clean(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def wait_for_study(spec: str, what: str = HelperLanes.READY, poll: float = 0.05) -> dict[str, Any] | None:
    """In a lane: the study's :meth:`HelperLanes.release` (``what=HelperLanes.CHECKED``: its
    :meth:`HelperLanes.checked`); None when the study is gone."""
    import json

    ready = os.path.join(os.path.dirname(spec), what)
    while not os.path.exists(ready):
        if not os.path.exists(spec):  # the study cleaned up without releasing us
            return None
        time.sleep(poll)
    with open(ready) as source:
        return dict(json.load(source))


def _die_with_parent() -> None:
    """In a lane's process before it starts: SIGTERM when the study's process dies (even by SIGKILL)."""
    import ctypes
    import signal

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def in_lanes(n: int, lane: Callable[[threading.Event], None], interrupt: Callable[[BaseException], None]) -> None:
    """Run ``lane(stop)`` ``n`` times at once, each in a thread (in this thread when ``n`` is 1).

    The first lane to fail stops the others (they see ``stop`` at their next trial) and its
    error is raised. A signal arrives in this thread: ``interrupt`` makes the lanes' trials stop
    too, and it is raised once they have.
    """
    stop, errors = threading.Event(), []
    if n == 1:
        lane(stop)
        return

    def body() -> None:
        try:
            lane(stop)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=body, name=f"mlops-tune-lane-{i}") for i in range(n)]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(0.2)
    except BaseException as exc:
        stop.set()
        interrupt(exc)
        for thread in threads:
            thread.join(60)
        raise
    if errors:
        raise errors[0]


def record_outcome(trial: optuna.Trial, outcome: TrialOutcome) -> None:
    """What the study keeps of a trial that trained: its times, size, latency and its logged model."""
    trial.set_user_attr(attrs.N_PARAMS, int(outcome.n_params))
    trial.set_user_attr(attrs.PREDICT_MS, round(outcome.predict_ms, 4))
    for key, seconds in ((attrs.SECONDS, outcome.seconds), (attrs.FIT_SECONDS, outcome.fit_seconds),
                         (attrs.EVALUATE_SECONDS, outcome.evaluate_seconds),
                         (attrs.REPORT_SECONDS, outcome.report_seconds)):
        trial.set_user_attr(key, round(seconds, 3))
    if outcome.model_uri:
        trial.set_user_attr(attrs.MODEL_URI, outcome.model_uri)


def failures_in_a_row(failures: list[str], trial: FrozenTrial) -> list[str]:
    """The errors of the model failures since the last trial that trained (a trial given back
    because its environment failed neither counts nor resets the count)."""
    if trial.state != TrialState.FAIL:
        return []
    if attrs.NOT_CHARGED in trial.user_attrs:
        return failures
    return [*failures, str(trial.user_attrs.get(attrs.ERROR, "see its MLflow run"))]


def give_back(trial: optuna.Trial, reason: str, budget: claims.Budget) -> None:
    """A trial that did not train: not charged, and queued to run again (best effort: the
    storage may be what failed; then the next start does it from the stale heartbeat)."""
    with contextlib.suppress(Exception):
        lineage = trial.user_attrs
        trial.set_user_attr(attrs.NOT_CHARGED, redact_text(reason)[:500])
        budget.release_text(str(lineage.get(attrs.TICKET, "")))
        retry = {k: v for k, v in lineage.items() if k in (attrs.PARENT, attrs.MUTATIONS)}
        trial.study.enqueue_trial(dict(trial.params), user_attrs={**retry, attrs.RETRY_OF: trial.number},
                                  skip_if_exists=False)


def trial_tags(study_name: str, trial: optuna.Trial) -> dict[str, str]:
    """The child run's tags: the study, the trial number and its lineage (mutation sampler)."""
    lineage = trial.user_attrs
    tags = {tracking.TAG_STUDY: study_name, tracking.TAG_TRIAL_NUMBER: str(trial.number),
            tracking.TAG_PARENT_TRIAL: str(lineage.get(attrs.PARENT, "")),
            tracking.TAG_MUTATIONS: str(lineage.get(attrs.MUTATIONS, ""))}
    return {key: value for key, value in tags.items() if value}


def judged(trial: FrozenTrial) -> bool:
    """Whether ``trial`` really trained and was judged: it counts against ``study.n_trials``.

    COMPLETE and PRUNED trials were; a FAIL trial was only when its model failed (the error
    is recorded). A trial failed by a dead worker's stale heartbeat, a failing environment
    or a signal was not: its ticket goes back to the budget and it runs again.
    """
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and attrs.ERROR in trial.user_attrs \
        and attrs.NOT_CHARGED not in trial.user_attrs


def best_value(study: optuna.Study, gate_cfg: Mapping[str, Any] | None = None) -> float:
    """The best validation accuracy so far of a trial within the gate's deployment limits (-inf before any)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max((t.value for t in done if t.value is not None and not gate.violations(t, gate_cfg or {})),
               default=-math.inf)


def gate_met(study: optuna.Study, gate_cfg: Mapping[str, Any]) -> bool:
    return any(gate.meets(t, gate_cfg) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def study_for_data(storage: optuna.storages.BaseStorage, name: str, fingerprint: str, policy: str) -> str:
    """The study to run on this data: ``name``, unless the stored study of that name ran on other
    data; then ``<name>-data-<fingerprint>`` (the old study left as it is) or, with
    ``study.on_data_change=fail``, exit 2."""
    try:
        stored = storage.get_study_user_attrs(storage.get_study_id_from_name(name)).get(attrs.DATA_FINGERPRINT)
    except KeyError:  # no such study yet
        return name
    if not fingerprint or stored in (None, fingerprint):  # an older study without one: adopts this data
        return name
    if policy == "fail":
        raise UsageError(f"study.name: study '{name}' ran on other data (fingerprint {stored}, now {fingerprint}); "
                         "set study.on_data_change=new_study or another study.name")
    new = f"{name}-data-{fingerprint[:8]}"
    try:
        storage.get_study_id_from_name(new)
        print(f"study '{name}' ran on other data (fingerprint {stored}); this data ({fingerprint}) "
              f"continues study '{new}'", flush=True)
    except KeyError:
        print(f"study '{name}': the data changed since it ran (fingerprint {stored} -> {fingerprint}): "
              f"this is a new study '{new}' (the old study is left as it is)", flush=True)
    return new


def confirm(trial: optuna.Trial, trial_cfg: Mapping[str, Any], outcome: TrialOutcome, context: TrialContext,
            gate_cfg: Mapping[str, Any], study_name: str) -> None:
    """``gate.confirm`` = K: retrain a trial that reached the threshold with K-1 more seeds on the
    same split (in this process, each a child run tagged ``mlops_tune.confirm_of``); record every
    value, the mean and the spread on the trial and its run. Its Optuna value stays the first."""
    import statistics

    values = [outcome.val_accuracy]
    for extra in range(1, int(gate_cfg["confirm"])):
        seed = int(trial_cfg["seed"]) + extra
        again = run_trial({**trial_cfg, "seed": seed}, experiment_id=context.experiment_id, splits=context.splits,
                          parent_run_id=context.parent_run_id, run_name=f"trial-{trial.number}-seed-{seed}",
                          tags={tracking.TAG_STUDY: study_name, TAG_CONFIRM_OF: str(trial.number)},
                          evaluate_test=False, should_log_model=lambda _value: False)
        values.append(again.val_accuracy)
    mean, spread = statistics.fmean(values), max(values) - min(values)
    trial.set_user_attr(attrs.CONFIRM_VALUES, [round(v, 6) for v in values])
    trial.set_user_attr(attrs.CONFIRMED_MEAN, mean)
    tracking.log_to(outcome.run_id, {"confirm_mean": mean, "confirm_spread": spread},
                    series={"seed_val_accuracy": values})
    verdict = "confirmed" if mean >= float(gate_cfg["threshold"]) else "NOT confirmed"
    print(f"[trial {trial.number:3d}] {verdict} over {len(values)} seeds: val_accuracy "
          f"{', '.join(f'{v:.4f}' for v in values)} (mean {mean:.4f}, spread {spread:.4f})", flush=True)


def study_params(cfg: Mapping[str, Any]) -> dict[str, str]:
    """The parent run's params: the gate, the study (not its storage URL) and the base model."""
    return {
        **tracking.flatten("gate", cfg["gate"]),
        **tracking.flatten("study", {k: v for k, v in cfg["study"].items() if k != "storage"}),
        **tracking.flatten("base", {"model": cfg["model"], "data": cfg["data"]}),
        "runner": cfg["runner"]["name"],
    }


def parent_run(study: optuna.Study, experiment_id: str, budget: claims.Budget) -> tuple[str, bool]:
    """The study's one parent run: created by the first worker, found by the others.

    Returns the run id and whether this worker created it.
    """
    # Under `mlflow run -e tune` the Project run is the study's run. Take the variable out
    # of the environment: MLflow would otherwise resume that run for the first trial.
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)
    known = study.user_attrs.get(attrs.PARENT_RUN)
    if known:
        return str(known), False
    name = study.study_name
    candidate = project_run or tracking.create_run(experiment_id, name, {tracking.TAG_STUDY: name})
    winner = budget.claim("parent_run", candidate)
    if winner != candidate:  # another worker was first: use its run, drop ours
        tracking.delete_run(candidate)
        return winner, False
    study.set_user_attr(attrs.PARENT_RUN, candidate)
    return candidate, True


def reconcile(study: optuna.Study, experiment_id: str, parent_run_id: str, budget: claims.Budget) -> None:
    """Fail trials of dead workers (stale heartbeat), give their tickets back, close their runs."""
    with contextlib.suppress(Exception):
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state == TrialState.FAIL and not judged(trial) and attrs.TICKET in trial.user_attrs:
            budget.release_text(str(trial.user_attrs[attrs.TICKET]))
    running = [t for t in trials if t.state == TrialState.RUNNING]
    live = {str(t.user_attrs[attrs.RUN]) for t in running if attrs.RUN in t.user_attrs}
    closed = tracking.close_orphan_runs(experiment_id, parent_run_id, live)
    if closed:
        print(f"closed {len(closed)} MLflow run(s) left RUNNING by a dead worker or a failed store", flush=True)


def finish(study: optuna.Study, cfg: Mapping[str, Any], space: SearchSpace, family: Any, splits: Splits,
           parent_run_id: str, budget: claims.Budget, worker: str) -> StudyResult:
    """The end of a study: the best trial judged on the test split, artifacts, verdict, promotion."""
    trials = study.get_trials(deepcopy=False)
    n_judged = sum(judged(t) for t in trials)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    passing = [t for t in done if gate.meets(t, cfg["gate"])]
    feasible = [t for t in done if not gate.violations(t, cfg["gate"])]
    best = max(passing or feasible or done, key=lambda t: t.value or 0.0, default=None)
    threshold = float(cfg["gate"]["threshold"])
    passed = bool(passing)
    metrics: dict[str, float] = {"n_trials": float(n_judged)}
    best_cfg = test_accuracy = model_uri = None
    if best is not None:
        best_cfg = trial_config(space.apply(cfg, space.decode(best.params)))
        model_uri = best.user_attrs.get(attrs.MODEL_URI)
        metrics["best_val_accuracy"] = float(best.value or 0.0)
        if model_uri and not tracking.model_ready(model_uri):  # written by another worker of the study
            print(f"study '{study.study_name}': the model of trial {best.number} was not written "
                  f"({model_uri}); it is not judged on the test split", flush=True)
            model_uri = None
        if model_uri:
            inputs = splits.as_input(family.input_kind)
            test_accuracy = family.accuracy(family.load_model(model_uri), inputs.x_test, inputs.y_test)
            metrics["test_accuracy"] = test_accuracy
    tracking.log_batch(metrics=metrics, tags={
        tracking.TAG_GATE: "passed" if passed else "missed",
        **({"mlops_tune.best_trial": str(best.number)} if best else {}),
    })
    result = StudyResult(
        study_name=study.study_name, gate_passed=passed, best_value=best.value if best else None,
        best_trial=best.number if best else None, test_accuracy=test_accuracy, n_trials=n_judged,
        threshold=threshold, parent_run_id=parent_run_id, best_config=best_cfg,
        gate_note="" if passed else gate.missed_because(done, cfg["gate"]),
        trials_csv=report.log_study_artifacts(study, best_cfg, str(cfg["gate"]["metric"]), threshold),
    )
    if passed and cfg["registry"]["promote"] and best is not None:
        result = _promote(best, result, str(cfg["registry"]["name"]), budget, worker, family, splits)
    result = replace(result, report_html=report.log_study_page(study, cfg, space, result))
    tracking.describe_study_run(study.study_name, report.verdict_line(result),
                                str(best.user_attrs.get(attrs.RUN, "")) if best else "")
    report.summary(study, result)
    return result


def _promote(best: FrozenTrial, result: StudyResult, name: str, budget: claims.Budget, worker: str,
             family: Any, splits: Splits) -> StudyResult:
    """Exactly one promotion per study, however many workers finish at once."""
    if budget.claim("promotion", worker) != worker:
        print("registry: the study's model was already promoted (by another worker or an earlier run)", flush=True)
        return result
    model_uri = best.user_attrs.get(attrs.MODEL_URI)
    if not model_uri or result.test_accuracy is None:
        print("registry: the best trial logged no model; nothing registered", flush=True)
        return result
    try:
        version, champion, previous = registry.promote(model_uri, name, result.test_accuracy, {
            "study": result.study_name, "trial": str(best.number), "val_accuracy": f"{best.value:.6f}"},
            judge=lambda version: judge_on(version, splits))
    except BaseException:  # a failed promotion must not use up the study's claim
        budget.release("promotion", worker)
        raise
    if previous is not None:  # both figures on the same test split, on the study's run
        tracking.log_batch(metrics={"previous_champion_test_accuracy": previous})
    return replace(result, registered_version=version, champion=champion)


def judge_on(version: Any, splits: Splits) -> float:
    """A registered model version's accuracy on this study's test split (its family from its run).

    Raises:
        EnvironmentFault: the store failed while loading it (not a reason to replace it).
    """
    import mlflow

    try:
        return _accuracy_of_version(version, splits)
    except Exception as exc:
        fault = faults.classify(exc, tracking_uri=mlflow.get_tracking_uri())
        if fault is not None:
            raise fault from exc
        raise


def _accuracy_of_version(version: Any, splits: Splits) -> float:
    import mlflow

    family_name = mlflow.MlflowClient().get_run(version.run_id).data.tags.get(tracking.TAG_FAMILY) if version.run_id \
        else None
    family = get_family(family_name) if family_name else None
    if family is None:
        raise ValueError("its run records no model family")
    inputs = splits.as_input(family.input_kind)
    return family.accuracy(family.load_model(f"models:/{version.name}/{version.version}"), inputs.x_test,
                           inputs.y_test)
