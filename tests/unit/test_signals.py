"""Signals: SIGTERM/SIGINT stop the study, but never in the middle of a store call.

A KeyboardInterrupt raised inside MLflow's SQL store leaves that connection's SQLite
transaction open; the next write (closing the runs as KILLED) then waits for ever. This is
what hung `mlops-tune runner=mlflow` after SIGTERM when its main thread polled a trial's run.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from mlops_tune.runtime import faults


@pytest.fixture
def handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    faults.reset_stop()


def _later(seconds: float, signum: int) -> None:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def test_a_signal_during_store_polling_leaves_the_store_writable(workdir: Path, handlers: None) -> None:
    """20 signals at random moments of a loop that polls a real SQLite tracking store as the
    Project runner does; after each, closing the run as KILLED must finish (without the
    deferral about one signal in ten landed in the store and the write hung)."""
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        experiment_id = client.create_experiment("signals")
        rng = random.Random(7)
        for attempt in range(20):
            faults.install_signal_handlers()
            run_id = client.create_run(experiment_id).info.run_id
            with pytest.raises(faults.Stopped) as stopped:
                # scheduled inside the block: a signal may land before the first poll, never before the block
                _later(rng.uniform(0.005, 0.06), signal.SIGTERM)
                while True:
                    client.get_run(run_id)
                    time.sleep(0.005)
            assert stopped.value.exit_code == 143
            closing = threading.Thread(target=client.set_terminated, args=(run_id, "KILLED"), daemon=True)
            closing.start()
            closing.join(15)
            assert not closing.is_alive(), f"closing the run hung after signal {attempt}"
            assert client.get_run(run_id).info.status == "KILLED"
    finally:
        mlflow.set_tracking_uri(None)


def test_a_signal_outside_store_code_is_raised_at_once(handlers: None) -> None:
    """Training code (here a busy loop) is interrupted where it is, as Ctrl-C would."""
    faults.install_signal_handlers()
    started = time.perf_counter()
    with pytest.raises(faults.Stopped) as stopped:  # not raised at once: the loop ends, and this fails
        _later(0.05, signal.SIGINT)
        while time.perf_counter() - started < 30:
            sum(range(1000))
    assert stopped.value.exit_code == 130
    # the first signal ignores the next ones: closing runs is not cut short
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_a_signal_inside_a_weakref_callback_is_not_lost(handlers: None) -> None:
    """The garbage collector runs weak-reference callbacks wherever the code is; an exception
    raised in one is printed and dropped ("Exception ignored in ..."). A SIGTERM landing there
    was lost, and as the handler then ignores further signals, a study's helper process trained on after
    SIGTERM until it was killed (its trial's run left RUNNING)."""
    import weakref

    class Thing:
        pass

    def callback(_ref: object) -> None:  # stands for weakref.py's own callbacks
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.perf_counter() + 0.2
        while time.perf_counter() < deadline:  # the handler runs here, inside the callback
            sum(range(100))

    callback.__code__ = callback.__code__.replace(co_filename=weakref.__file__)
    faults.install_signal_handlers()
    thing = Thing()
    ref = weakref.ref(thing, callback)
    started = time.perf_counter()
    with pytest.raises(faults.Stopped) as stopped:  # lost in the callback: the loop ends, and this fails
        del thing  # the callback runs; the signal is put off until it has returned
        while time.perf_counter() - started < 30:
            sum(range(1000))
    assert stopped.value.exit_code == 143
    assert ref() is None


def test_a_stop_that_some_code_dropped_is_raised_again_at_the_next_epoch(handlers: None) -> None:
    """A Stopped swallowed where SWALLOWING does not look (here a bare except) must not leave the
    process training on with SIGTERM ignored: the next epoch's report raises it again."""
    import optuna

    from mlops_tune.trial import OptunaReporter

    faults.install_signal_handlers()
    faults.check_stopped()  # nothing yet
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.perf_counter() + 2
        while time.perf_counter() < deadline:
            sum(range(100))
    except BaseException:  # the library code that drops it
        pass
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    study = optuna.create_study(direction="maximize")
    reporter = OptunaReporter(study.ask(), None, None, None)
    with pytest.raises(faults.Stopped) as stopped:
        reporter.report(0.5, 0)
    assert stopped.value.exit_code == 143
    faults.install_signal_handlers()  # a new start forgets it
    faults.check_stopped()
