"""registry: the champion rule and MLflow's model-name rules, on a real SQLite registry."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from mlops_tune import registry
from mlops_tune.errors import UsageError


def test_only_a_strictly_better_accuracy_at_the_stored_precision_beats() -> None:
    assert registry.beats(0.9, None)
    assert registry.beats(0.9000011, 0.9)
    assert not registry.beats(0.9000004, 0.9)  # equal at 6 decimals: a tie keeps the champion
    assert not registry.beats(0.8, 0.9)


@pytest.mark.parametrize("name", ["a/b", "a:b", " padded", ".", "..", ""])
def test_names_mlflow_refuses_are_usage_errors(name: str) -> None:
    with pytest.raises(UsageError, match=r"registry\.name"):
        registry.check_name(name)


def test_promote_moves_the_alias_only_on_a_better_model(workdir: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        model = KNeighborsClassifier(1).fit(np.eye(3), [0, 1, 2])
        uris = []
        for _ in range(3):
            with mlflow.start_run():
                uris.append(mlflow.sklearn.log_model(model, name="model", pip_requirements=[]).model_uri)
        assert registry.champion_test_accuracy("m") is None
        assert registry.promote(uris[0], "m", 0.8, {"study": "s"}) == ("1", True)
        assert registry.promote(uris[1], "m", 0.7, {"study": "s"}) == ("2", False)
        assert registry.promote(uris[2], "m", 0.85, {"study": "s"}) == ("3", True)
        assert registry.champion_test_accuracy("m") == pytest.approx(0.85)
    finally:
        mlflow.set_tracking_uri(None)
