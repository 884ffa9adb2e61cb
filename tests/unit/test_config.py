"""config + schema: unknown keys, types and ranges named by their key, for composed configs and files."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mlops_tune.config import load_train, load_tune
from mlops_tune.runtime.errors import UsageError, check_int
from tests.conftest import compose_config


def _tune(*overrides: str) -> dict:
    return load_tune(compose_config("tune", "model=knn", *overrides))


def test_the_shipped_defaults_pass_and_are_typed() -> None:
    cfg = _tune("study.n_trials=7", "gate.threshold=1")
    assert cfg["study"]["n_trials"] == 7 and cfg["gate"]["threshold"] == 1.0
    assert isinstance(cfg["gate"]["threshold"], float)
    assert cfg["runner"]["name"] == "inprocess" and cfg["report"]["junit"] is None


@pytest.mark.parametrize(("overrides", "words"), [
    (["+gate.treshold=0.9"],
     "gate.treshold: unknown config key (known: confirm, max_params, max_predict_ms, metric, threshold)"),
    (["+bogus=1"], "bogus: unknown config key"),
    (["study.n_trials=abc"], "study.n_trials: Value 'abc'"),
    (["registry.promote=maybe"], "registry.promote:"),
    (["runner=docker", "runner.cpus=x"], "runner.cpus:"),
    (["gate.threshold=1.5"], "gate.threshold: must be an accuracy in [0, 1]"),
    (["study.n_trials=0"], "study.n_trials: must be a positive integer, got 0"),
    (["study.heartbeat_interval=30"], "shorter than study.grace_period"),
    (["study.timeout=-1"], "study.timeout: must be null or a positive number"),
    (["study.sampler=bogus"], "study.sampler: 'bogus' is not one of tpe, random, mutation"),
    (["study.pruner={_target_:os.system}"], "study.pruner: _target_ 'os.system' is not allowed"),
    (["seed=-1"], "seed: must be an integer in [0, 2**32), got -1"),
    (["worker=-1"], "worker: must be an integer >= 0, got -1"),
    (["study.name="], "study.name: must be a non-empty string"),
])
def test_bad_values_name_their_key(overrides: list[str], words: str) -> None:
    with pytest.raises(UsageError) as info:
        _tune(*overrides)
    assert words in str(info.value)


def test_a_config_file_outside_conf_gets_the_same_schema(tmp_path: Path) -> None:
    """best_config.yaml and trial folders are not composed by Hydra: the schema still applies."""
    good = {"model": {"name": "knn", "family": "sklearn", "_target_": "sklearn.neighbors.KNeighborsClassifier",
                      "n_neighbors": 3},
            "data": {"name": "iris", "loader": "sklearn", "dataset": "iris", "val_size": 0.2, "test_size": 0.2},
            "seed": 1, "tracking": {"uri": f"sqlite:///{tmp_path}/m.db", "experiment": "e"}}
    assert load_train(OmegaConf.create(good))["seed"] == 1
    with pytest.raises(UsageError, match=r"tracking\.experimnt: unknown config key"):
        load_train(OmegaConf.create({**good, "tracking": {**good["tracking"], "experimnt": "x"}}))
    with pytest.raises(UsageError, match="gate: unknown config key"):  # a study's section in a train config
        load_train(OmegaConf.create({**good, "gate": {"threshold": 0.5}}))


@pytest.mark.parametrize(("value", "low", "high", "ok"), [
    (1, 1, None, True), (0, 1, None, False), (True, 0, None, False), (1.0, 0, None, False),
    (2**32 - 1, 0, 2**32, True), (2**32, 0, 2**32, False), ("3", 0, None, False),
])
def test_check_int(value: object, low: int, high: int | None, ok: bool) -> None:
    if ok:
        assert check_int(value, "k", low, high) == value
    else:
        with pytest.raises(UsageError, match=r"^k: must be (an integer|a positive integer)"):
            check_int(value, "k", low, high)


def test_the_report_links_a_ui_address_without_credentials_and_refuses_one_that_is_not_http() -> None:
    """``tracking.ui_url``: the MLflow UI the report's run links open. Derived from an http tracking URI
    without its password; else where ``mlflow ui`` serves a local store; a non-http value is exit 2."""
    from mlops_tune.show.report import LOCAL_UI, ui_address

    assert ui_address({"uri": "https://bob:s3cret@mlflow.example:8443/base/", "ui_url": None}) == \
        "https://mlflow.example:8443/base"
    assert ui_address({"uri": "sqlite:///mlflow.db", "ui_url": None}) == LOCAL_UI
    assert ui_address({"uri": "sqlite:///mlflow.db", "ui_url": "http://127.0.0.1:5001"}) == "http://127.0.0.1:5001"
    with pytest.raises(UsageError, match=r"^tracking\.ui_url: must be the MLflow UI's http\(s\) address"):
        load_tune(compose_config("tune", "model=knn", "tracking.ui_url=ftp://host"))
