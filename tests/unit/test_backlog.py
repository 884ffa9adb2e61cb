"""A finished trial's MLflow writes, done in a thread while the next trial trains (mlops_tune.records.backlog)."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest

from mlops_tune.config import validate_train
from mlops_tune.families import get_family
from mlops_tune.records import models, tracking
from mlops_tune.records.backlog import Backlog
from mlops_tune.runtime import faults
from mlops_tune.trial import run_trial
from tests.conftest import mlflow_runs
from tests.unit.test_trial import compose_plain


def test_writes_run_in_order_and_wait_returns_when_all_are_done() -> None:
    backlog, done = Backlog(), []
    release = threading.Event()
    backlog.submit("first", lambda: (release.wait(5), done.append(1)))
    backlog.submit("second", lambda: done.append(2))
    assert done == []  # the caller went on while the first write waits
    release.set()
    backlog.wait()
    assert done == [1, 2]
    backlog.close()


def test_a_paused_backlog_starts_no_write_until_resumed_or_waited_for() -> None:
    backlog, done = Backlog(), []
    backlog.pause()
    backlog.submit("one", lambda: done.append(1))
    assert not threading.Event().wait(0.3) and done == []
    backlog.resume()
    backlog.submit("two", lambda: done.append(2))
    backlog.pause()
    backlog.submit("three", lambda: done.append(3))
    backlog.wait()  # resumes: the worker's trials are over
    assert done == [1, 2, 3]
    backlog.close()


def test_a_failed_write_is_raised_once_to_the_caller_and_drops_the_writes_after_it() -> None:
    backlog, done = Backlog(), []

    def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/mlruns/1/models/m-1/model.keras")

    backlog.submit("the model of run r1", full_disk)
    backlog.submit("the config of run r2", lambda: done.append("config"))
    with pytest.raises(OSError) as raised:
        backlog.wait()
    assert "(while writing the model of run r1 in the background)" in raised.value.__notes__
    fault = faults.classify(raised.value)
    assert fault is not None and fault.component == "disk"  # exit 3, as in line
    assert done == [] and backlog.failed
    backlog.wait()  # raised once
    backlog.close()


def test_close_waits_for_the_writes_handed_over_and_raises_nothing() -> None:
    backlog, done = Backlog(), []
    backlog.pause()  # a study stopped by a signal closes a paused backlog
    backlog.submit("slow", lambda: (threading.Event().wait(0.2), done.append("slow")))
    backlog.submit("bad", lambda: 1 / 0)
    backlog.close()
    assert done == ["slow"]


@pytest.fixture
def experiment(workdir: Path) -> str:
    return tracking.connect(f"sqlite:///{workdir / 'mlflow.db'}", "mlops-tune")


def _status(model_uri: str) -> str:
    import mlflow

    return str(mlflow.MlflowClient().get_logged_model(models.model_id_of(model_uri)).status)


@pytest.mark.slow
def test_a_keras_trials_model_is_written_while_the_next_trial_trains(experiment: str, workdir: Path) -> None:
    cfg = compose_plain("train", "model.epochs=4", "model.hidden_units=[16]", "model.early_stopping_patience=0")
    validate_train(cfg)
    backlog = Backlog()
    first = run_trial(cfg, experiment_id=experiment, evaluate_test=False, backlog=backlog)
    # the trial is over, its run FINISHED and its result names the model; the files are not written
    # yet: that waits for the next trial's epochs, which leave Python's lock free
    assert first.model_uri and _status(first.model_uri) == "PENDING"
    second = run_trial(cfg, experiment_id=experiment, evaluate_test=False, backlog=backlog,
                       should_log_model=lambda _value: False)
    backlog.wait()
    assert _status(first.model_uri) == "READY" and second.model_uri is None
    family = get_family(cfg["model"]["family"])
    from mlops_tune.data import load_splits

    inputs = load_splits(cfg["data"], cfg["seed"]).as_input(family.input_kind)
    assert family.accuracy(family.load_model(first.model_uri), inputs.x_val, inputs.y_val) == first.val_accuracy
    runs = {run.info.run_id: run for run in mlflow_runs(workdir)}
    assert {run.info.status for run in runs.values()} == {"FINISHED"}
    import mlflow

    client = mlflow.MlflowClient()
    for outcome in (first, second):  # the params, the config and the dataset, written by the thread too
        assert [a.path for a in client.list_artifacts(outcome.run_id)] == ["config.yaml"]
        assert len(runs[outcome.run_id].inputs.dataset_inputs) == 1
        params = runs[outcome.run_id].data.params
        assert params["seed"] == str(cfg["seed"]) and params["model.hidden_units"] == "[16]"
        assert runs[outcome.run_id].data.tags[tracking.TAG_DATA]
    [output] = runs[first.run_id].outputs.model_outputs
    assert f"models:/{output.model_id}" == first.model_uri == runs[first.run_id].data.tags[tracking.TAG_MODEL_URI]
    backlog.close()


def test_a_model_whose_writing_failed_is_marked_failed_and_not_ready(experiment: str, workdir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_plain("train", "model=knn")
    family = get_family(cfg["model"]["family"])

    def full_disk(*_args: object, **_kwargs: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(family), "log_model", full_disk)
    backlog = Backlog()
    outcome = run_trial(cfg, experiment_id=experiment, backlog=backlog)
    with pytest.raises(OSError, match="No space left"):
        backlog.wait()
    assert outcome.model_uri and _status(outcome.model_uri) == "FAILED"
    assert not models.model_ready(outcome.model_uri)  # at once: FAILED
    backlog.close()


def test_model_ready_waits_for_a_model_another_worker_is_writing(experiment: str, workdir: Path) -> None:
    cfg = compose_plain("train", "model=knn")
    backlog, release = Backlog(), threading.Event()
    backlog.submit("a worker's slow start", lambda: release.wait(10))
    outcome = run_trial(cfg, experiment_id=experiment, backlog=backlog)
    assert outcome.model_uri and not models.model_ready(outcome.model_uri, grace=0.3)  # PENDING past 0.3 s
    threading.Timer(0.3, release.set).start()
    assert models.model_ready(outcome.model_uri)  # within its 30 s
    backlog.close()


def test_a_write_whose_answer_was_cut_off_is_sent_once_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tracking server killed while it answered: MLflow's retries do not cover a broken
    answer (``Connection broken: IncompleteRead``), the backlog sends the write again."""
    import requests

    # a tracking fault turns this process's HTTP retries off (stores.fail_fast): not for later tests
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)

    def broken() -> None:
        calls.append(1)
        if len(calls) < times:
            raise requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead(0 bytes read)")

    backlog = Backlog()
    calls, times = [], 2  # cut off once: written the second time, nothing raised
    backlog.submit("params", broken)
    backlog.wait()
    assert len(calls) == 2 and not backlog.failed
    calls, times = [], 5  # cut off again: raised as the tracking server's fault (exit 3), after 2 tries
    backlog.submit("model", broken)
    with pytest.raises(requests.exceptions.ChunkedEncodingError) as raised:
        backlog.wait()
    assert len(calls) == 2 and faults.classify(raised.value).component == "tracking"
    backlog.close()
    # any other failure is not sent again
    other, calls = Backlog(), []
    other.submit("config", lambda: (calls.append(1), (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))))
    with pytest.raises(OSError):
        other.wait()
    assert len(calls) == 1
    other.close()
