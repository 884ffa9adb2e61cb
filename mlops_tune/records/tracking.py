"""MLflow runs: connecting to the store, run lifecycle, batched logging, closing orphans.

Layout (docs/architecture.md): one parent run per study, one child run per trial. Runs are
made here; the registry and its champion alias are ``mlops_tune.records.registry``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mlops_tune.records.stores import (
    check_reachable,
    configure_http,
    fail_fast,
    seed_new_sqlite_store,
    write_ahead_sqlite,
)
from mlops_tune.runtime import faults, locks
from mlops_tune.runtime.errors import UsageError, first_line
from mlops_tune.runtime.faults import classify, not_found
from mlops_tune.runtime.logs import quiet_libraries
from mlops_tune.runtime.paths import shown
from mlops_tune.runtime.retries import retrying
from mlops_tune.runtime.secrets import redact, redact_config, redact_text

TAG_STUDY = "mlops_tune.study"
TAG_GATE = "mlops_tune.gate"
TAG_TRIAL_NUMBER = "mlops_tune.trial_number"
TAG_STATE = "mlops_tune.state"
TAG_ERROR = "mlops_tune.error"
TAG_FAMILY = "mlops_tune.family"
TAG_PARENT_TRIAL = "mlops_tune.parent_trial"
TAG_MUTATIONS = "mlops_tune.mutations"
TAG_MODEL_URI = "mlops_tune.model_uri"
#: MLflow's run name tag (set with a run's result: the runs list shows it, "trial-3: 0.9833")
RUN_NAME = "mlflow.runName"
#: ``worker`` on a warm worker's own Project run (a child of the study's run, not a trial)
TAG_ROLE = "mlops_tune.role"
#: on a trial's run: the warm worker's run that ran it
TAG_WORKER_RUN = "mlops_tune.worker_run"
#: ``environment`` on a run that ended because the environment failed, not the model
TAG_FAULT = "mlops_tune.fault"



def connect(uri: str, experiment: str) -> str:
    """Point MLflow at ``uri`` and return the id of ``experiment`` (created if needed).

    Raises:
        UsageError: the store cannot be opened, written or reached.
    """
    import mlflow

    quiet_libraries()
    configure_http()
    check_reachable(uri)
    write_ahead_sqlite(uri)
    # where `mlflow run` created its Project run (set_tracking_uri overwrites the variable)
    project_store = os.environ.get("MLFLOW_TRACKING_URI", "")
    mlflow.set_tracking_uri(uri)
    project_run = os.environ.get("MLFLOW_RUN_ID")
    if project_run:  # started by `mlflow run`: log into the experiment of that Project run
        try:
            experiment_id = mlflow.MlflowClient().get_run(project_run).info.experiment_id
            mlflow.set_experiment(experiment_id=experiment_id)
            return str(experiment_id)
        except Exception as exc:
            hint = (f"; `mlflow run` created it in {redact(project_store)}: set MLFLOW_TRACKING_URI="
                    f"{redact(uri)} for `mlflow run` instead of tracking.uri in -P overrides"
                    if project_store and project_store != uri else "")
            raise UsageError(f"MLFLOW_RUN_ID: run {project_run} not found at {redact(uri)}{hint} "
                             f"({first_line(exc)})") from None
    try:
        # processes starting together on a new SQLite file would race to create its schema
        with locks.sqlite_schema(uri):
            seed_new_sqlite_store(uri)
            experiment_id = _set_experiment(experiment)
    except Exception as exc:
        if getattr(exc, "error_code", "") == "INVALID_PARAMETER_VALUE":  # the store answered: the name is refused
            raise UsageError(f"tracking.experiment: {shown(experiment)!r} cannot be used at {redact(uri)} "
                             f"({shown(first_line(exc), 120)})") from None
        raise UsageError(f"tracking.uri: cannot open {redact(uri)} ({first_line(exc)})") from None
    _check_artifact_folder(experiment_id)
    return experiment_id


def preload(uri: str) -> None:
    """Import what :func:`connect` and the runs will need for ``uri`` (seconds of imports), touching
    no store: a study's helper process does while the study checks its config and data."""
    import importlib

    import mlflow  # noqa: F401

    scheme = urlsplit(uri).scheme.split("+", 1)[0] or "file"
    store = {"http": "rest_store", "https": "rest_store", "file": "file_store"}.get(scheme, "sqlalchemy_store")
    with contextlib.suppress(ImportError):  # only a head start: connect imports what it needs anyway
        importlib.import_module(f"mlflow.store.tracking.{store}")



def _set_experiment(name: str, attempts: int = 3) -> str:
    """``mlflow.set_experiment``; a concurrent creator of the same experiment is not an error."""
    import mlflow

    for attempt in retrying(lambda exc: "RESOURCE_ALREADY_EXISTS" in str(exc) or "already exists" in str(exc),
                            attempts, 0.2):
        with attempt:
            return str(mlflow.set_experiment(name).experiment_id)
    raise AssertionError("attempts must be >= 1")


def _check_artifact_folder(experiment_id: str) -> None:
    """A local artifact folder must be writable before the first run exists."""
    import mlflow

    location = mlflow.MlflowClient().get_experiment(experiment_id).artifact_location
    parts = urlsplit(location)
    if parts.scheme not in ("", "file"):
        return
    folder = Path(parts.path if parts.scheme else location)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        raise UsageError(f"tracking.uri: the artifact folder {folder} is not writable "
                         f"({'read-only file system or ' if existing.is_dir() else ''}no permission)")


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Flatten nested config into MLflow params: ``{"model.hidden_units": "[8, 16]", ...}``.

    A list of numbers also gets numeric params the MLflow UI can sort and plot (it compares
    ``"[64, 32]"`` as text): ``model.hidden_units.len`` = 2 (layers) and ``model.hidden_units.sum`` = 96 (units).
    """
    if isinstance(value, Mapping):
        flat: dict[str, str] = {}
        for key, sub in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return flat
    if isinstance(value, (list, tuple)):
        flat = {prefix: json.dumps(value)}
        if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            flat.update({f"{prefix}.len": str(len(value)), f"{prefix}.sum": str(sum(value))})
        return flat
    return {prefix: str(value)}


@contextlib.contextmanager
def run(
    experiment_id: str,
    name: str,
    *,
    parent_run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    resume_run_id: str | None = None,
) -> Iterator[str]:
    """An MLflow run that ends FINISHED, or FAILED (KILLED on Ctrl-C) with the error as a tag.

    Yields the run id; the run is the active run inside the block.
    """
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    # MLFLOW_RUN_ID set: `mlflow run` (or runner=mlflow) created the run; MLflow resumes it
    given = resume_run_id or os.environ.get("MLFLOW_RUN_ID")
    nested = mlflow.active_run() is not None
    tags = dict(tags or {})
    if parent_run_id and not nested and not given:
        # the tag that nests a run, as start_run(parent_run_id=...) sets it, which first reads the
        # parent run (a request a trial in a worker, whose parent run is not active here)
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    active = mlflow.start_run(
        run_id=resume_run_id,
        experiment_id=None if given else experiment_id,
        run_name=None if given else name,
        nested=nested,
        tags=tags,
    )
    try:
        yield active.info.run_id
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        fault = classify(exc) if isinstance(exc, Exception) else None
        if fault is not None and fault.component == "tracking":
            fail_fast()  # the store is gone: one try per closing call, not minutes of retries
        tags = {TAG_ERROR: redact_text(first_line(exc))}
        if fault is not None:
            tags[TAG_FAULT] = "environment"
        if not faults.closing_failed():  # a store that did not answer one closing call is not asked again
            try:
                mlflow.set_tags(tags)
                if fault is None and status == "FAILED":  # a full disk or a dead server would fail this too
                    mlflow.log_text(redact_text("".join(traceback.format_exception(exc))), "error.txt")
            except Exception as closing:
                if classify(closing) is not None:
                    faults.closing_unanswered(first_line(closing))
        if faults.closing_failed():  # end_run below only has to take the run off MLflow's stack
            fail_fast(timeout=0.1)
        with contextlib.suppress(Exception):  # MLflow pops the run first: nothing stays active
            mlflow.end_run(status)
        raise
    else:
        mlflow.end_run("FINISHED")


def finished_child(experiment_id: str, parent_run_id: str, tag: str, value: str) -> Any:
    """A FINISHED child run of ``parent_run_id`` tagged ``tag`` = ``value`` (the newest), or None."""
    import mlflow

    runs = mlflow.MlflowClient().search_runs([experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{tag}` = '{value}' "
        "and attributes.status = 'FINISHED'"), max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def run_exists(run_id: str, experiment_id: str) -> bool:
    """Whether ``run_id`` is a live run of ``experiment_id`` in the tracking store (False: never
    there, deleted, or in another experiment: a store that was replaced). Other errors raise."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if not_found(exc):
            return False
        raise
    return run.info.lifecycle_stage == "active" and str(run.info.experiment_id) == str(experiment_id)


def experiment_of(run_id: str) -> str:
    import mlflow

    return str(mlflow.MlflowClient().get_run(run_id).info.experiment_id)


def create_run(experiment_id: str, name: str, tags: Mapping[str, str]) -> str:
    """Create a run without making it active (its owner resumes it with :func:`run`)."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    created = mlflow.MlflowClient().create_run(experiment_id, tags={MLFLOW_RUN_NAME: name, **tags}, run_name=name)
    return str(created.info.run_id)


def delete_run(run_id: str) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    client.set_terminated(run_id, "KILLED")
    client.delete_run(run_id)


def log_batch(
    params: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    history: Sequence[Mapping[str, float]] = (),
    tags: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> None:
    """Log params, final metrics, per-epoch metrics (``step`` = epoch) and tags in one call
    (to ``run_id``, else the active run)."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    metric_rows = [
        Metric(key, float(value), now, step)
        for step, epoch in enumerate(history)
        for key, value in epoch.items()
        if math.isfinite(value)
    ]
    # A final value of a per-epoch metric goes at the last epoch's step with a later timestamp, so
    # that MLflow's "latest" value of e.g. val_accuracy is the final evaluation, not the last
    # epoch's; a one-value metric (fit_seconds, n_params ...) at step 0 (no one-point curve at step N).
    final_step, per_epoch = max(len(history) - 1, 0), {key for epoch in history for key in epoch}
    metric_rows += [Metric(k, float(v), now + 1, final_step if k in per_epoch else 0)
                    for k, v in (metrics or {}).items() if math.isfinite(v)]
    run_id = run_id or mlflow.active_run().info.run_id  # type: ignore[union-attr]
    client = mlflow.MlflowClient()
    # The store caps one batch at 1000 metrics / 100 params.
    params_list = [Param(k, v[:6000]) for k, v in (params or {}).items()]
    tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    client.log_batch(run_id, metrics=metric_rows[:1000], params=params_list[:100], tags=tag_list)
    for i in range(1000, len(metric_rows), 1000):
        client.log_batch(run_id, metrics=metric_rows[i:i + 1000])
    for i in range(100, len(params_list), 100):
        client.log_batch(run_id, params=params_list[i:i + 100])


#: the data fingerprint (``data.fingerprint``) of a run and of its study
TAG_DATA = "mlops_tune.data_fingerprint"


def log_data(name: str, fingerprint: str, x: Any, y: Any, source: str, run_id: str | None = None) -> None:
    """Record the training data on ``run_id`` (else the active run) the MLflow way (the UI's
    Datasets column): a dataset named after ``data.name`` whose digest is the fingerprint of
    the loaded data."""
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = mlflow.data.from_numpy(x, targets=y, name=name, digest=fingerprint,
                                     source=CodeDatasetSource({"mlops_tune.data": source}))
    run_id = run_id or mlflow.active_run().info.run_id  # type: ignore[union-attr]
    # what mlflow.log_input does for the active run, for any run (MLflow's own example of log_inputs)
    entry = DatasetInput(Dataset(**dataset.to_dict()), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])
    # MLflow's SQL store looks the dataset up, then inserts it: workers of one study logging the
    # same new dataset at once collide on its key; the loser's retry finds it and only links it
    for attempt in retrying(lambda exc: any(word in str(exc) for word in ("UNIQUE constraint", "IntegrityError",
                                                                          "duplicate key")), 4, 0.1):
        with attempt:
            mlflow.MlflowClient().log_inputs(run_id, [entry])



def log_to(run_id: str, metrics: Mapping[str, float], series: Mapping[str, Sequence[float]] | None = None) -> None:
    """Log metrics (and per-step series, ``step`` = index) to a run that need not be active or running."""
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    rows = [Metric(key, float(value), now, 0) for key, value in metrics.items() if math.isfinite(value)]
    rows += [Metric(key, float(value), now, step) for key, values in (series or {}).items()
             for step, value in enumerate(values) if math.isfinite(value)]
    mlflow.MlflowClient().log_batch(run_id, metrics=rows)


_warming: list[threading.Thread] = []


def warm_model_logging() -> None:
    """Once per process, in a thread: do now what MLflow's first ``log_model`` would.

    It checks the requirements a model is logged with against the installed packages, and to
    do so maps every installed distribution to its modules once per process: 1.2 s here, on
    the first trial that logs a model (a study's first trial always does). Started while a
    Keras model trains (its epochs run outside Python's lock), it costs that trial nothing;
    :func:`wait_model_logging` waits for it before a model is logged, so it is never done twice.
    """
    if _warming:
        return

    def work() -> None:
        with contextlib.suppress(Exception):  # MLflow's own helper: if it moved, log_model does it
            from mlflow.utils.requirements_utils import _init_packages_to_modules_map

            _init_packages_to_modules_map()

    # not a daemon: the interpreter's exit waits for it (a second at most) rather than
    # finalizing under a thread that is still inside C code
    _warming.append(threading.Thread(target=work, name="mlops-tune-warm-mlflow"))
    _warming[0].start()


def wait_model_logging() -> None:
    """Wait for :func:`warm_model_logging`, if it was started."""
    for thread in _warming:
        thread.join()


def artifact_uri() -> str:
    """The active run's artifact location (known since the run began: no request)."""
    import mlflow

    return str(mlflow.active_run().info.artifact_uri)  # type: ignore[union-attr]


def log_config(cfg: Mapping[str, Any], artifact: str = "config.yaml", run_id: str | None = None,
               artifact_uri: str | None = None) -> None:
    """Log a resolved config as YAML, with passwords in URLs redacted: to the run whose artifact
    location is ``artifact_uri`` (one request), else to ``run_id``, else to the active run."""
    import mlflow
    import yaml

    text = yaml.safe_dump(redact_config(cfg), sort_keys=False)
    if artifact_uri is None:
        run_id = run_id or mlflow.active_run().info.run_id  # type: ignore[union-attr]
        mlflow.MlflowClient().log_text(run_id, text, artifact)
        return
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    # what MlflowClient.log_text does, without first asking the server for the run's location
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(artifact).name
        path.write_text(text, encoding="utf-8")
        parent = str(Path(artifact).parent)
        get_artifact_repository(artifact_uri, tracking_uri=mlflow.get_tracking_uri()).log_artifact(
            str(path), None if parent == "." else parent)
