"""What a trial container is given (mlops_tune.workers.containers), without a Docker engine."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from mlops_tune.workers import containers


def test_a_credentials_file_another_worker_made_meanwhile_is_no_error(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Two warm workers of a study start at once: the second checks for the file before the
    first has written it, and must neither fail (trial 0 of a KNN study did, FileExistsError)
    nor leave a file of its own beside it."""
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    path = tmp_path / "credentials.env"
    path.write_text("MLFLOW_TRACKING_PASSWORD=s3cret\n")
    monkeypatch.setattr(Path, "exists", lambda self: False)  # the check ran before the other's write
    args = containers.docker_args({}, "trial-0", tmp_path)
    monkeypatch.undo()
    assert args["env-file"] == str(path)
    assert "MLFLOW_TRACKING_PASSWORD=s3cret\n" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["credentials.env"]


def test_workers_starting_together_all_get_the_whole_credentials_file(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name in containers.PASS_THROUGH:  # CI passes TF_CPP_MIN_LOG_LEVEL through: count only these two
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "k3y")
    errors: list[BaseException] = []
    for round_ in range(50):
        folder = tmp_path / str(round_)
        folder.mkdir()
        start = threading.Barrier(3)

        def worker(folder: Path = folder, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                assert Path(containers.docker_args({}, "c", folder)["env-file"]).read_text().count("\n") == 2
            except BaseException as exc:  # collected for the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(p.name for p in folder.iterdir()) == ["credentials.env"]
    assert errors == []
