"""Bad input: exit code 2, one line naming the problem, no traceback, nothing left RUNNING."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import mlflow_runs


def _csv(folder: Path, name: str, frame: pd.DataFrame) -> str:
    path = folder / name
    frame.to_csv(path, index=False)
    return str(path)


def _frames(folder: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    return {
        "good": _csv(folder, "good.csv", pd.DataFrame(
            {"a": rng.normal(size=60), "b": rng.normal(size=60), "label": ["x", "y"] * 30})),
        "text": _csv(folder, "text.csv", pd.DataFrame(
            {"a": rng.normal(size=60), "color": ["red", "blue"] * 30, "label": ["x", "y"] * 30})),
        "one_class": _csv(folder, "one.csv", pd.DataFrame({"a": rng.normal(size=60), "label": ["x"] * 60})),
        "tiny": _csv(folder, "tiny.csv", pd.DataFrame(
            {"a": [1.0, 2.0, 3.0, 4.0, 5.0], "label": ["x", "y", "x", "y", "x"]})),
    }


CASES = {
    "unknown model group": (["model=nosuch"], "model/nosuch"),
    "unknown data group": (["data=nosuch"], "data/nosuch"),
    "unknown key added with +": (["+model.unitz=3"], "model.unitz: unknown key"),
    "unknown key without +": (["foo=1"], "foo"),
    "missing data.path": (["data=csv"], "data.path: required"),
    "missing file": (["data=csv", "data.path=/nonexistent/file.csv", "data.target=label"], "file not found"),
    "missing target column": (["model=knn", "data=csv", "data.path={good}", "data.target=nope"], "'nope' not in"),
    "non-numeric features": (["model=knn", "data=csv", "data.path={text}", "data.target=label"], "'color'"),
    "one class": (["model=knn", "data=csv", "data.path={one_class}", "data.target=label"], "only one class"),
    "too few samples": (["model=knn", "data=csv", "data.path={tiny}", "data.target=label"], "too few"),
    "zero units": (["model.hidden_units=[0]"], "model.hidden_units"),
    "negative units": (["model.hidden_units=[16,-4]"], "model.hidden_units"),
    "zero neighbours": (["model=knn", "model.n_neighbors=0"], "model.n_neighbors"),
    "cnn on tabular data": (["model=cnn", "data=wine"], "needs images"),
    "unreachable tracking server": (["model=knn", "tracking.uri=http://127.0.0.1:9"], "cannot reach the MLflow"),
    "tracking folder missing": (["model=knn", "tracking.uri=sqlite:////nonexistent/dir/mlflow.db"], "tracking.uri"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_train_rejects_bad_input(case: str, train, workdir: Path) -> None:
    files = _frames(workdir)
    args, expected = CASES[case]
    result = train(*[a.format(**files) for a in args])
    assert result.code == 2, (result.stdout, result.stderr)
    assert len(result.error_lines) == 1, result.stderr
    assert expected in result.error_lines[0], result.error_lines[0]
    assert "Traceback" not in result.stderr
    assert mlflow_runs(workdir) == []  # rejected before any run exists


TUNE_CASES = {
    "threshold above 1": (["model=knn", "gate.threshold=1.5"], "gate.threshold"),
    "negative threshold": (["model=knn", "gate.threshold=-0.1"], "gate.threshold"),
    "unknown sampler": (["model=knn", "study.sampler=bogus"], "study.sampler"),
    "zero trials": (["model=knn", "study.n_trials=0"], "study.n_trials"),
    "test metric as gate": (["model=knn", "gate.metric=test_accuracy"], "gate.metric"),
    "unknown runner": (["model=knn", "runner=nosuch"], "runner/nosuch"),
    "bad storage": (["model=knn", "study.storage=postgresql+psycopg2://u:secret@127.0.0.1:9/db"], "127.0.0.1"),
}


@pytest.mark.parametrize("case", list(TUNE_CASES), ids=list(TUNE_CASES))
def test_tune_rejects_bad_input(case: str, tune, workdir: Path) -> None:
    args, expected = TUNE_CASES[case]
    result = tune(*args)
    assert result.code == 2, (result.stdout, result.stderr)
    assert len(result.error_lines) == 1, result.stderr
    assert expected in result.error_lines[0], result.error_lines[0]
    assert "secret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert [r for r in mlflow_runs(workdir) if r.info.status == "RUNNING"] == []
    assert not (workdir / "optuna.db").exists() or case == "bad storage"
