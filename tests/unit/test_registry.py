"""registry: the champion rule and MLflow's model-name rules, on a real SQLite registry."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from mlops_tune.records import registry
from mlops_tune.runtime.errors import UsageError


def test_only_a_strictly_better_accuracy_at_the_stored_precision_beats() -> None:
    assert registry.beats(0.9, None)
    assert registry.beats(0.9000011, 0.9)
    assert not registry.beats(0.9000004, 0.9)  # equal at 6 decimals: a tie keeps the champion
    assert not registry.beats(0.8, 0.9)


@pytest.mark.parametrize("name", ["a/b", "a:b", " padded", ".", "..", ""])
def test_names_mlflow_refuses_are_usage_errors(name: str) -> None:
    with pytest.raises(UsageError, match=r"registry\.name"):
        registry.check_name(name)


@pytest.fixture
def logged_models(workdir: Path):
    """MLflow on the test's SQLite store; ``logged_models(n)`` logs n small models, returns their URIs."""
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    model = KNeighborsClassifier(1).fit(np.eye(3), [0, 1, 2])

    def log(n: int) -> list[str]:
        uris = []
        for _ in range(n):
            with mlflow.start_run():
                uris.append(mlflow.sklearn.log_model(model, name="model", pip_requirements=[]).model_uri)
        return uris

    yield log
    mlflow.set_tracking_uri(None)


def test_promote_moves_the_alias_only_on_a_better_model(workdir: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        model = KNeighborsClassifier(1).fit(np.eye(3), [0, 1, 2])
        uris = []
        for _ in range(3):
            with mlflow.start_run():
                uris.append(mlflow.sklearn.log_model(model, name="model", pip_requirements=[]).model_uri)
        assert registry.champion_test_accuracy("m") is None
        assert registry.promote(uris[0], "m", 0.8, {"study": "s"}) == ("1", True, None)
        assert registry.promote(uris[1], "m", 0.7, {"study": "s"}) == ("2", False, pytest.approx(0.8))
        assert registry.promote(uris[2], "m", 0.85, {"study": "s"}) == ("3", True, pytest.approx(0.8))
        assert registry.champion_test_accuracy("m") == pytest.approx(0.85)
    finally:
        mlflow.set_tracking_uri(None)


def test_the_champion_is_judged_on_todays_test_split(logged_models) -> None:
    """Its recorded test accuracy came from its own data: the judge's figure decides."""
    uris = logged_models(4)
    judged = []

    def judge(score: float):
        def evaluate(version) -> float:
            judged.append(str(version.version))
            return score
        return evaluate

    registry.promote(uris[0], "m", 0.99, {})  # champion v1, recorded 0.99 on its old data
    # on today's split v1 scores 0.5: a new model at 0.7 replaces it (the tags alone would keep v1)
    assert registry.promote(uris[1], "m", 0.7, {}, judge=judge(0.5)) == ("2", True, 0.5)
    # today v2 scores 0.9: a new 0.8 model does not replace it
    assert registry.promote(uris[2], "m", 0.8, {}, judge=judge(0.9)) == ("3", False, 0.9)
    assert judged == ["1", "2"]

    def cannot(version) -> float:
        raise ValueError("X has 4 features, but the model expects 3")

    assert registry.promote(uris[3], "m", 0.1, {}, judge=cannot) == ("4", True, None)
    assert str(registry.champion_version("m").version) == "4"


def test_a_store_failing_while_the_champion_is_judged_moves_nothing(logged_models) -> None:
    """An environment fault is not a reason to replace the champion: no version, no alias change."""
    from mlops_tune.runtime.errors import EnvironmentFault

    uris = logged_models(2)
    registry.promote(uris[0], "m", 0.9, {})

    def store_down(version) -> float:
        raise EnvironmentFault("tracking", "the MLflow server stopped answering")

    with pytest.raises(EnvironmentFault):
        registry.promote(uris[1], "m", 0.99, {}, judge=store_down)
    assert [str(v.version) for v in mlflow.MlflowClient().search_model_versions("name='m'")] == ["1"]
    assert str(registry.champion_version("m").version) == "1"
