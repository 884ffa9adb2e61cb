"""tracking: flattening configs into params, batches larger than one store call takes, new stores."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import mlflow
import pytest

from mlops_tune.records import stores, tracking


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


def test_a_run_under_a_parent_run_that_is_not_active_does_not_read_the_parent(
        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's trial run is a child of the study's run, which is not active in the worker:
    the run is nested by its tag alone, without a request for the parent run (one a trial)."""
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment_id = tracking.connect(uri, "nesting")
        client = mlflow.MlflowClient()
        parent = client.create_run(experiment_id).info.run_id
        reads: list[str] = []
        get_run = mlflow.MlflowClient.get_run
        monkeypatch.setattr(mlflow.MlflowClient, "get_run",
                            lambda self, run_id: reads.append(run_id) or get_run(self, run_id))
        with tracking.run(experiment_id, "trial-1", parent_run_id=parent, tags={"t": "1"}) as child:
            assert mlflow.active_run().info.run_id == child
        monkeypatch.undo()
        assert parent not in reads
        run = client.get_run(child)
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["t"] == "1"
        assert run.info.status == "FINISHED" and run.info.run_name == "trial-1"
        assert [r.info.run_id for r in client.search_runs(
            [experiment_id], f"tags.mlflow.parentRunId = '{parent}'")] == [child]
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


def test_a_new_sqlite_store_is_a_copy_of_a_migrated_one_with_its_own_default_experiment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first new store on a machine makes the template (MLflow's migrations), the next ones
    copy it: same schema, and MLflow's Default experiment points at the new store's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first, second = tmp_path / "one", tmp_path / "two"
    for folder in (first, second):
        folder.mkdir()
    monkeypatch.chdir(first)
    tracking.connect(f"sqlite:///{first / 'mlflow.db'}", "x")
    templates = list((tmp_path / "cache" / "mlops-tune").glob("mlflow-*.db"))
    assert len(templates) == 1
    monkeypatch.chdir(second)
    try:
        assert stores.seed_new_sqlite_store(f"sqlite:///{second / 'mlflow.db'}")
        assert not stores.seed_new_sqlite_store(f"sqlite:///{second / 'mlflow.db'}")  # exists: left alone
        experiment_id = tracking.connect(f"sqlite:///{second / 'mlflow.db'}", "x")
        client = mlflow.MlflowClient()
        assert client.get_experiment("0").artifact_location == str(second / "mlruns" / "0")
        with tracking.run(experiment_id, "r") as run_id:
            tracking.log_batch(params={"p": "1"})
        assert client.get_run(run_id).data.params == {"p": "1"}
        schema = "SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name"
        with sqlite3.connect(first / "mlflow.db") as a, sqlite3.connect(second / "mlflow.db") as b:
            assert a.execute(schema).fetchall() == b.execute(schema).fetchall()
            assert a.execute("SELECT * FROM alembic_version").fetchall() == \
                b.execute("SELECT * FROM alembic_version").fetchall()
    finally:
        mlflow.set_tracking_uri(None)


def test_a_broken_template_leaves_the_new_store_to_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.version

    cache = tmp_path / "cache" / "mlops-tune"
    cache.mkdir(parents=True)
    (cache / f"mlflow-{mlflow.version.VERSION}.db").write_text("not a database")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    try:
        experiment_id = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}", "x")
        assert mlflow.MlflowClient().get_experiment(experiment_id).name == "x"
        # the damaged template was made again
        with sqlite3.connect(cache / f"mlflow-{mlflow.version.VERSION}.db") as conn:
            assert conn.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)
    finally:
        mlflow.set_tracking_uri(None)


def test_model_logging_is_warmed_once_in_a_thread_of_its_own() -> None:
    """What MLflow's first log_model does once per process (map the installed distributions to
    their modules) is done by warm_model_logging, in a fresh process, and only once."""
    import subprocess
    import sys

    script = (
        "import threading\n"
        "from mlflow.utils import requirements_utils as r\n"
        "from mlops_tune.records import tracking\n"
        "assert r._MODULES_TO_PACKAGES is None\n"
        "tracking.warm_model_logging(); tracking.warm_model_logging()\n"
        "assert [t.name for t in threading.enumerate()].count('mlops-tune-warm-mlflow') <= 1\n"
        "tracking.wait_model_logging()\n"
        "assert r._MODULES_TO_PACKAGES and r._PACKAGES_TO_MODULES['mlflow'] == 'mlflow'\n"
        "print('warm')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "warm"
