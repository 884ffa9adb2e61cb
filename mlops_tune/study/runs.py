"""What a study keeps beside its trials: which study runs on this data, its one parent run,
the parent run's params, and the bookkeeping of dead workers (reconcile)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlops_tune.records import claims, tracking
from mlops_tune.runtime import keys
from mlops_tune.runtime.errors import StudyAborted, UsageError
from mlops_tune.search import gate
from mlops_tune.search.gate import judged

#: a study's parent run: what trial 0 was (``base`` or the champion it started from)
TAG_START = "mlops_tune.start_from"


def objective_of(cfg: Mapping[str, Any]) -> dict[str, str]:
    """What a study's trials answer, flattened: the base model and its fixed training settings,
    the search space, the data's settings (not its path: its content is the data fingerprint),
    the split's seed and the gate's metric. Trials of two objectives are not comparable; the
    gate's threshold and limits are a judgement of the trials, not part of it."""
    model = {k: v for k, v in cfg["model"].items() if k != "max_params"}  # a refusal limit, not the model
    data = {k: v for k, v in cfg["data"].items() if k != "path"}
    flat = {**tracking.flatten("model", model), **tracking.flatten("search", cfg.get("search") or {}),
            **tracking.flatten("data", data), "seed": str(cfg["seed"]), "gate.metric": str(cfg["gate"]["metric"])}
    return {k: v for k, v in flat.items() if not k.endswith((".len", ".sum"))}  # a list's summary params


def _digest(objective: Mapping[str, str]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(dict(objective), sort_keys=True).encode()).hexdigest()[:8]


def remember_identity(study: optuna.Study, fingerprint: str, cfg: Mapping[str, Any]) -> None:
    """Record what the study answers (data fingerprint, objective) when it has no record yet,
    and label it for optuna-dashboard: its value's name (``val_accuracy``, not "Objective 0")
    and its gate (the study user attribute ``gate``)."""
    import warnings

    gate = f"val_accuracy >= {float(cfg['gate']['threshold']):.4f}"
    for key, value in ((keys.DATA_FINGERPRINT, fingerprint), (keys.OBJECTIVE, objective_of(cfg)), ("gate", gate)):
        if value and key not in study.user_attrs:
            study.set_user_attr(key, value)
    if study.metric_names is None:
        with warnings.catch_warnings():  # experimental in Optuna 5: the dashboard reads it
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["val_accuracy"])


def study_for(storage: optuna.storages.BaseStorage, name: str, fingerprint: str, objective: Mapping[str, str],
              policy: str) -> str:
    """The study to run: ``name``, unless the stored study of that name ran on other data or
    answers another objective (:func:`objective_of`: e.g. other ``model.epochs``); then
    ``<name>-data-<fingerprint>`` / ``<name>-<digest>`` (the old study left as it is) or, with
    ``study.on_data_change=fail``, exit 2. A stored study without a record adopts this one."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:  # no such study yet
        return name
    stored_attrs = storage.get_study_user_attrs(study_id)
    stored = stored_attrs.get(keys.DATA_FINGERPRINT)
    if fingerprint and stored not in (None, fingerprint):
        return _moved(storage, name, f"{name}-data-{fingerprint[:8]}", policy, ("ran on other data", "the data"),
                      f"fingerprint {stored} -> {fingerprint}")
    was = stored_attrs.get(keys.OBJECTIVE)
    if was is None:
        storage.set_study_user_attr(study_id, keys.OBJECTIVE, dict(objective))
        return name
    if dict(was) == dict(objective):
        return name
    changed = sorted(k for k in {*was, *objective} if was.get(k) != objective.get(k))
    what = ", ".join(f"{k} {was.get(k, '(none)')} -> {objective.get(k, '(none)')}" for k in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return _moved(storage, name, f"{name}-{_digest(objective)}", policy, ("answers another objective", "its objective"),
                  what + more)


def _moved(storage: optuna.storages.BaseStorage, name: str, new: str, policy: str, why: tuple[str, str],
           what: str) -> str:
    """``new``, said in one line (``why``: what the old study did, what changed), or exit 2 (policy fail)."""
    why, subject = why
    if policy == "fail":
        raise UsageError(f"study.name: study '{name}' {why} ({what}); set study.on_data_change=new_study "
                         "or another study.name")
    try:
        storage.get_study_id_from_name(new)
        print(f"study '{name}' {why} ({what}); this run continues study '{new}'", flush=True)
    except KeyError:
        print(f"study '{name}': {subject} changed since it ran ({what}): this is a new study '{new}' (the old "
              "study is left as it is)", flush=True)
    return new


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
    known = study.user_attrs.get(keys.PARENT_RUN)
    if known and tracking.run_exists(str(known), experiment_id):
        return str(known), False
    name = study.study_name
    candidate = project_run or tracking.create_run(experiment_id, name, {tracking.TAG_STUDY: name})
    winner = budget.claim("parent_run", candidate)
    if known and winner == known:  # the recorded run is gone (store replaced, run deleted): ours takes over
        winner = budget.take_over("parent_run", str(known), candidate)
        if winner == candidate:
            print(f"study '{name}': its MLflow run {known} is gone from the tracking store (replaced, or the run "
                  f"deleted): a new run {candidate} records the study from here", flush=True)
    if winner != candidate:  # another worker was first: use its run, drop ours
        tracking.delete_run(candidate)
        return winner, False
    study.set_user_attr(keys.PARENT_RUN, candidate)
    return candidate, True


def reconcile(study: optuna.Study, experiment_id: str, parent_run_id: str, budget: claims.Budget) -> None:
    """Fail trials of dead workers (stale heartbeat), give their tickets back, close their runs."""
    with contextlib.suppress(Exception):
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    release_tickets(trials, budget)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    live = {str(t.user_attrs[keys.RUN]) for t in running if keys.RUN in t.user_attrs}
    closed = close_orphan_runs(experiment_id, parent_run_id, live)
    if closed:
        print(f"closed {len(closed)} MLflow run(s) left RUNNING by a dead worker or a failed store", flush=True)


#: the study's best trial run (moved to a newer best by a resumed study)
TAG_BEST = "mlops_tune.best"


def describe_study_run(study_name: str, verdict: str, best_run_id: str, headline: str = "") -> None:
    """Make the active (parent) run readable in the MLflow UI: named after its verdict and the
    study (``PASSED 0.9861 knn-digits``; also a Project run that MLflow named), its description
    the verdict in plain words (the runs list shows it as it is), the best child run tagged."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    run = mlflow.active_run()
    if run is None:
        return
    client = mlflow.MlflowClient()
    description = (f"{verdict}. Study report: the report.html artifact of this run (trials, optimization "
                   "history, mutation lineage, a link to every trial's run).")
    # the verdict first: the runs list's name column shows some 18 characters
    tracking.log_batch(tags={tracking.RUN_NAME: f"{headline} {study_name}" if headline else study_name,
                             MLFLOW_RUN_NOTE: description})
    if not best_run_id or not tracking.run_exists(best_run_id, run.info.experiment_id):  # gone with a replaced store
        return
    earlier = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.`{TAG_BEST}` = 'true'")
    for other in earlier:
        if other.info.run_id != best_run_id:
            client.set_tag(other.info.run_id, TAG_BEST, "false")
    client.set_tag(best_run_id, TAG_BEST, "true")


def close_orphan_runs(experiment_id: str, parent_run_id: str, live_run_ids: set[str]) -> list[str]:
    """Mark KILLED every RUNNING child run of ``parent_run_id`` not in ``live_run_ids``.

    A worker killed mid-trial leaves its trial's run RUNNING; its Optuna trial is failed
    by the heartbeat, and this closes the run to match.
    """
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    closed = []
    for child in runs:
        # a warm worker's own run ends with its process (it stops by itself when its study is gone)
        if child.info.run_id not in live_run_ids and child.data.tags.get(tracking.TAG_ROLE) != "worker":
            client.set_tag(child.info.run_id, tracking.TAG_STATE, "FAIL")
            client.set_tag(child.info.run_id, tracking.TAG_ERROR, "worker died mid-trial (stale heartbeat)")
            client.set_terminated(child.info.run_id, "KILLED")
            closed.append(child.info.run_id)
    return closed


def release_tickets(trials: list[FrozenTrial], budget: claims.Budget) -> None:
    """Give back the tickets of ``trials`` that failed without being judged (a dead worker's)."""
    for trial in trials:
        if trial.state == TrialState.FAIL and not judged(trial) and keys.TICKET in trial.user_attrs:
            budget.release_text(str(trial.user_attrs[keys.TICKET]))


def others_running(study: optuna.Study, storage: Any, gate_cfg: Mapping[str, Any], budget: claims.Budget,
                   pause: Callable[[float], object] = time.sleep) -> bool:
    """Wait while trials that other processes run keep the study's verdict open (the gate not
    met, and this process's worker found no ticket left): a live worker elsewhere, or a dead one
    whose heartbeat is not yet ``study.grace_period`` old. Returns True once a dead worker's trial
    was taken back (failed as stale, queued again, its ticket free): the caller runs it. So a
    verdict never judges a budget still in flight: exit 1 means the budget trained.

    Raises:
        StudyAborted: trials are in flight and the storage keeps no heartbeats to tell a live
            process from a dead one (a journal file): no verdict can be given yet.
    """
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    announced = False
    while True:
        trials = study.get_trials(deepcopy=False)
        running = [t.number for t in trials if t.state == TrialState.RUNNING]
        if not running or gate.met([t for t in trials if t.state == TrialState.COMPLETE], gate_cfg):
            return False
        if not interval:
            raise StudyAborted(f"study '{study.study_name}': trial(s) {running} are still RUNNING in another "
                               "process, and this storage keeps no heartbeats to tell whether it lives: no "
                               "verdict yet; rerun once they ended")
        if not announced:
            print(f"study '{study.study_name}': waiting for trial(s) {running}, run by another process (a dead "
                  "process's trial is taken back once its heartbeat is study.grace_period old) ...", flush=True)
            announced = True
        with contextlib.suppress(Exception):  # the storage failing: the next read meets it
            optuna.storages.fail_stale_trials(study)
        reaped = [t for t in study.get_trials(deepcopy=False) if t.number in running and t.state == TrialState.FAIL]
        if reaped:
            release_tickets(reaped, budget)
            print(f"study '{study.study_name}': trial(s) {[t.number for t in reaped]} of a dead process taken "
                  "back: they run again here", flush=True)
            return True
        pause(float(interval))
