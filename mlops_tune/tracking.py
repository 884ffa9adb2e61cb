"""MLflow: connecting, run lifecycle, batched logging, the registry and its aliases.

Layout (DESIGN.md): one parent run per study, one child run per trial. Everything that
touches MLflow goes through this module, so the layout lives in one place.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from mlops_tune.errors import UsageError

TAG_STUDY = "mlops_tune.study"
TAG_GATE = "mlops_tune.gate"
TAG_TRIAL_NUMBER = "mlops_tune.trial_number"
TAG_STATE = "mlops_tune.state"
TAG_ERROR = "mlops_tune.error"
TAG_FAMILY = "mlops_tune.family"
TAG_PARENT_TRIAL = "mlops_tune.parent_trial"
TAG_MUTATIONS = "mlops_tune.mutations"
TAG_MODEL_URI = "mlops_tune.model_uri"
CHAMPION_ALIAS = "champion"

_log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to print or log)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def absolute_sqlite(uri: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/cwd/rel.db``; other URIs unchanged.

    Trials run in other processes (and folders) must open the same file.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/") or uri == prefix + ":memory:":
        return uri
    path, _, query = uri[len(prefix):].partition("?")
    absolute = str(Path(path).expanduser().absolute())
    return f"{prefix}{absolute}" + (f"?{query}" if query else "")


def connect(uri: str, experiment: str) -> str:
    """Point MLflow at ``uri`` and return the id of ``experiment`` (created if needed).

    Raises:
        UsageError: the store cannot be opened or the server does not answer.
    """
    import mlflow

    quiet_libraries()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    project_run = os.environ.get("MLFLOW_RUN_ID")
    if project_run:  # started by `mlflow run`: log into the experiment of that Project run
        try:
            experiment_id = mlflow.MlflowClient().get_run(project_run).info.experiment_id
            mlflow.set_experiment(experiment_id=experiment_id)
            return str(experiment_id)
        except Exception as exc:
            raise UsageError(f"MLFLOW_RUN_ID: run {project_run} not found at {redact(uri)} "
                             f"({_one_line(exc)})") from None
    try:
        return str(mlflow.set_experiment(experiment).experiment_id)
    except Exception as exc:
        raise UsageError(f"tracking.uri: cannot open {redact(uri)} ({_one_line(exc)})") from None


def quiet_libraries() -> None:
    """Keep library chatter (INFO logs, experimental-API warnings) out of the progress output."""
    import warnings

    # MLflow prints a "View run" link per run for HTTP stores: noise per trial, and the URL
    # would show a password given in tracking.uri. Our summary prints the redacted URI.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # a progress bar per model download (registry, test evaluation) from a tracking server
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Pickle-format advice on every sklearn model: we log models we just trained ourselves.
    logging.getLogger("mlflow.sklearn").setLevel(logging.ERROR)
    # images without git (the trial containers): the run simply has no git tags
    logging.getLogger("mlflow.utils.git_utils").setLevel(logging.ERROR)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    except ImportError:  # pragma: no cover - optuna is a core dependency
        pass


def check_reachable(uri: str) -> None:
    """Raise :class:`UsageError` when ``uri`` is an HTTP(S) server that does not answer."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port:
            netloc += f":{parts.port}"
        request = urllib.request.Request(f"{urlunsplit(parts._replace(netloc=netloc)).rstrip('/')}/health")
        if parts.username is not None:  # user:password@ in the URI: send it as basic auth, like MLflow
            token = base64.b64encode(f"{parts.username}:{parts.password or ''}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=5):
                pass
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UsageError(f"tracking.uri: cannot reach the MLflow server at {redact(uri)} ({reason})") from None
    elif parts.scheme == "sqlite":
        path = uri.split(":///", 1)[-1]
        if path and path != ":memory:" and not Path(path).expanduser().absolute().parent.is_dir():
            raise UsageError(f"tracking.uri: folder of the SQLite file does not exist: {redact(uri)}")
    elif parts.scheme not in ("", "file", "postgresql", "mysql", "mssql", "databricks") and "+" not in parts.scheme:
        raise UsageError(f"tracking.uri: unsupported scheme '{parts.scheme}' in {redact(uri)}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Flatten nested config into MLflow params: ``{"model.hidden_units": "[8, 16]", ...}``."""
    if isinstance(value, Mapping):
        flat: dict[str, str] = {}
        for key, sub in value.items():
            flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), sub))
        return flat
    return {prefix: json.dumps(value) if isinstance(value, (list, tuple)) else str(value)}


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

    # MLFLOW_RUN_ID set: `mlflow run` (or runner=mlflow) created the run; MLflow resumes it
    given = resume_run_id or os.environ.get("MLFLOW_RUN_ID")
    active = mlflow.start_run(
        run_id=resume_run_id,
        experiment_id=None if given else experiment_id,
        run_name=None if given else name,
        nested=mlflow.active_run() is not None,
        parent_run_id=parent_run_id if mlflow.active_run() is None else None,
        tags=dict(tags or {}),
    )
    try:
        yield active.info.run_id
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        with contextlib.suppress(Exception):
            mlflow.set_tag(TAG_ERROR, _one_line(exc) if str(exc) else type(exc).__name__)
            mlflow.log_text("".join(traceback.format_exception(exc)), "error.txt")
        mlflow.end_run(status)
        raise
    else:
        mlflow.end_run("FINISHED")


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
) -> None:
    """Log params, final metrics, per-epoch metrics (``step`` = epoch) and tags in one call."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    metric_rows = [
        Metric(key, float(value), now, step)
        for step, epoch in enumerate(history)
        for key, value in epoch.items()
        if math.isfinite(value)
    ]
    # Final values go at the last epoch's step with a later timestamp, so that MLflow's
    # "latest" value of e.g. val_accuracy is the final evaluation, not the last epoch's.
    final_step = max(len(history) - 1, 0)
    metric_rows += [Metric(k, float(v), now + 1, final_step)
                    for k, v in (metrics or {}).items() if math.isfinite(v)]
    run_id = mlflow.active_run().info.run_id  # type: ignore[union-attr]
    client = mlflow.MlflowClient()
    # The store caps one batch at 1000 metrics / 100 params.
    params_list = [Param(k, v[:6000]) for k, v in (params or {}).items()]
    tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    client.log_batch(run_id, metrics=metric_rows[:1000], params=params_list[:100], tags=tag_list)
    for i in range(1000, len(metric_rows), 1000):
        client.log_batch(run_id, metrics=metric_rows[i:i + 1000])
    for i in range(100, len(params_list), 100):
        client.log_batch(run_id, params=params_list[i:i + 100])


def log_config(cfg: Mapping[str, Any], artifact: str = "config.yaml") -> None:
    """Log a resolved config as YAML, with passwords in URLs redacted."""
    import mlflow
    import yaml

    mlflow.log_text(yaml.safe_dump(redact_config(cfg), sort_keys=False), artifact)


def redact_config(value: Any) -> Any:
    """A copy of a plain config with every URL password replaced by ``***``."""
    if isinstance(value, Mapping):
        return {key: redact_config(sub) for key, sub in value.items()}
    if isinstance(value, list):
        return [redact_config(sub) for sub in value]
    return redact(value) if isinstance(value, str) and "://" in value else value


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
        if child.info.run_id not in live_run_ids:
            client.set_tag(child.info.run_id, TAG_STATE, "FAIL")
            client.set_tag(child.info.run_id, TAG_ERROR, "worker died mid-trial (stale heartbeat)")
            client.set_terminated(child.info.run_id, "KILLED")
            closed.append(child.info.run_id)
    return closed


def champion_test_accuracy(registry_name: str) -> float | None:
    """Test accuracy recorded on the current ``champion`` version, or None if there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(registry_name, CHAMPION_ALIAS)
    except MlflowException:
        return None
    value = version.tags.get("test_accuracy")
    return float(value) if value is not None else -math.inf


def register(model_uri: str, registry_name: str, test_accuracy: float, tags: Mapping[str, str]) -> str:
    """Register ``model_uri`` under ``registry_name``; return the new version."""
    import mlflow

    version = mlflow.register_model(
        model_uri, registry_name, tags={"test_accuracy": f"{test_accuracy:.6f}", **tags},
    )
    return str(version.version)


def set_champion(registry_name: str, version: str) -> None:
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(registry_name, CHAMPION_ALIAS, version)
