"""secrets: passwords moved out of URLs and masked in every text."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlops_tune.runtime import secrets


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PGPASSFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pgpass of the developer's
    monkeypatch.setattr(secrets, "_pgpass", None)
    monkeypatch.setattr(secrets, "_known", set())


@pytest.mark.parametrize(("url", "shown"), [
    ("http://alice:s3cret@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
    ("postgresql+psycopg2://u:p%40ss@db:5432/optuna", "postgresql+psycopg2://u:***@db:5432/optuna"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_redact_masks_only_the_password(url: str, shown: str) -> None:
    assert secrets.redact(url) == shown


def test_redact_text_masks_urls_inside_messages_and_remembered_secrets() -> None:
    secrets.remember("tok-123456")
    text = "cannot reach http://bob:hunter2@host:1/x (token tok-123456)"
    assert secrets.redact_text(text) == "cannot reach http://bob:***@host:1/x (token ***)"
    assert secrets.redact_config({"a": ["http://x:pw@h"], "b": 3}) == {"a": ["http://x:***@h"], "b": 3}


def test_http_credentials_move_to_mlflow_variables() -> None:
    assert secrets.move_credentials("http://alice:pa%3Ass@127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "pa:ss"


def test_postgres_password_moves_to_a_private_pgpass_file_first() -> None:
    moved = secrets.move_credentials("postgresql+psycopg2://bob:pw:1@127.0.0.1:6543/optuna")
    assert moved == "postgresql+psycopg2://bob@127.0.0.1:6543/optuna"
    path = Path(os.environ["PGPASSFILE"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().splitlines()[0] == "127.0.0.1:6543:optuna:bob:pw\\:1"


@settings(max_examples=100, deadline=None, derandomize=True)
@given(password=st.text(alphabet=st.characters(blacklist_characters="@/?#%[] \t\n\r'\"", min_codepoint=33,
                                               max_codepoint=126), min_size=3, max_size=20))
def test_no_password_survives_redaction(password: str) -> None:
    """Any password of URL-safe characters (RFC 3986: `@/?#%` must be percent-encoded) is masked."""
    url = f"http://user:{password}@127.0.0.1:5000/path"
    assert secrets.redact_text(f"error at {url}") == "error at http://user:***@127.0.0.1:5000/path"
    assert secrets.redact(url) == "http://user:***@127.0.0.1:5000/path"
