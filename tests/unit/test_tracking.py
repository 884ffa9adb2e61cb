"""tracking: flattening configs into params, and batches larger than one store call takes."""

from __future__ import annotations

from pathlib import Path

import mlflow

from mlops_tune import tracking


def test_flatten_nests_keys_and_keeps_lists_as_json() -> None:
    """A list of numbers also gets its length and sum as numbers (the MLflow UI sorts "[64, 32]" as text)."""
    assert tracking.flatten("model", {"hidden_units": [8, 16], "opt": {"lr": 0.1}, "scaler": None}) == {
        "model.hidden_units": "[8, 16]", "model.hidden_units.len": "2", "model.hidden_units.sum": "24",
        "model.opt.lr": "0.1", "model.scaler": "None"}
    assert tracking.flatten("model", {"names": ["a", "b"]}) == {"model.names": '["a", "b"]'}


def test_batches_over_the_store_limits_are_chunked_and_the_final_value_is_latest(workdir: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        experiment_id = tracking.connect(f"sqlite:///{workdir / 'mlflow.db'}", "chunks")
        params = {f"p{i:03d}": str(i) for i in range(250)}  # the store takes 100 params per call
        history = [{"val_accuracy": i / 1000, "loss": 1 - i / 1000} for i in range(700)]  # 1400 rows
        with tracking.run(experiment_id, "big") as run_id:
            tracking.log_batch(params=params, metrics={"val_accuracy": 0.5}, history=history, tags={"t": 1})
        run = mlflow.MlflowClient().get_run(run_id)
        assert run.data.params == params and run.data.tags["t"] == "1"
        steps = mlflow.MlflowClient().get_metric_history(run_id, "val_accuracy")
        assert len(steps) == 701  # 700 epochs + the final evaluation at the last step
        assert run.data.metrics["val_accuracy"] == 0.5  # the final value, not the last epoch's
        assert len(mlflow.MlflowClient().get_metric_history(run_id, "loss")) == 700
    finally:
        mlflow.set_tracking_uri(None)


def test_workers_logging_the_same_new_dataset_at_once_all_succeed(workdir: Path) -> None:
    """MLflow's store looks a dataset up, then inserts it: concurrent first loggers collide."""
    import threading

    import numpy as np

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = tracking.connect(uri, "datasets")
        client = mlflow.MlflowClient()
        run_ids = [client.create_run(experiment_id).info.run_id for _ in range(8)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def log(run_id: str) -> None:
            try:
                with mlflow.start_run(run_id=run_id, nested=True):
                    barrier.wait()
                    tracking.log_data("iris", "feedfacecafebeef", np.zeros((4, 2)), np.arange(4), "test")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=log, args=(run_id,)) for run_id in run_ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        for run_id in run_ids:
            [dataset_input] = client.get_run(run_id).inputs.dataset_inputs
            assert dataset_input.dataset.digest == "feedfacecafebeef"
    finally:
        mlflow.set_tracking_uri(None)
