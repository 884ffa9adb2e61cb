"""The tuning loop: one Optuna study of mutations of the base model, gated by accuracy.

:class:`Study` validates everything first (nothing is written for a bad config); its
:meth:`Study.run` opens or resumes the study, enqueues the base model as trial 0, runs
trials through the configured runner until the gate is met or the budget is spent, and
finishes with the test-split evaluation of the best model, the study's artifacts and
the registry promotion. Several workers may run the same study (see ``claims``).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlops_tune import claims, faults, locks, report, tracking
from mlops_tune.data import Splits, load_splits
from mlops_tune.errors import StudyAborted, TrialFailed, UsageError, first_line
from mlops_tune.families import get_family
from mlops_tune.mutate import ATTR_MUTATIONS, ATTR_PARENT, MutationSampler
from mlops_tune.runners import Runner, TrialContext, get_runner
from mlops_tune.search import SearchSpace
from mlops_tune.secrets import redact_text
from mlops_tune.trial import trial_config

ATTR_PARENT_RUN = "mlflow_parent_run_id"
ATTR_RUN = "mlflow_run_id"
ATTR_MODEL_URI = "model_uri"
ATTR_ERROR = "error"
#: the trial ticket (``claims``) a trial holds: ``name value``
ATTR_TICKET = "ticket"
#: why a trial did not train (the environment failed, the process was stopped): not charged
ATTR_NOT_CHARGED = "not_charged"
#: the number of the trial a retried trial repeats
ATTR_RETRY_OF = "retry_of"


def judged(trial: FrozenTrial) -> bool:
    """Whether ``trial`` really trained and was judged: it counts against ``study.n_trials``.

    COMPLETE and PRUNED trials were; a FAIL trial was only when its model failed (the error
    is recorded). A trial failed by a dead worker's stale heartbeat, a failing environment
    or a signal was not: its ticket goes back to the budget and it runs again.
    """
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and ATTR_ERROR in trial.user_attrs \
        and ATTR_NOT_CHARGED not in trial.user_attrs


@dataclass(frozen=True)
class StudyResult:
    """How a study ended."""

    study_name: str
    gate_passed: bool
    best_value: float | None
    best_trial: int | None
    test_accuracy: float | None
    n_trials: int
    threshold: float
    parent_run_id: str
    registered_version: str | None = None
    champion: bool = False
    #: the best trial's config (model, data, seed, tracking), for ``mlops-train``
    best_config: dict[str, Any] | None = None
    #: every trial of the study as CSV (also logged to the parent run)
    trials_csv: str = ""


# ----------------------------------------------------------------------------- building blocks


def make_storage(study_cfg: Mapping[str, Any]) -> optuna.storages.BaseStorage:
    """The Optuna storage named by ``study.storage`` (RDB URL, or ``journal:///path``).

    RDB storages get a heartbeat, so a trial whose worker died is failed after the grace period.

    Raises:
        UsageError: the storage cannot be opened (the message names the host, not the password).
    """
    url = str(study_cfg["storage"])
    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            return JournalStorage(JournalFileBackend(claims.journal_path(url)))
        with locks.sqlite_schema(url):  # processes starting together on a new file
            return _open_rdb(url, study_cfg)
    except Exception as exc:
        host = urlsplit(url).hostname or url.split("://", 1)[-1].split("?")[0]
        reason = first_line(exc, 200)
        raise UsageError(f"study.storage: cannot open the Optuna storage at {tracking.redact(host)} "
                         f"({tracking.redact(reason)})") from None


def _check_writable(url: str) -> None:
    """A SQLite or journal file must be writable before the study starts (else exit 2)."""
    path = locks.sqlite_path(url) or (Path(claims.journal_path(url)).absolute() if url.startswith("journal:") else None)
    if path is None or not path.parent.is_dir():
        return
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise UsageError(f"study.storage: {path} is read-only (read-only file system or no write "
                         "permission); point study.storage at a writable file")


def _open_rdb(url: str, study_cfg: Mapping[str, Any], attempts: int = 4) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; retried when workers race to create a new database.

    The loser of that race sees a unique-key error and finds the tables on its next try.
    """
    for attempt in range(1, attempts + 1):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=_engine_kwargs(url),
                heartbeat_interval=int(study_cfg["heartbeat_interval"]),
                grace_period=int(study_cfg["grace_period"]),
                # a dead worker's trial is failed, then run again once by whoever asks next
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
        except Exception as exc:
            if attempt == attempts or "IntegrityError" not in type(exc).__name__ + str(exc):
                raise
            time.sleep(0.5 * attempt)
    raise AssertionError("attempts must be >= 1")


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 5}, "pool_pre_ping": True}
    return {}


def make_sampler(study_cfg: Mapping[str, Any], space: SearchSpace, seed: int) -> optuna.samplers.BaseSampler:
    """``tpe`` (seeded, warm-started by the base trial), ``random``, ``mutation`` or ``{_target_: ...}``."""
    sampler = study_cfg["sampler"]
    if sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True, group=True)
    if sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sampler == "mutation":
        return MutationSampler(space, seed=seed)
    return _instantiate(sampler, "study.sampler", optuna.samplers.BaseSampler)


def make_pruner(study_cfg: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """``median`` (default), ``hyperband``, ``none`` or ``{_target_: optuna.pruners.X, ...}``."""
    pruner = study_cfg["pruner"]
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=4)
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, reduction_factor=3)
    if pruner == "none":
        return optuna.pruners.NopPruner()
    return _instantiate(pruner, "study.pruner", optuna.pruners.BasePruner)


def _instantiate(spec: Any, key: str, base: type) -> Any:
    from hydra.utils import instantiate

    try:
        obj = instantiate(spec)
    except Exception as exc:
        raise UsageError(f"{key}: cannot build {spec.get('_target_')!r} ({str(exc).splitlines()[0]})") from None
    if not isinstance(obj, base):
        raise UsageError(f"{key}: {spec.get('_target_')!r} is not an Optuna {base.__name__}")
    return obj


# ----------------------------------------------------------------------------- the study


class Study:
    """One study of one base model; :meth:`run` is the whole loop."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        """Validate and prepare everything that can fail on bad input, writing nothing."""
        self.cfg = cfg
        self.name = str(cfg["study"]["name"])
        self.threshold = float(cfg["gate"]["threshold"])
        if cfg["registry"]["promote"]:
            tracking.check_registry_name(cfg["registry"]["name"])
        self.space = SearchSpace.from_config((cfg.get("search") or {}).get("space"), cfg)
        self.family = get_family(cfg["model"]["family"])
        self.sampler = make_sampler(cfg["study"], self.space, int(cfg["seed"]))
        self.pruner = make_pruner(cfg["study"])
        self.splits: Splits = load_splits(cfg["data"], int(cfg["seed"]))
        # rejects e.g. a CNN on tabular data, or a base model too large for model.max_params, now
        self.family.check_data(cfg["model"], self.splits.as_input(self.family.input_kind))
        self.consecutive_failures = 0
        self.last_error = ""
        self.storage_url = str(cfg["study"]["storage"])
        self.tracking_uri = str(cfg["tracking"]["uri"])
        # stores that cannot be written are bad set-ups (exit 2), found before anything is created
        tracking.check_reachable(self.tracking_uri)
        _check_writable(self.storage_url)
        self.claim_key = self.name
        #: the ticket held for the trial about to start (name, value), until the trial has it
        self.ticket: tuple[str, str] | None = None
        #: identifies this process among the workers of a study (claims, logs)
        self.worker = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.runner: Runner = get_runner(cfg["runner"])
        try:
            self.runner.check(cfg)
        except BaseException:
            self.runner.close()
            raise

    # -------------------------------------------------------------- lifecycle
    def run(self) -> StudyResult:
        """Run the study. Raises :class:`EnvironmentFault` when a store or the disk fails meanwhile."""
        try:
            storage = make_storage(self.cfg["study"])
            experiment_id = tracking.connect(self.tracking_uri, self.cfg["tracking"]["experiment"])
            with faults.classified(tracking_uri=self.tracking_uri, storage_url=self.storage_url):
                return self._run(storage, experiment_id)
        finally:
            self.runner.close()

    def _run(self, storage: optuna.storages.BaseStorage, experiment_id: str) -> StudyResult:
        study = optuna.create_study(
            study_name=self.name, storage=storage, direction="maximize",
            sampler=self.sampler, pruner=self.pruner, load_if_exists=True,
        )
        existing = len(study.get_trials(deepcopy=False))
        # claims are per study instance: a deleted and recreated study starts afresh
        self.claim_key = f"{self.name}#{study._study_id}"
        if claims.claim(self.storage_url, self.claim_key, "base_trial", self.worker) == self.worker:
            study.enqueue_trial(self.space.encode(self.space.base), user_attrs={ATTR_PARENT: "none"})
        else:
            # joining a study (another worker, or a resume): a fresh sampler RNG, so that
            # concurrent workers seeded alike do not propose the same points
            self.sampler.reseed_rng()
        parent_run_id, created = self._parent_run(study, experiment_id)
        with tracking.run(experiment_id, self.name, resume_run_id=parent_run_id,
                          tags={tracking.TAG_STUDY: self.name}) as run_id:
            if created:
                tracking.log_batch(params={
                    **tracking.flatten("gate", self.cfg["gate"]),
                    **tracking.flatten("study", {k: v for k, v in self.cfg["study"].items() if k != "storage"}),
                    **tracking.flatten("base", {"model": self.cfg["model"], "data": self.cfg["data"]}),
                    "runner": self.cfg["runner"]["name"],
                })
            self._reconcile(study, experiment_id, run_id)
            context = TrialContext(experiment_id, run_id, self.splits, lambda: _best_value(study),
                                   storage_url=self.storage_url, pruner=self.cfg["study"]["pruner"])
            report.study_header(self.name, self.cfg, self.space, existing)
            self._optimize(study, context)
            self._reconcile(study, experiment_id, run_id)
            return self._finish(study, run_id)

    def _parent_run(self, study: optuna.Study, experiment_id: str) -> tuple[str, bool]:
        """The study's one parent run: created by the first worker, found by the others.

        Returns the run id and whether this worker created it.
        """
        # Under `mlflow run -e tune` the Project run is the study's run. Take the variable out
        # of the environment: MLflow would otherwise resume that run for the first trial.
        project_run = os.environ.pop("MLFLOW_RUN_ID", None)
        known = study.user_attrs.get(ATTR_PARENT_RUN)
        if known:
            return str(known), False
        candidate = project_run or tracking.create_run(experiment_id, self.name, {tracking.TAG_STUDY: self.name})
        winner = claims.claim(self.storage_url, self.claim_key, "parent_run", candidate)
        if winner != candidate:  # another worker was first: use its run, drop ours
            tracking.delete_run(candidate)
            return winner, False
        study.set_user_attr(ATTR_PARENT_RUN, candidate)
        return candidate, True

    def _optimize(self, study: optuna.Study, context: TrialContext) -> None:
        """Run trials until the gate is met, the budget (tickets) or the time is spent."""
        n_total = int(self.cfg["study"]["n_trials"])
        timeout = self.cfg["study"]["timeout"]
        limit = int(self.cfg["study"]["max_consecutive_failures"])
        started = time.perf_counter()

        def objective(trial: optuna.Trial) -> float:
            return self._run_trial(trial, context)

        def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            report.trial_line(study, trial, self.threshold, time.perf_counter() - started)
            if trial.state == TrialState.FAIL:
                self.consecutive_failures += 1
                self.last_error = str(trial.user_attrs.get(ATTR_ERROR, "see the trial's MLflow run"))
            else:
                self.consecutive_failures = 0

        # One trial per optimize() call: the checks below run before every ask, so workers
        # sharing the study stop at their next trial boundary once any trial meets the gate.
        while not self._gate_met(study):
            if self.consecutive_failures >= limit:
                raise StudyAborted(f"study '{self.name}' stopped after {limit} failed trials in a row "
                                   f"(last error: {self.last_error})")
            if timeout is not None and time.perf_counter() - started >= timeout:
                break
            self.ticket = claims.claim_ticket(self.storage_url, self.claim_key, n_total, self.worker)
            if self.ticket is None:
                break  # study.n_trials trials have been started, by this worker or others
            try:
                study.optimize(objective, n_trials=1, callbacks=[after_trial], catch=(TrialFailed,),
                               gc_after_trial=False)
            finally:
                if self.ticket is not None:  # no trial took it (stopped or failed before the trial began)
                    self._release(*self.ticket)
                    self.ticket = None

    def _run_trial(self, trial: optuna.Trial, context: TrialContext) -> float:
        """The objective: run one trial; judge a failure as the model's or the environment's."""
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            trial.set_user_attr(ATTR_TICKET, " ".join(ticket))
        point = self.space.suggest(trial)
        trial_cfg = trial_config(self.space.apply(self.cfg, point))
        attrs = trial.study._storage.get_trial_user_attrs(trial._trial_id)
        tags = {
            tracking.TAG_STUDY: self.name,
            tracking.TAG_TRIAL_NUMBER: str(trial.number),
            tracking.TAG_PARENT_TRIAL: str(attrs.get(ATTR_PARENT, "")),
            tracking.TAG_MUTATIONS: str(attrs.get(ATTR_MUTATIONS, "")),
        }
        try:
            outcome = self.runner.run(trial_cfg, trial, context, {k: v for k, v in tags.items() if v})
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt as exc:
            self._give_back(trial, attrs, str(exc) or "interrupted")
            raise
        except Exception as exc:
            fault = faults.classify(exc, tracking_uri=self.tracking_uri, storage_url=self.storage_url)
            if fault is not None:
                self._give_back(trial, attrs, str(fault))
                raise fault from exc
            message = first_line(exc, 480) if str(exc).strip() else ""
            trial.set_user_attr(ATTR_ERROR, redact_text(f"{type(exc).__name__}: {message}")[:500])
            raise TrialFailed(message) from exc
        trial.set_user_attr("seconds", round(outcome.seconds, 3))
        trial.set_user_attr("fit_seconds", round(outcome.fit_seconds, 3))
        trial.set_user_attr("evaluate_seconds", round(outcome.evaluate_seconds, 3))
        if outcome.model_uri:
            trial.set_user_attr(ATTR_MODEL_URI, outcome.model_uri)
        return outcome.val_accuracy

    def _give_back(self, trial: optuna.Trial, attrs: Mapping[str, Any], reason: str) -> None:
        """A trial that did not train: not charged, and queued to run again (best effort: the
        storage may be what failed; then the next start does it from the stale heartbeat)."""
        with contextlib.suppress(Exception):
            trial.set_user_attr(ATTR_NOT_CHARGED, redact_text(reason)[:500])
            self._release_trial_ticket(str(attrs.get(ATTR_TICKET, "")))
            retry_attrs = {k: v for k, v in attrs.items() if k in (ATTR_PARENT, ATTR_MUTATIONS)}
            trial.study.enqueue_trial(dict(trial.params), user_attrs={**retry_attrs, ATTR_RETRY_OF: trial.number},
                                      skip_if_exists=False)

    def _release_trial_ticket(self, ticket: str) -> None:
        name, _, value = ticket.partition(" ")
        if name and value:
            self._release(name, value)

    def _release(self, name: str, value: str) -> None:
        with contextlib.suppress(Exception):
            claims.release(self.storage_url, self.claim_key, name, value)

    def _gate_met(self, study: optuna.Study) -> bool:
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return any(t.value is not None and t.value >= self.threshold for t in done)

    def _reconcile(self, study: optuna.Study, experiment_id: str, parent_run_id: str) -> None:
        """Fail trials of dead workers (stale heartbeat), give their tickets back, close their runs."""
        with contextlib.suppress(Exception):
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        for trial in trials:
            if trial.state == TrialState.FAIL and not judged(trial) and ATTR_TICKET in trial.user_attrs:
                self._release_trial_ticket(str(trial.user_attrs[ATTR_TICKET]))
        running = [t for t in trials if t.state == TrialState.RUNNING]
        live = {str(t.user_attrs[ATTR_RUN]) for t in running if ATTR_RUN in t.user_attrs}
        closed = tracking.close_orphan_runs(experiment_id, parent_run_id, live)
        if closed:
            print(f"closed {len(closed)} MLflow run(s) left RUNNING by a dead worker or a failed store",
                  flush=True)

    # -------------------------------------------------------------- the end of a study
    def _finish(self, study: optuna.Study, parent_run_id: str) -> StudyResult:
        trials = study.get_trials(deepcopy=False)
        n_judged = sum(judged(t) for t in trials)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        best = max(done, key=lambda t: t.value or 0.0, default=None)
        passed = best is not None and best.value is not None and best.value >= self.threshold
        result = StudyResult(
            study_name=self.name, gate_passed=passed, best_value=best.value if best else None,
            best_trial=best.number if best else None, test_accuracy=None, n_trials=n_judged,
            threshold=self.threshold, parent_run_id=parent_run_id,
        )
        metrics: dict[str, float] = {"n_trials": float(n_judged)}
        best_cfg = None
        if best is not None:
            best_cfg = trial_config(self.space.apply(self.cfg, self.space.decode(best.params)))
            result = replace(result, best_config=best_cfg)
            model_uri = best.user_attrs.get(ATTR_MODEL_URI)
            metrics["best_val_accuracy"] = float(best.value or 0.0)
            if model_uri:
                model = self.family.load_model(model_uri)
                inputs = self.splits.as_input(self.family.input_kind)
                test_accuracy = self.family.accuracy(model, inputs.x_test, inputs.y_test)
                metrics["test_accuracy"] = test_accuracy
                result = replace(result, test_accuracy=test_accuracy)
        tracking.log_batch(metrics=metrics, tags={
            tracking.TAG_GATE: "passed" if passed else "missed",
            **({"mlops_tune.best_trial": str(best.number)} if best else {}),
        })
        result = replace(result, trials_csv=report.log_study_artifacts(study, best_cfg))
        if passed and self.cfg["registry"]["promote"] and best is not None:
            # exactly one promotion per study, however many workers finish at once
            if claims.claim(self.storage_url, self.claim_key, "promotion", self.worker) == self.worker:
                try:
                    result = self._promote(best, result)
                except BaseException:  # a failed promotion must not use up the study's claim
                    self._release("promotion", self.worker)
                    raise
            else:
                print("registry: the study's model was already promoted (by another worker or an earlier run)",
                      flush=True)
        report.summary(study, result)
        return result

    def _promote(self, best: FrozenTrial, result: StudyResult) -> StudyResult:
        model_uri = best.user_attrs.get(ATTR_MODEL_URI)
        if not model_uri or result.test_accuracy is None:
            print("registry: the best trial logged no model; nothing registered", flush=True)
            return result
        name = str(self.cfg["registry"]["name"])
        version = tracking.register(model_uri, name, result.test_accuracy, {
            "study": self.name, "trial": str(best.number), "val_accuracy": f"{best.value:.6f}",
        })
        current = tracking.champion_test_accuracy(name)
        champion = tracking.beats(result.test_accuracy, current)
        if champion:
            tracking.set_champion(name, version)
            print(f"registry: {name} version {version} is now '{tracking.CHAMPION_ALIAS}' "
                  f"(test_accuracy {result.test_accuracy:.4f}"
                  + (f" > {current:.4f})" if current is not None else ")"), flush=True)
        else:
            print(f"registry: {name} version {version} registered; '{tracking.CHAMPION_ALIAS}' stays "
                  f"(its test_accuracy {current:.4f} >= {result.test_accuracy:.4f})", flush=True)
        return replace(result, registered_version=version, champion=champion)


def _best_value(study: optuna.Study) -> float:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max((t.value for t in done if t.value is not None), default=-math.inf)
