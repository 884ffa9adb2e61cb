"""stores: URI helpers and the checks made before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlops_tune.records.stores import absolute_sqlite, check_reachable, filesystem_of
from mlops_tune.runtime.errors import UsageError


def test_relative_sqlite_uris_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_sqlite("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_sqlite("sqlite:///sub/o.db?timeout=5") == f"sqlite:///{tmp_path}/sub/o.db?timeout=5"
    for unchanged in ("sqlite:////abs/x.db", "sqlite:///:memory:", "http://127.0.0.1:5000",
                      "postgresql://u@h/db"):
        assert absolute_sqlite(unchanged) == unchanged


@pytest.mark.parametrize(("uri", "words"), [
    ("ftp://host/x", "unsupported scheme"),
    ("sqlite:////nonexistent/dir/mlflow.db", "folder of the SQLite file does not exist"),
    ("http://127.0.0.1:9", "cannot reach the MLflow server"),
    ("file:///proc/nope", "cannot create or write"),
])
def test_unusable_stores_are_usage_errors(uri: str, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        check_reachable(uri)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files; tests/e2e/test_faults.py mounts read-only")
def test_a_read_only_sqlite_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"")
    db.chmod(0o444)
    with pytest.raises(UsageError, match="read-only"):
        check_reachable(f"sqlite:///{db}")


def test_a_writable_sqlite_file_passes(tmp_path: Path) -> None:
    check_reachable(f"sqlite:///{tmp_path / 'new.db'}")


def _journal(path: Path) -> str:
    import sqlite3

    with sqlite3.connect(path) as conn:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])


def test_sqlite_stores_write_ahead_with_normal_sync(tmp_path: Path) -> None:
    """MLflow's store and Optuna's storage on local SQLite files: WAL, synchronous=NORMAL (1);
    a study's transactions then cost about half (benchmarks/time_to_target.py)."""
    from mlops_tune.records import tracking
    from mlops_tune.search.optuna_setup import make_storage

    tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}", "wal")
    storage = make_storage({"storage": f"sqlite:///{tmp_path / 'optuna.db'}", "heartbeat_interval": 60,
                            "grace_period": 120})
    with storage.engine.connect() as conn:  # type: ignore[attr-defined]
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1
    assert _journal(tmp_path / "mlflow.db") == _journal(tmp_path / "optuna.db") == "wal"


def test_a_sqlite_file_on_a_network_file_system_keeps_its_journal() -> None:
    mountinfo = "\n".join([
        "22 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw",
        "40 22 0:50 / /mnt/shared rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2",
        "41 22 0:51 / /mnt/my\\040disk rw - fuse.sshfs host:/x rw",
        "garbage line",
    ])
    assert filesystem_of("/mnt/shared/team/optuna.db", mountinfo) == "nfs4"
    assert filesystem_of("/mnt/my disk/optuna.db", mountinfo) == "fuse.sshfs"
    assert filesystem_of("/mnt/sharedother/optuna.db", mountinfo) == "ext4"  # a prefix is not a parent
    assert filesystem_of("/work/optuna.db", mountinfo) == "ext4"


def test_the_write_ahead_log_can_be_turned_off(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("from mlops_tune.records import tracking; import sys; "
            "tracking.connect('sqlite:///' + sys.argv[1], 'plain')")
    env = {**os.environ, "MLOPS_TUNE_SQLITE_WAL": "0"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "mlflow.db")], env=env, check=True, timeout=120)
    assert _journal(tmp_path / "mlflow.db") == "delete"
