"""runner=ray's checks and hand-over, on made node lists and configs (no cluster needed here;
tests/e2e/test_ray.py runs a real one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlops_tune.runtime.errors import UsageError
from mlops_tune.workers import cluster

HERE = "10.0.0.5"


def _nodes(*addresses: str, **resources: float) -> list[dict]:
    return [{"NodeManagerAddress": address, "Alive": True, "Resources": {"CPU": 4.0, "memory": 8 * 2**30, **resources}}
            for address in addresses]


@pytest.mark.parametrize("storage, tracking", [
    ("sqlite:///optuna.db", "sqlite:///mlflow.db"),
    ("journal:///tmp/study.log", "http://127.0.0.1:5000"),
    ("postgresql+psycopg2://u@127.0.0.1/optuna", "http://localhost:5000"),
])
def test_stores_only_this_machine_reaches_are_fine_when_every_node_is_here(storage: str, tracking: str) -> None:
    cluster.check_reachable_from(_nodes(HERE, HERE, "127.0.0.1"), HERE, storage, tracking)


@pytest.mark.parametrize("storage, tracking, key", [
    ("sqlite:////data/optuna.db", "http://mlflow.internal:5000", "study.storage"),
    ("journal:///tmp/study.log", "http://mlflow.internal:5000", "study.storage"),
    ("postgresql+psycopg2://u@127.0.0.1/optuna", "http://mlflow.internal:5000", "study.storage"),
    ("postgresql+psycopg2://u@db.internal/optuna", "http://127.0.0.1:5000", "tracking.uri"),
    ("postgresql+psycopg2://u@db.internal/optuna", "sqlite:///mlflow.db", "tracking.uri"),
    ("postgresql+psycopg2://u@db.internal/optuna", "file:///tmp/mlruns", "tracking.uri"),
])
def test_a_store_only_this_machine_reaches_is_refused_for_nodes_elsewhere(storage: str, tracking: str,
                                                                         key: str) -> None:
    with pytest.raises(UsageError) as raised:
        cluster.check_reachable_from(_nodes(HERE, "10.0.0.6"), HERE, storage, tracking)
    assert str(raised.value).startswith(f"{key}: ") and "10.0.0.6" in str(raised.value)


def test_shared_stores_are_fine_for_nodes_elsewhere() -> None:
    cluster.check_reachable_from(_nodes(HERE, "10.0.0.6"), HERE, "postgresql+psycopg2://u@db.internal/optuna",
                                 "http://mlflow.internal:5000")


def test_the_refusal_names_no_password() -> None:
    with pytest.raises(UsageError) as raised:
        cluster.check_reachable_from(_nodes(HERE, "10.0.0.6"), HERE, "postgresql://u:hunter22@127.0.0.1/optuna",
                                     "http://mlflow.internal:5000")
    assert "hunter22" not in str(raised.value) and "u:***@127.0.0.1" in str(raised.value)


@pytest.mark.parametrize("size, expected",
                         [("4g", 4 * 2**30), ("512m", 512 * 2**20), ("1024", 1024), ("1.5G", 3 * 2**29)])
def test_memory_sizes(size: str, expected: int) -> None:
    assert cluster.memory_bytes(size) == expected


def test_a_worker_no_node_can_hold_is_refused_with_the_resource_it_lacks() -> None:
    ask = {"num_cpus": 1.0, "memory": None, "resources": {"tensorflow": 1.0}}
    with pytest.raises(UsageError) as raised:
        cluster._check_resources(_nodes(HERE, "10.0.0.6"), ask, "keras")
    assert "no node of the Ray cluster offers what a keras worker asks (tensorflow 1)" in str(raised.value)
    assert "--resources '{\"tensorflow\": 4}'" in str(raised.value) and "runner.resources.keras={}" in str(raised.value)
    cluster._check_resources(_nodes(HERE, "10.0.0.6", tensorflow=2.0), ask, "keras")
    with pytest.raises(UsageError, match="CPU 8"):  # one node must hold it whole
        cluster._check_resources(_nodes(HERE, "10.0.0.6"), {**ask, "num_cpus": 8.0, "resources": {}}, "sklearn")
    with pytest.raises(UsageError, match=r"asks \(memory 40g\); ask less \(runner.cpus, runner.memory\)"):
        cluster._check_resources(_nodes(HERE), {**ask, "memory": cluster.memory_bytes("40g"), "resources": {}},
                                 "sklearn")


def test_a_worker_gets_the_checked_config_to_run_in_its_own_process(tmp_path: Path) -> None:
    data = tmp_path / "rows.csv"
    data.write_text("a,label\n1,0\n")
    cfg = {"runner": {"name": "ray", "workers": 4}, "study": {"storage": "postgresql://u:hunter22@db/optuna",
                                                             "n_jobs": "auto"},
           "tracking": {"uri": "http://mlflow.internal:5000"}, "data": {"name": "csv", "path": os.path.relpath(data)}}
    config = cluster.worker_config(cfg)
    assert config["runner"] == {"name": "inprocess"} and config["study"]["n_jobs"] == 1
    assert config["study"]["storage"] == cfg["study"]["storage"] and config["tracking"] == cfg["tracking"]
    assert config["data"]["path"] == str(data.resolve())  # the same file at the same path on every node


_MOVE = """
from mlops_tune.runtime import secrets
secrets.move_credentials("postgresql+psycopg2://alice:p%3Aw0rd@db.internal:5433/optuna")
print(repr(secrets.pgpass_entries()))
"""
_TAKE = """
import os, sys
from mlops_tune.runtime import secrets
secrets.add_pgpass_entries(eval(sys.argv[1]))
path = os.environ["PGPASSFILE"]
print(open(path).read().splitlines()[0], oct(os.stat(path).st_mode & 0o777), secrets.redact_text("x p:w0rd y"))
"""


def test_a_postgresql_password_taken_from_a_url_is_handed_on_to_another_process(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}
    moved = subprocess.run([sys.executable, "-c", _MOVE], env=env, capture_output=True, text=True, check=True)
    entries = moved.stdout.strip()
    assert entries == repr(["db.internal:5433:optuna:alice:p\\:w0rd"])
    taken = subprocess.run([sys.executable, "-c", _TAKE, entries], env=env, capture_output=True, text=True, check=True)
    assert taken.stdout.split() == ["db.internal:5433:optuna:alice:p\\:w0rd", "0o600", "x", "***", "y"]
