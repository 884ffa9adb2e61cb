"""What a worker container is given (mlops_tune.workers.containers) and how it gets its assignment
(mlops_tune.workers.handover), without a Docker engine."""

from __future__ import annotations

import multiprocessing.connection
import os
import stat
import threading
from pathlib import Path

import pytest

from mlops_tune.workers import containers, handover


def test_the_workers_environment_file_holds_the_secrets_and_the_command_line_none(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in containers.PASS_THROUGH:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "k3y")
    path = containers.write_env_file(tmp_path, {"MLFLOW_TRACKING_URI": "http://u:pw@127.0.0.1:5000",
                                                handover.KEY_ENV: "abcd"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(path.read_text().splitlines()) == [
        "AWS_SECRET_ACCESS_KEY=k3y", "MLFLOW_TRACKING_PASSWORD=s3cret", "MLFLOW_TRACKING_URI=http://u:pw@127.0.0.1:5000",
        f"{handover.KEY_ENV}=abcd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing half-written beside it
    command = containers.run_command({"cpus": 1.5, "memory": "1g"}, "mlops-tune-worker-x", "img:tag",
                                     [f"{tmp_path}:{tmp_path}:ro"], path, ["python", "-m", "mlops_tune.worker", "f"])
    text = " ".join(command)
    assert "s3cret" not in text and "pw@" not in text and "abcd" not in text
    assert command[:4] == ["docker", "run", "--rm", "--pull"] and command[4] == "never"  # never pulled
    assert command[command.index("--cpus"):command.index("--cpus") + 2] == ["--cpus", "1.5"]
    assert command[command.index("--memory"):command.index("--memory") + 2] == ["--memory", "1g"]
    assert command[command.index("--env-file") + 1] == str(path)
    assert command[-5:] == ["img:tag", "python", "-m", "mlops_tune.worker", "f"]


def _ask_in_thread(name: str) -> tuple[threading.Thread, list]:
    answers: list = []

    def ask() -> None:
        try:
            answers.append(handover.ask(name))
        except (OSError, EOFError) as exc:  # collected for the assertions
            answers.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    return thread, answers


def test_a_worker_that_asks_before_the_study_knows_waits_for_its_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    desk = handover.Desk()
    try:
        for key, value in desk.environment().items():
            monkeypatch.setenv(key, value)
        thread, answers = _ask_in_thread("worker-1")
        thread.join(0.5)
        assert thread.is_alive() and answers == []  # asked, and waits: nothing to give yet
        desk.open(lambda name: {"name": "study", "owner": f"run-of-{name}"})
        thread.join(10)
        assert answers == [{"name": "study", "owner": "run-of-worker-1"}]
        assert handover.KEY_ENV not in os.environ  # the key is not left to the trials' code
    finally:
        desk.close()


def test_a_stopped_study_answers_no_waiting_worker_and_a_caller_without_the_key_gets_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    desk = handover.Desk()
    for key, value in desk.environment().items():
        monkeypatch.setenv(key, value)
    thread, answers = _ask_in_thread("worker-1")
    thread.join(0.3)
    desk.close()  # the study failed its checks: the container ends without an assignment
    thread.join(10)
    assert len(answers) == 1 and isinstance(answers[0], (OSError, EOFError))

    desk = handover.Desk()
    try:
        desk.open(lambda name: {"secret": "assignment"})
        host, _, port = desk.address.rpartition(":")
        with pytest.raises(multiprocessing.connection.AuthenticationError):
            multiprocessing.connection.Client((host, int(port)), authkey=b"wrong key")
    finally:
        desk.close()


def test_a_failed_assignment_closes_the_workers_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracking server fails as the study makes the worker's run: the worker gets no answer
    (and fails), the desk keeps answering others."""
    desk = handover.Desk()
    try:
        for key, value in desk.environment().items():
            monkeypatch.setenv(key, value)

        def assign(name: str) -> dict:
            if name == "worker-1":
                raise ConnectionError("tracking server gone")
            return {"owner": name}

        desk.open(assign)
        with pytest.raises((OSError, EOFError)):
            handover.ask("worker-1")
        for key, value in desk.environment().items():
            monkeypatch.setenv(key, value)
        assert handover.ask("worker-2") == {"owner": "worker-2"}
    finally:
        desk.close()


def test_a_container_whose_config_fails_its_checks_leaves_the_error_to_the_study(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A container starts before the study has checked the model's section: when the worker's own
    check fails, the study's says why (one line) and stops it, so the worker says nothing; only a
    study that found nothing wrong (it answers) gets the worker's error."""
    import yaml
    from omegaconf import OmegaConf

    from mlops_tune import worker
    from mlops_tune.config import load_tune
    from mlops_tune.runtime.errors import EXIT_CRASH, UsageError
    from mlops_tune.workers import CONFIG_FILE
    from tests.conftest import compose_config

    plain = load_tune(compose_config("tune", "model=knn", "model.n_neighbors=0"), model=False)  # the study's, so far
    folder = tmp_path / "worker-1"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(plain))
    with pytest.raises(UsageError, match=r"model\.n_neighbors"):
        load_tune(OmegaConf.create(plain))  # what the study's own check finds a moment later

    desk = handover.Desk()
    try:
        for key, value in desk.environment().items():
            monkeypatch.setenv(key, value)
        threading.Timer(0.2, desk.close).start()  # the study failed its checks while the worker asks
        assert worker.serve(folder) == EXIT_CRASH
        assert capsys.readouterr() == ("", "")
    finally:
        desk.close()

    desk = handover.Desk()
    try:
        for key, value in desk.environment().items():
            monkeypatch.setenv(key, value)
        # the study found nothing wrong: the worker's error is said (its check of the model, once assigned)
        desk.open(lambda name: {"name": "study", "experiment_id": "0", "parent_run_id": "p", "started_at": 0.0,
                                "storage": "grpc://127.0.0.1:9"})
        with pytest.raises(UsageError, match=r"model\.n_neighbors"):
            worker.serve(folder)
    finally:
        desk.close()
