"""study.n_jobs resolution, TensorFlow thread counts, and the pruners a parallel study uses."""

from __future__ import annotations

import os
import time
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from mlops_tune.runtime import threads
from mlops_tune.runtime.errors import UsageError
from mlops_tune.search.gate import GateAwarePruner
from mlops_tune.search.optuna_setup import MEDIAN_WARMUP, LikeForLikeMedianPruner, reporting
from mlops_tune.trial import OptunaReporter
from mlops_tune.workers.loop import ask


def test_auto_is_one_trial_per_core_for_keras_in_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "cpu_count", lambda: 4)
    assert threads.resolve_n_jobs("auto", "inprocess", "keras_dense", 20) == 4
    assert threads.resolve_n_jobs("auto", "inprocess", "keras_cnn", 3) == 3  # never more than the budget
    assert threads.resolve_n_jobs("auto", "inprocess", "sklearn", 20) == 1
    assert threads.resolve_n_jobs("auto", "mlflow", "keras_dense", 20) == 1  # runner.workers does it there
    assert threads.resolve_n_jobs("2", "inprocess", "sklearn", 20) == 2  # asked for: granted
    assert threads.resolve_n_jobs(1, "docker", "keras_dense", 20) == 1
    with pytest.raises(UsageError, match="needs runner=inprocess"):
        threads.resolve_n_jobs(2, "docker", "keras_dense", 20)
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(UsageError, match=r"study\.n_jobs"):
            threads.parse_n_jobs(bad)


def test_threads_are_split_between_processes_and_what_the_user_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "cpu_count", lambda: 4)
    assert threads.thread_env(2) == {"TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "1"}
    assert threads.thread_env(8) == {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "3")
    monkeypatch.delenv("TF_NUM_INTEROP_THREADS", raising=False)
    assert threads.limit_threads(2) == {"TF_NUM_INTRAOP_THREADS": "3", "TF_NUM_INTEROP_THREADS": "1"}
    assert os.environ["TF_NUM_INTEROP_THREADS"] == "1"


def test_cpu_count_respects_the_affinity() -> None:
    assert 1 <= threads.cpu_count() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.cfs_quota_us": "50000\n", "cpu.cfs_period_us": "100000\n"}, 0.5),  # cgroup v1
    ({"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),  # no cgroup files at all
])
def test_a_cpu_quota_bounds_the_thread_pools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             files: dict[str, str], quota: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    for attr, name in (("CPU_MAX", "cpu.max"), ("CFS_QUOTA", "cpu.cfs_quota_us"), ("CFS_PERIOD", "cpu.cfs_period_us")):
        monkeypatch.setattr(threads, attr, str(tmp_path / name))
    monkeypatch.setattr(threads, "_affinity", lambda: 4)
    for key in (*threads.NATIVE_THREAD_VARS, *threads.TF_THREAD_VARS):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")  # the user's choice stays

    assert threads.cpu_quota() == quota
    assert threads.cpu_count() == (max(1, int(quota)) if quota else 4)
    set_now = threads.limit_to_quota(tensorflow=True)  # a worker: one trial at a time
    if quota is None:  # all four cores: the libraries' own defaults
        assert set_now == {} and "OMP_NUM_THREADS" not in os.environ
    else:
        cores = str(max(1, int(quota)))
        assert set_now == {"OMP_NUM_THREADS": cores, "MKL_NUM_THREADS": cores,
                           "TF_NUM_INTRAOP_THREADS": cores, "TF_NUM_INTEROP_THREADS": "1"}
        assert os.environ["OMP_NUM_THREADS"] == cores
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"


def test_a_study_under_a_quota_splits_it_between_its_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mlops-tune under 2 CPUs of 4 cores, two trials at once: the native pools get the quota, and
    TensorFlow's are left to limit_threads, which splits the quota, not the cores, between the trials."""
    (tmp_path / "cpu.max").write_text("200000 100000\n")
    monkeypatch.setattr(threads, "CPU_MAX", str(tmp_path / "cpu.max"))
    monkeypatch.setattr(threads, "_affinity", lambda: 4)
    for key in (*threads.NATIVE_THREAD_VARS, *threads.TF_THREAD_VARS):
        monkeypatch.delenv(key, raising=False)
    assert threads.limit_to_quota() == {key: "2" for key in threads.NATIVE_THREAD_VARS}
    assert threads.limit_threads(2) == {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}


def _trial(study: optuna.Study, batch: int, curve: list[float], state: optuna.trial.TrialState) -> None:
    study.add_trial(optuna.trial.create_trial(
        params={"model.batch_size": batch}, distributions={"model.batch_size": CategoricalDistribution([16, 128])},
        value=curve[-1] if state == optuna.trial.TrialState.COMPLETE else None,
        intermediate_values=dict(enumerate(curve)), state=state))


def _running(study: optuna.Study, batch: int, curve: list[float]) -> optuna.trial.FrozenTrial:
    study.enqueue_trial({"model.batch_size": batch})
    trial = study.ask({"model.batch_size": CategoricalDistribution([16, 128])})
    for step, value in enumerate(curve):
        trial.report(value, step)
    return next(t for t in study.get_trials() if t.number == trial.number)  # the view pruners get


def test_the_first_worker_ready_takes_the_probe_and_the_next_one_trial_0(tmp_path: Path) -> None:
    """Every worker of a study asks first for the probe (trial 1): the first one ready runs it,
    the next takes trial 0; a trial another process took already is not taken again (one
    conditional write), and every later ask takes the oldest waiting trial."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    def study_with_three_waiting() -> tuple[optuna.Study, optuna.storages.BaseStorage]:
        storage = optuna.storages.RDBStorage(url)
        study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True)
        for x in (0, 1, 2):
            study.enqueue_trial({"x": x})
        return study, storage

    ours, storage = study_with_three_waiting()
    sid = storage.get_study_id_from_name("s")
    taken = [ask(ours, storage, sid, 1), ask(ours, storage, sid), ask(ours, storage, sid)]
    assert [t.number for t in taken] == [1, 0, 2]
    assert [t.suggest_categorical("x", [0, 1, 2]) for t in taken] == [1, 0, 2]  # the enqueued params
    assert {t.state for t in ours.get_trials()} == {optuna.trial.TrialState.RUNNING}

    optuna.delete_study(study_name="s", storage=url)
    ours, storage = study_with_three_waiting()
    sid = storage.get_study_id_from_name("s")
    other = optuna.load_study(study_name="s", storage=url)  # another process, on the same storage
    assert [other.ask().number, other.ask().number] == [0, 1]
    assert ask(ours, storage, sid, 1).number == 2  # the probe was gone: the oldest waiting one instead
    assert ask(ours, storage, sid, 1).number == 3  # nothing waiting: a new trial, as Optuna's ask does


def test_the_median_pruner_compares_like_with_like_and_waits_for_the_warm_up() -> None:
    study = optuna.create_study(direction="maximize")
    fast = [0.5 + 0.04 * e for e in range(12)]  # batch 16: climbs fast per epoch
    for _ in range(3):
        _trial(study, 16, fast, optuna.trial.TrialState.COMPLETE)
    pruner = LikeForLikeMedianPruner(n_startup_trials=3, n_warmup_steps=8)
    pruner.REFRESH = 0.0  # read the finished trials on every call (a study rereads every 2 s)
    slow = [0.2 + 0.03 * e for e in range(10)]  # batch 128: slower per epoch, still climbing
    trial = _running(study, 128, slow)
    assert not pruner.prune(study, trial)  # no batch-128 peers: Optuna's MedianPruner would prune it
    assert optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=8).prune(study, trial)
    for _ in range(3):
        _trial(study, 128, [0.3 + 0.03 * e for e in range(12)], optuna.trial.TrialState.COMPLETE)
    assert pruner.prune(study, _running(study, 128, slow))  # below its own kind's median at epoch 9
    assert not pruner.prune(study, _running(study, 128, slow[:8]))  # epoch 7: still warming up


def test_a_met_gate_stops_the_trials_still_running() -> None:
    study = optuna.create_study(direction="maximize")
    pruner = GateAwarePruner(optuna.pruners.NopPruner(), {"threshold": 0.9, "metric": "val_accuracy"})
    pruner.CHECK_EVERY = 0.0  # look at the study on every epoch (a study looks once a second)
    running = _running(study, 16, [0.5])
    assert not pruner.prune(study, running)
    _trial(study, 16, [0.95], optuna.trial.TrialState.COMPLETE)
    assert pruner.prune(study, running)


def test_epochs_are_reported_only_where_the_pruner_can_use_them() -> None:
    """Each report is a storage write: median reads from its warm-up on, none reads nothing
    (with workers in parallel it is still asked, to stop once another met the gate)."""
    assert reporting("median", parallel=False) == (MEDIAN_WARMUP, MEDIAN_WARMUP)
    assert reporting("median", parallel=True) == (MEDIAN_WARMUP, 0)
    assert reporting("none", parallel=False) == (None, None)
    assert reporting("none", parallel=True) == (None, 0)
    assert reporting({"_target_": "optuna.pruners.ThresholdPruner"}, parallel=False) == (0, 0)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    for pruner, expected in (("median", set(range(MEDIAN_WARMUP, 12))), ("none", set()), ("hyperband", set(range(12)))):
        trial = study.ask()
        reporter = OptunaReporter(trial, None, *reporting(pruner, parallel=False))
        for epoch in range(12):
            reporter.report(0.5, epoch)
        assert set(next(t for t in study.get_trials() if t.number == trial.number).intermediate_values) == expected


def _intermediate(study: optuna.Study, number: int) -> dict[int, float]:
    return next(t for t in study.get_trials() if t.number == number).intermediate_values


def test_a_background_reporter_writes_what_an_inline_one_writes() -> None:
    """The reports leave the training's path, not the storage: close() has them all written."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    values = [0.1 * (epoch % 7) for epoch in range(20)]
    written = {}
    for background in (False, True):
        trial = study.ask()
        reporter = OptunaReporter(trial, None, 5, 5, background=background)
        for epoch, value in enumerate(values):
            reporter.report(value, epoch)
        reporter.close()
        written[background] = _intermediate(study, trial.number)
    assert written[True] == written[False] == {epoch: values[epoch] for epoch in range(5, 20)}


def test_a_background_verdict_stops_the_next_epoch_and_writes_no_more() -> None:
    """The pruner's word on epoch k stops the training at a later epoch's report, naming epoch k."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = study.ask()
    reporter = OptunaReporter(trial, None, 0, 0, background=True)
    stopped_at = None
    for epoch in range(200):
        try:
            reporter.report(0.9 if epoch < 3 else 0.1, epoch)  # below the threshold from epoch 3
        except optuna.TrialPruned as exc:
            stopped_at = epoch
            assert "pruned at epoch 3 with val_accuracy=0.1000" in str(exc)
            break
        time.sleep(0.01)
    reporter.close()
    assert stopped_at is not None and stopped_at > 3
    assert sorted(_intermediate(study, trial.number)) == [0, 1, 2, 3]  # none after the verdict


def test_a_verdict_on_the_last_epoch_is_raised_once_training_returned() -> None:
    """A one-epoch (scikit-learn) trial is pruned as in line: close() waits, raise_verdict() stops it."""
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    for value, pruned in ((0.1, True), (0.9, False)):
        trial = study.ask()
        reporter = OptunaReporter(trial, None, 0, 0, background=True)
        reporter.report(value, 0)  # returns at once: the verdict is the thread's
        reporter.close()
        if pruned:
            with pytest.raises(optuna.TrialPruned, match=r"pruned at epoch 0 with val_accuracy=0\.1000"):
                reporter.raise_verdict()
        else:
            reporter.raise_verdict()
        assert _intermediate(study, trial.number) == {0: value}


def test_a_storage_error_in_the_background_reaches_the_training_thread() -> None:
    """A write the storage refuses is raised by close() (or the next report), not lost."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    study.tell(trial, 0.5)  # a finished trial: the storage refuses intermediate values
    reporter = OptunaReporter(trial, None, 0, 0, background=True)
    reporter.report(0.7, 0)
    with pytest.raises(RuntimeError, match="finished"):
        reporter.close()
    reporter.close()  # raised once
