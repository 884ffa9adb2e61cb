"""``mlops-train`` end to end: real MLflow store, real data, subprocesses as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import heavy_imports_after, mlflow_client, mlflow_runs

pytestmark = pytest.mark.usefixtures("workdir")


def test_knn_on_breast_cancer_logs_one_complete_run(train, workdir: Path) -> None:
    result = train("model=knn", "data=breast_cancer")
    assert result.code == 0, result.stderr
    assert "val_accuracy=" in result.stdout
    [run] = mlflow_runs(workdir)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.n_neighbors"] == "1"
    assert params["model._target_"] == "sklearn.neighbors.KNeighborsClassifier"
    assert params["data.name"] == "breast_cancer"
    assert params["seed"] == "42"
    metrics = run.data.metrics
    for key in ("val_accuracy", "test_accuracy", "train_accuracy", "fit_seconds", "n_params"):
        assert key in metrics, key
    assert 0.8 < metrics["val_accuracy"] <= 1.0
    client = mlflow_client(workdir)
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [0, 0]  # the one "epoch" and the final evaluation
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text())
    assert config["model"]["n_neighbors"] == 1 and config["data"]["name"] == "breast_cancer"
    # the model is logged with its flavor, a signature and explicit requirements
    import mlflow

    [logged] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert logged.source_run_id == run.info.run_id
    model_dir = _download_model(logged.model_id, workdir)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert "sklearn" in mlmodel["flavors"] and "signature" in mlmodel
    assert mlmodel["metadata"]["classes"] == ["malignant", "benign"]
    requirements = (model_dir / "requirements.txt").read_text()
    assert "scikit-learn==" in requirements


def test_knn_path_never_imports_tensorflow(workdir: Path) -> None:
    code, heavy, stderr = heavy_imports_after("train", ["model=knn", "data=wine"], workdir)
    assert code == 0, stderr
    assert heavy == [], f"TensorFlow/Keras imported on a KNN trial: {heavy[:5]}"


def test_csv_with_string_labels_and_spaced_column(train, workdir: Path) -> None:
    rng = np.random.default_rng(0)
    n = 120
    species = np.array(["setosa", "versicolor", "virginica"])[rng.integers(0, 3, n)]
    centers = {"setosa": 0.0, "versicolor": 3.0, "virginica": 6.0}
    frame = pd.DataFrame({
        "petal length": [centers[s] + rng.normal() for s in species],
        "width": [centers[s] / 2 + rng.normal() for s in species],
        "species": species,
    })
    frame.to_csv(workdir / "flowers.csv", index=False)
    result = train("model=knn", "data=csv", f"data.path={workdir / 'flowers.csv'}", "data.target=species")
    assert result.code == 0, result.stderr
    [run] = mlflow_runs(workdir)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val_accuracy"] > 0.8
    import mlflow

    [logged] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    model_dir = _download_model(logged.model_id, workdir)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert mlmodel["metadata"]["classes"] == ["setosa", "versicolor", "virginica"]
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert inputs[0]["tensor-spec"]["shape"] == [-1, 2]


def test_any_sklearn_classifier_is_one_yaml_file(train, workdir: Path) -> None:
    result = train("model=random_forest", "data=wine", "model.n_estimators=20")
    assert result.code == 0, result.stderr
    [run] = mlflow_runs(workdir)
    assert run.data.params["model._target_"] == "sklearn.ensemble.RandomForestClassifier"
    assert run.data.metrics["n_params"] > 0


@pytest.mark.slow
def test_default_ann_logs_per_epoch_metrics(train, workdir: Path) -> None:
    result = train("model.epochs=4", "model.early_stopping_patience=0")
    assert result.code == 0, result.stderr
    [run] = mlflow_runs(workdir)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_units"] == "[8]"
    client = mlflow_client(workdir)
    for key in ("val_accuracy", "train_accuracy", "loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        if key == "val_accuracy":  # per-epoch values plus the final evaluation at the last step
            assert steps == [0, 1, 2, 3, 3]
        else:
            assert steps == [0, 1, 2, 3], key
    final = client.get_metric_history(run.info.run_id, "val_accuracy")[-1]
    assert run.data.metrics["val_accuracy"] == final.value
    assert run.data.metrics["n_params"] == 64 * 8 + 8 + 8 * 10 + 10  # Dense(8) + softmax(10)


@pytest.mark.slow
def test_cnn_trains_on_digits_as_images(train, workdir: Path) -> None:
    result = train("model=cnn", "model.epochs=2")
    assert result.code == 0, result.stderr
    [run] = mlflow_runs(workdir)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.conv_filters"] == "[32, 32]"
    assert run.data.metrics["val_accuracy"] > 0.1


def _download_model(model_id: str, folder: Path) -> Path:
    import mlflow

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", tracking_uri=uri))


def test_mlflow_ui_in_that_directory_shows_the_run(train, workdir: Path) -> None:
    """`mlflow ui` started where mlops-train ran serves the run (real server on 127.0.0.1)."""
    import json as _json
    import urllib.request

    from devtools import devservices

    assert train("model=knn", "data=iris").code == 0
    [run] = mlflow_runs(workdir)
    server, url = devservices.start_mlflow_server("sqlite:///mlflow.db", workdir / "mlartifacts",
                                                  log=workdir / "ui.log", cwd=workdir)
    try:
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}", timeout=30) as r:
            served = _json.load(r)["run"]
        with urllib.request.urlopen(f"{url}/", timeout=30) as r:
            page = r.read().decode()
    finally:
        devservices.stop_process(server)
    assert served["info"]["status"] == "FINISHED"
    assert {p["key"] for p in served["data"]["params"]} >= {"model.n_neighbors", "data.name"}
    assert "<html" in page.lower()
