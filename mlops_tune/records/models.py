"""A trial's model as an MLflow logged model: named when the trial ends (its URI is the trial's
result), written later in a background thread (``mlops_tune.records.backlog``), and waited for
by whoever needs its files (the study's end judges the best one)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping

from mlops_tune.runtime.faults import not_found


def start_model(run_id: str, experiment_id: str, name: str, params: Mapping[str, str]) -> str:
    """A model of ``run_id`` that is yet to be written (MLflow's PENDING logged model, linked to
    the run as its output); returns its ``models:/`` URI. A flavor's ``log_model(model_id=...)``
    writes and finalizes it (``Family.log_model``), in the background (``mlops_tune.records.backlog``)."""
    import mlflow
    from mlflow.entities import LoggedModelOutput

    model = mlflow.initialize_logged_model(name=name, source_run_id=run_id, params=dict(params),
                                           experiment_id=experiment_id)
    mlflow.MlflowClient().log_outputs(run_id, models=[LoggedModelOutput(model.model_id, step=0)])
    return f"models:/{model.model_id}"


def model_id_of(model_uri: str) -> str | None:
    """The logged model id of a ``models:/m-...`` URI (None for a registry or a run URI)."""
    rest = model_uri.removeprefix("models:/")
    return rest if rest != model_uri and "/" not in rest and rest.startswith("m-") else None


def fail_model(model_uri: str) -> None:
    """Mark a model whose writing failed as FAILED (best effort: the store may be what failed)."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    model_id = model_id_of(model_uri)
    if model_id is not None:
        with contextlib.suppress(Exception):
            mlflow.MlflowClient().finalize_logged_model(model_id, LoggedModelStatus.FAILED)


def model_ready(model_uri: str, grace: float = 30.0, poll: float = 0.2) -> bool:
    """Whether the model behind ``model_uri`` is written. While it is PENDING and less than
    ``grace`` seconds old this waits (another worker of the study may be writing it, see
    ``mlops_tune.records.backlog``: its writes start within seconds); False when its writing failed,
    or it is still PENDING after that (its writer died, or the store failed under it before
    the writer could mark it FAILED), or it is not in the store (a store replaced). Other URIs: True."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    model_id = model_id_of(model_uri)
    if model_id is None:
        return True
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    while True:
        try:
            model = client.get_logged_model(model_id)
        except MlflowException as exc:  # gone with its store (a tracking database replaced)
            if not_found(exc):
                return False
            raise
        if model.status == LoggedModelStatus.READY:
            return True
        age = time.time() - model.creation_timestamp / 1000
        if model.status != LoggedModelStatus.PENDING or age >= grace:
            return False
        time.sleep(min(poll, grace - age))


