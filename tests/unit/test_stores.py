"""stores: URI helpers and the checks made before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlops_tune.errors import UsageError
from mlops_tune.stores import absolute_sqlite, check_reachable


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
