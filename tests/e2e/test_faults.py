"""Fault injection: the environment fails for real, and the exit code still tells the truth.

Each test breaks a real component (an ``mlflow server`` killed, a full or read-only
file system, a signal, processes racing on new stores, a failing registry table) and
asserts the exit code, the one-line message, that no MLflow run stays RUNNING after the
rerun, and how many trials really trained (``study.judged``). docs/reliability.md lists
the same faults; every row names its test here.

Disk faults use a small tmpfs when the tests run as root (CI does) and ``RLIMIT_FSIZE``
(set on the running study with ``prlimit``) elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import pty
import resource
import select
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from devtools import devservices
from mlops_tune.records import tracking
from mlops_tune.runtime import keys
from mlops_tune.runtime.keys import NOT_CHARGED as ATTR_NOT_CHARGED
from mlops_tune.runtime.keys import RETRY_OF as ATTR_RETRY_OF
from mlops_tune.search.gate import judged
from tests.conftest import BIN, IN_CI, IS_ROOT, command_env, mlflow_runs, read_only

SECRET = "S3cretPW"
#: a trial slow enough to break something while it runs
SLOW = ("model=knn", "model._target_=tests.helpers.SlowKNN", "study.sampler=random", "gate.threshold=0.999")
#: MLflow gives up on a dead server after one quick retry (the default rides out ~30 s)
FAST_GIVE_UP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}


def _start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "mlops-tune"), *args], cwd=cwd, env=command_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _workers_of(workdir: Path) -> list[int]:
    """The pids of the worker processes (``mlops_tune.worker``) of studies started in ``workdir`` by
    this test: they inherit its ``MLOPS_TUNE_TEST_MARK`` (another test's, or a container's, are not theirs)."""
    mark = f"MLOPS_TUNE_TEST_MARK={workdir}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"mlops_tune.worker" in (proc / "cmdline").read_bytes()
                    and mark in (proc / "environ").read_bytes().split(b"\0")):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _stop(proc: subprocess.Popen, *files: Path) -> None:
    """A test that failed half-way: its files released and its study stopped, not left running."""
    for file in files:
        file.unlink(missing_ok=True)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _run(args: list[str], cwd: Path, command: str = "mlops-tune", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / command), *args], cwd=cwd, env=command_env(**env),
                          capture_output=True, text=True, timeout=600)


def _trials(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=study, storage=storage).get_trials()
    except KeyError:
        return []


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited early ({proc.returncode}): {out[-1500:]} {err[-1500:]}")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.3)
    proc.kill()
    pytest.fail("the condition never came true")


def _one_error_line(stderr: str, *words: str) -> str:
    """The single ``mlops-tune: ...`` line of stderr; no traceback around it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(("mlops-tune:", "mlops-train:"))]
    assert len(lines) == 1, stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _no_running(uri: str, experiment: str = "mlops-tune") -> None:
    running = [r.info.run_id for r in mlflow_runs(uri, experiment) if r.info.status == "RUNNING"]
    assert running == [], running


def _judged_count(storage: str, study: str) -> int:
    return sum(judged(t) for t in _trials(storage, study))


def _secret_free(folder: Path) -> None:
    """No file below ``folder`` (Hydra's outputs and multirun folders) holds the secret."""
    leaks = [p for p in folder.rglob("*") if p.is_file() and SECRET in p.read_text(errors="ignore")]
    assert leaks == []


# ----------------------------------------------------------------------------- an MLflow server


class Server:
    """A real ``mlflow server`` on 127.0.0.1 that a test can kill and start again on its port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = devservices.free_port()
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc, _ = devservices.start_mlflow_server(
            f"sqlite:///{self.folder / 'server.db'}", self.folder / "artifacts", port=self.port,
            log=self.folder / "server.log")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    folder = tmp_path / "server"
    folder.mkdir()
    srv = Server(folder)
    srv.start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        devservices.stop_process(srv.proc)


def test_dead_tracking_server_stops_the_study_and_the_rerun_completes_the_budget(
        server: Server, workdir: Path) -> None:
    storage, study = f"sqlite:///{workdir / 'optuna.db'}", "dead-server"
    args = [f"tracking.uri=http://alice:{SECRET}@127.0.0.1:{server.port}", f"study.storage={storage}",
            f"study.name={study}", "study.n_trials=4", *SLOW]
    proc = _start(args, workdir, MLOPS_TUNE_TEST_SLEEP="2", **FAST_GIVE_UP)
    _wait_for(proc, lambda: any(t.state == TrialState.COMPLETE for t in _trials(storage, study)))
    server.kill()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    _one_error_line(err, f"MLflow server at http://127.0.0.1:{server.port}", "stopped answering", "not charged")
    assert SECRET not in out + err
    trials = _trials(storage, study)
    given_back = [t for t in trials if ATTR_NOT_CHARGED in t.user_attrs]
    assert len(given_back) == 1 and given_back[0].state == TrialState.FAIL
    assert _judged_count(storage, study) == sum(t.state == TrialState.COMPLETE for t in trials) < 4

    server.start()  # the environment recovers: the rerun (a multirun of one job) completes the budget
    rerun = _run(["-m", *args], workdir, MLOPS_TUNE_TEST_SLEEP="0")
    assert rerun.returncode == 1, rerun.stderr[-3000:]
    assert SECRET not in rerun.stdout + rerun.stderr
    trials = _trials(storage, study)
    assert _judged_count(storage, study) == 4
    retried = [t for t in trials if t.user_attrs.get(ATTR_RETRY_OF) == given_back[0].number]
    assert len(retried) == 1 and retried[0].params == given_back[0].params and judged(retried[0])
    _no_running(server.url)
    if "mlflow_run_id" in given_back[0].user_attrs:  # its run existed before the server died
        killed = mlflow.MlflowClient(server.url).get_run(given_back[0].user_attrs["mlflow_run_id"])
        assert killed.info.status == "KILLED"
    # the password reached neither Optuna, MLflow nor Hydra's saved configs (outputs/, multirun/)
    assert not [t for t in trials if SECRET in repr(t.user_attrs) + repr(t.system_attrs)]
    for run in mlflow_runs(server.url):
        assert SECRET not in repr(run.data.params) + repr(run.data.tags)
    _secret_free(workdir / "outputs")
    _secret_free(workdir / "multirun")


def test_a_server_restarted_within_the_retries_does_not_stop_the_study(server: Server, workdir: Path) -> None:
    storage, study = f"sqlite:///{workdir / 'optuna.db'}", "restarted"
    args = [f"tracking.uri={server.url}", f"study.storage={storage}", f"study.name={study}",
            "study.n_trials=3", *SLOW]
    proc = _start(args, workdir, MLOPS_TUNE_TEST_SLEEP="3", MLFLOW_HTTP_REQUEST_MAX_RETRIES="6",
                  MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    _wait_for(proc, lambda: any(t.state == TrialState.COMPLETE for t in _trials(storage, study)))
    # down while a trial trains (its fit sleeps 3 s), not mid-answer: a server killed while it
    # answers breaks that answer, which no HTTP retry mends (the study's background writes send
    # theirs once more; a call in the study's own thread is an environment failure, exit 3)
    _wait_for(proc, lambda: any(t.state == TrialState.RUNNING for t in _trials(storage, study)))
    time.sleep(1.0)
    server.kill()
    time.sleep(4)
    server.start()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert _judged_count(storage, study) == 3
    assert not [t for t in _trials(storage, study) if ATTR_NOT_CHARGED in t.user_attrs]
    _no_running(server.url)


def test_optuna_storage_lost_mid_study_is_exit_3_and_the_rerun_completes_the_budget(workdir: Path) -> None:
    """A PostgreSQL storage of its own, stopped while a trial runs, then started again."""
    if devservices.postgres_bin("initdb") is None:
        assert not IN_CI, "PostgreSQL server binaries are required in CI"
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    pg = devservices.start_postgres(Path(tempfile.mkdtemp(prefix="mlops-tune-pg-")), databases=("optuna",))
    try:
        storage, study = pg.url("optuna"), "lost-storage"
        args = [f"study.storage={storage}", f"study.name={study}", "study.n_trials=3",
                "study.heartbeat_interval=1", "study.grace_period=2", *SLOW]
        proc = _start(args, workdir, MLOPS_TUNE_TEST_SLEEP="3")
        _wait_for(proc, lambda: any(t.state == TrialState.COMPLETE for t in _trials(storage, study)))
        _wait_for(proc, lambda: any(t.state == TrialState.RUNNING for t in _trials(storage, study)))
        devservices.stop_postgres(pg)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, err[-3000:]
        _one_error_line(err, f"Optuna storage at postgresql+psycopg2://postgres@127.0.0.1:{pg.port}/optuna")
        pg = devservices.restart_postgres(pg)
        time.sleep(3)  # the lost trial's heartbeat goes stale: the rerun fails it and runs it again
        rerun = _run(args, workdir, MLOPS_TUNE_TEST_SLEEP="0")
        assert rerun.returncode == 1, rerun.stderr[-3000:]
        assert _judged_count(storage, study) == 3
        assert not [t for t in _trials(storage, study) if t.state == TrialState.RUNNING]
        _no_running(f"sqlite:///{workdir / 'mlflow.db'}")
    finally:
        devservices.stop_postgres(pg)
        shutil.rmtree(pg.folder, ignore_errors=True)


# ----------------------------------------------------------------------------- the disk


@contextlib.contextmanager
def _small_disk(folder: Path) -> Iterator[Callable[[subprocess.Popen], None]]:
    """A folder whose file system can be filled while a study runs; yields ``fill(proc)``.

    As root: a 64 MB tmpfs, filled with a file. Otherwise: ``RLIMIT_FSIZE`` of 1 byte set on
    the running study, so every write that grows a file fails with EFBIG.
    """
    filler = folder / "filler.bin"
    if IS_ROOT:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], check=True)

        def fill(proc: subprocess.Popen) -> None:
            with open(filler, "wb") as handle, contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * (1 << 20))
                    handle.flush()
        try:
            yield fill
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=False)
    else:
        def fill(proc: subprocess.Popen) -> None:
            resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, 1))
        yield fill


def test_disk_full_mid_study_is_exit_3_and_the_rerun_completes_the_budget(
        mlflow_template: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    storage, study = f"sqlite:///{tmp_path / 'optuna.db'}", "disk-full"
    args = [f"study.storage={storage}", f"study.name={study}", "study.n_trials=4", *SLOW]
    with _small_disk(disk) as fill:
        shutil.copy(mlflow_template, disk / "mlflow.db")
        proc = _start(args, disk, MLOPS_TUNE_TEST_SLEEP="2")
        _wait_for(proc, lambda: any(t.state == TrialState.COMPLETE for t in _trials(storage, study)))
        fill(proc)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, err[-3000:]
        line = _one_error_line(err)
        assert any(words in line for words in ("no space left on device", "file too large", "disk is full")), line
        assert _judged_count(storage, study) < 4
        (disk / "filler.bin").unlink(missing_ok=True)
        rerun = _run(args, disk, MLOPS_TUNE_TEST_SLEEP="0")
        assert rerun.returncode == 1, rerun.stderr[-3000:]
        assert _judged_count(storage, study) == 4
        _no_running(f"sqlite:///{disk / 'mlflow.db'}")


def test_read_only_tracking_store_before_the_start_is_exit_2(mlflow_template: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(mlflow_template, store / "mlflow.db")
    storage = tmp_path / "optuna.db"
    args = ["model=knn", f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"study.storage=sqlite:///{storage}"]
    with read_only(store):
        result = _run(args, tmp_path)
    assert result.returncode == 2, result.stderr
    _one_error_line(result.stderr, "tracking.uri", "read-only")
    assert not storage.exists()  # nothing created before the error
    assert mlflow_runs(store) == []


def test_store_turning_read_only_mid_study_is_exit_3(mlflow_template: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(mlflow_template, store / "mlflow.db")
    storage, study = f"sqlite:///{tmp_path / 'optuna.db'}", "read-only"
    args = [f"tracking.uri=sqlite:///{store / 'mlflow.db'}", f"study.storage={storage}", f"study.name={study}",
            "study.n_trials=3", *SLOW]
    if not IS_ROOT:  # CI runs as root: there this never skips
        assert not IN_CI, "CI must run the fault tests as root"
        pytest.skip("turning a store read-only under a running process needs a remount (root)")
    proc = _start(args, store, MLOPS_TUNE_TEST_SLEEP="2")
    _wait_for(proc, lambda: any(t.state == TrialState.COMPLETE for t in _trials(storage, study)))
    with read_only(store):
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    _one_error_line(err, "read-only")
    rerun = _run(args, store, MLOPS_TUNE_TEST_SLEEP="0")
    assert rerun.returncode == 1, rerun.stderr[-3000:]
    assert _judged_count(storage, study) == 3
    _no_running(f"sqlite:///{store / 'mlflow.db'}")


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_mid_trial_closes_the_runs_and_the_trial_runs_again(signum: int, workdir: Path) -> None:
    storage, study = f"sqlite:///{workdir / 'optuna.db'}", "signalled"
    args = [f"study.storage={storage}", f"study.name={study}", "study.n_trials=2", "report.junit=junit.xml", *SLOW]
    proc = _start(args, workdir, MLOPS_TUNE_TEST_SLEEP="60")
    _wait_for(proc, lambda: any(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
                                for t in _trials(storage, study)))
    started = time.time()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert time.time() - started < 15
    assert proc.returncode == 128 + signum, err[-3000:]
    _one_error_line(err, f"stopped by {signal.Signals(signum).name}")
    runs = mlflow_runs(workdir)
    assert runs and {r.info.status for r in runs} == {"KILLED"}
    assert "<error" in (workdir / "junit.xml").read_text()
    rerun = _run(args, workdir, MLOPS_TUNE_TEST_SLEEP="0")
    assert rerun.returncode == 1, rerun.stderr[-3000:]
    assert _judged_count(storage, study) == 2
    assert any(ATTR_RETRY_OF in t.user_attrs and judged(t) for t in _trials(storage, study))
    _no_running(f"sqlite:///{workdir / 'mlflow.db'}")


def test_a_closed_terminal_stops_the_study_and_closes_its_runs(workdir: Path) -> None:
    """The real hang-up: mlops-tune runs on a pseudo-terminal that is its controlling terminal;
    closing the terminal's side sends it SIGHUP and makes every later write to it fail (EIO)."""
    storage, study = f"sqlite:///{workdir / 'optuna.db'}", "hung-up"
    args = [f"study.storage={storage}", f"study.name={study}", "study.n_trials=2", *SLOW]
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([str(BIN / "mlops-tune"), *args], cwd=workdir,
                            env=command_env(MLOPS_TUNE_TEST_SLEEP="60"), stdin=terminal, stdout=terminal,
                            stderr=terminal, preexec_fn=lambda: os.login_tty(terminal))
    os.close(terminal)
    output, done = bytearray(), threading.Event()

    def read_terminal() -> None:  # a terminal that nobody reads would block the writer
        while not done.is_set():
            if select.select([controller], [], [], 0.1)[0]:
                try:
                    output.extend(os.read(controller, 65536))
                except OSError:
                    return

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        _wait_for(proc, lambda: any(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
                                    for t in _trials(storage, study)))
    finally:
        done.set()  # no read may hold the terminal open while it closes
        reader.join()
        os.close(controller)  # the terminal closes: the kernel hangs up its session
    assert proc.wait(timeout=60) == 129, output[-3000:].decode(errors="replace")
    _no_running(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = mlflow_runs(workdir)
    assert runs and {r.info.status for r in runs} == {"KILLED"}
    rerun = _run(args, workdir, MLOPS_TUNE_TEST_SLEEP="0")
    assert rerun.returncode == 1, rerun.stderr[-3000:]
    assert _judged_count(storage, study) == 2


def test_sigterm_stops_mlops_train_and_its_run_ends_killed(workdir: Path) -> None:
    proc = subprocess.Popen([str(BIN / "mlops-train"), "model=knn", "model._target_=tests.helpers.SlowKNN"],
                            cwd=workdir, env=command_env(MLOPS_TUNE_TEST_SLEEP="60"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(proc, lambda: any(r.info.status == "RUNNING" for r in mlflow_runs(workdir)))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    _one_error_line(err, "stopped by SIGTERM")
    assert [r.info.status for r in mlflow_runs(workdir)] == ["KILLED"]


def test_sigterm_with_runner_mlflow_ends_the_trial_process_and_its_run(workdir: Path) -> None:
    storage, study = f"sqlite:///{workdir / 'optuna.db'}", "signalled-mlflow"
    args = [f"study.storage={storage}", f"study.name={study}", "study.n_trials=2", "runner=mlflow", *SLOW]
    proc = _start(args, workdir, MLOPS_TUNE_TEST_SLEEP="120", MLOPS_TUNE_TEST_MARK=str(workdir))
    try:
        _wait_for(proc, lambda: any(r.info.status == "RUNNING" and "mlops_tune.trial_number" in r.data.tags
                                    for r in mlflow_runs(workdir)))
        time.sleep(6)  # the trial process is in its fit (imports done)
        workers = _workers_of(workdir)
        assert workers, "the trial runs in a worker process"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err
    assert {r.info.status for r in mlflow_runs(workdir)} == {"KILLED"}
    assert [pid for pid in workers if pid in _workers_of(workdir)] == []  # the worker's process is gone too


def test_a_killed_project_worker_costs_its_trial_nothing(workdir: Path) -> None:
    """runner=mlflow: the worker process (a Project run) is SIGKILLed while trial 0 is in its fit.
    The study gives the trial back, starts a new worker, and spends its whole budget on trials
    that trained; nothing is left RUNNING."""
    hold = workdir / "hold"
    hold.touch()
    storage, name = f"sqlite:///{workdir / 'optuna.db'}", "killed-worker"
    proc = _start([f"study.storage={storage}", f"study.name={name}", "study.n_trials=2", "runner=mlflow", *SLOW],
                  workdir, MLOPS_TUNE_TEST_HOLD=str(hold), MLOPS_TUNE_TEST_MARK=str(workdir))

    def trial_0_in_its_fit() -> bool:
        [trial, *_] = optuna.load_study(study_name=name, storage=storage).trials
        return trial.state == TrialState.RUNNING and {keys.TICKET, keys.RUN} <= set(trial.user_attrs)

    try:
        _wait_for(proc, trial_0_in_its_fit)
        [pid] = _workers_of(workdir)
        os.kill(pid, signal.SIGKILL)
        hold.unlink()  # the trials after it train at once
        out, err = proc.communicate(timeout=300)
    finally:
        _stop(proc, hold)
    assert proc.returncode == 1, err[-3000:]
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert trials[0].state == TrialState.FAIL and "exited mid-trial" in trials[0].user_attrs[keys.NOT_CHARGED]
    [retry] = [t for t in trials if t.user_attrs.get(keys.RETRY_OF) == 0]
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2 and len(trials) == 3  # the budget, whole
    assert "not charged to the budget" in out
    runs = mlflow_runs(workdir)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert next(r for r in runs if r.info.run_id == trials[0].user_attrs[keys.RUN]).info.status == "KILLED"
    workers = sorted(r.info.status for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "worker")
    assert workers == ["FAILED", "FINISHED"]  # the killed worker, and the one that ran the rest
    assert _workers_of(workdir) == []


# ----------------------------------------------------------------------------- races and stores


def test_eight_processes_start_together_on_new_sqlite_stores(tmp_path: Path) -> None:
    """No template DB here: the 8 processes race to create both schemas."""
    storage, study = f"sqlite:///{tmp_path / 'optuna.db'}", "together"
    args = ["model=knn", f"study.storage={storage}", f"study.name={study}", "study.n_trials=8",
            "gate.threshold=0.999", "study.sampler=random"]
    procs = [_start(args, tmp_path) for _ in range(8)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    assert [code for code, _, _ in results] == [1] * 8, [err[-1500:] for _, _, err in results]
    assert _judged_count(storage, study) == 8
    runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 9
    _no_running(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_journal_storage_honours_the_budget(workdir: Path) -> None:
    storage = f"journal:///{workdir / 'journal.log'}"
    args = ["model=knn", f"study.storage={storage}", "gate.threshold=0.999", "study.sampler=random"]
    assert _run([*args, "study.n_trials=3"], workdir).returncode == 1
    assert len(_journal_trials(storage)) == 3
    assert _run([*args, "study.n_trials=4"], workdir).returncode == 1
    assert len(_journal_trials(storage)) == 4


def _kill_mid_trial(args: list[str], workdir: Path, trials: Callable[[], list]) -> None:
    """Start a study and SIGKILL it while its first trial runs (its trial stays RUNNING)."""
    proc = _start(args, workdir, MLOPS_TUNE_TEST_SLEEP="60")
    _wait_for(proc, lambda: any(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
                                for t in trials()))
    proc.kill()
    proc.communicate(timeout=60)


def test_a_rerun_waits_for_a_dead_process_trial_instead_of_judging_without_it(workdir: Path) -> None:
    """Exit 1 means the budget trained: a rerun that finds a trial of a killed process still
    RUNNING (its heartbeat not yet stale) waits for it, takes it back once stale, and runs it."""
    storage, study = f"sqlite:///{workdir / 'optuna.db'}", "dead-process"
    args = [f"study.storage={storage}", f"study.name={study}", "study.n_trials=2", "study.heartbeat_interval=1",
            "study.grace_period=3", *SLOW]
    _kill_mid_trial(args, workdir, lambda: _trials(storage, study))
    # the dead process's heartbeat is kept fresh by hand until the rerun is waiting for it: the rerun
    # meets a trial that may still be alive, however long its own start takes
    rdb = optuna.storages.RDBStorage(storage, heartbeat_interval=1, grace_period=3)
    trial_id = rdb.get_trial_id_from_study_id_trial_number(rdb.get_study_id_from_name(study), 0)
    rerun = _start(args, workdir, MLOPS_TUNE_TEST_SLEEP="0")
    lines: list[str] = []
    beating = threading.Event()
    beating.set()

    def beat() -> None:
        while beating.is_set():
            rdb.record_heartbeat(trial_id)
            time.sleep(0.5)

    threading.Thread(target=beat, daemon=True).start()
    assert rerun.stdout is not None
    for line in rerun.stdout:
        lines.append(line)
        if "waiting for trial(s) [0]" in line:
            beating.clear()  # the process is dead after all: its heartbeat goes stale
    _, err = rerun.communicate(timeout=120)
    beating.clear()
    out = "".join(lines)
    assert rerun.returncode == 1, out[-2000:] + err[-2000:]
    assert "waiting for trial(s) [0]" in out and "taken back" in out, out[-3000:]
    assert _judged_count(storage, study) == 2
    assert not [t for t in _trials(storage, study) if t.state == TrialState.RUNNING]
    _no_running(f"sqlite:///{workdir / 'mlflow.db'}")


def test_a_rerun_without_heartbeats_gives_no_verdict_while_a_trial_is_in_flight(workdir: Path) -> None:
    """A journal file keeps no heartbeats: a RUNNING trial of another process may be alive or
    dead, so the rerun says so (exit 3), never "gate MISSED" over a budget that did not train."""
    storage = f"journal:///{workdir / 'journal.log'}"
    args = [f"study.storage={storage}", "study.n_trials=2", *SLOW]
    _kill_mid_trial(args, workdir, lambda: _journal_trials(storage))
    rerun = _run(args, workdir, MLOPS_TUNE_TEST_SLEEP="0")
    assert rerun.returncode == 3, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    _one_error_line(rerun.stderr, "still RUNNING in another process", "no verdict")


def _journal_trials(url: str) -> list:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(url.removeprefix("journal:///")))
    return optuna.load_study(study_name="knn-digits", storage=storage).get_trials()


def test_a_failed_promotion_is_exit_3_and_the_rerun_promotes(workdir: Path) -> None:
    """The registry table refuses writes (a trigger in the real store): the promotion fails,
    its claim is given back, and the rerun registers the model."""
    db = workdir / "mlflow.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON model_versions "
                     "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
    args = ["model=knn", "gate.threshold=0.95", "study.n_trials=2"]
    failed = _run(args, workdir)
    assert failed.returncode == 3, failed.stderr[-3000:]
    _one_error_line(failed.stderr, "MLflow tracking store")
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER refuse")
    rerun = _run(args, workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "is now 'champion'" in rerun.stdout
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    assert str(client.get_model_version_by_alias("mlops-tune-knn-digits", "champion").version) == "1"
    _no_running(f"sqlite:///{db}")


def test_an_invalid_registry_name_is_exit_2_before_anything_runs(workdir: Path) -> None:
    result = _run(["model=knn", "registry.name=bad/name"], workdir)
    assert result.returncode == 2
    _one_error_line(result.stderr, "registry.name", "bad/name")
    assert not (workdir / "optuna.db").exists() and mlflow_runs(workdir) == []


def test_a_tie_does_not_move_the_champion(workdir: Path) -> None:
    args = ["model=knn", "gate.threshold=0.95", "study.n_trials=1"]
    assert _run([*args, "study.name=first"], workdir).returncode == 0
    second = _run([*args, "study.name=second"], workdir)  # the same model: the same test accuracy
    assert second.returncode == 0, second.stderr
    assert "'champion' stays" in second.stdout
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("mlops-tune-knn-digits", "champion").version) == "1"
    versions = client.search_model_versions("name='mlops-tune-knn-digits'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]


def test_credentials_from_the_environment_keep_working(server: Server, workdir: Path) -> None:
    """``MLFLOW_TRACKING_USERNAME/PASSWORD`` are the documented way; a password moved out of the
    URI lands there, so both reach the server the same way."""
    result = _run(["model=knn", f"tracking.uri={server.url}", "study.n_trials=1"], workdir,
                  MLFLOW_TRACKING_USERNAME="alice", MLFLOW_TRACKING_PASSWORD=SECRET)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    _secret_free(workdir / "outputs")


# ----------------------------------------------------------------------------- a study never gets stuck


@pytest.mark.parametrize("threshold", ["0.999", "0.5"])
def test_a_replaced_tracking_store_is_recovered_by_the_next_run(threshold: str, workdir: Path) -> None:
    """The tracking database deleted between two runs: the study's parent run and its models are
    gone. The next run records the study in a new parent run (said in one line) instead of
    failing on the missing run forever; a passed gate's winner is trained again and promoted."""
    args = ["model=knn", "study.n_trials=1", f"gate.threshold={threshold}", "study.sampler=random"]
    first = _run(args, workdir)
    assert first.returncode in (0, 1), first.stderr[-3000:]
    for leftover in workdir.glob("mlflow.db*"):
        leftover.unlink()
    rerun = _run([*args[:1], "study.n_trials=2", *args[2:]], workdir)
    assert rerun.returncode == first.returncode, rerun.stderr[-3000:]
    assert "is gone from the tracking store" in rerun.stdout
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    [parent] = [r for r in mlflow_runs(uri) if tracking.TAG_GATE in r.data.tags]
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    assert optuna.load_study(study_name="knn-digits", storage=storage).user_attrs[keys.PARENT_RUN] == parent.info.run_id
    if threshold == "0.5":  # gate met by trial 0 before: its model, gone with the store, is trained again
        assert "trained again" in rerun.stdout
        client = mlflow.MlflowClient(uri)
        assert client.get_model_version_by_alias("mlops-tune-knn-digits", "champion").tags["trial"] == "0"
    else:
        assert _judged_count(storage, "knn-digits") == 2
    again = _run([*args[:1], "study.n_trials=2", *args[2:]], workdir)
    assert again.returncode == first.returncode and "is gone" not in again.stdout
    _no_running(uri)


def test_an_output_folder_deleted_mid_study_is_one_line_exit_3(workdir: Path) -> None:
    hold = workdir / "hold"
    hold.touch()
    out = workdir / "out"
    proc = _start([*SLOW, "study.n_trials=1", f"hydra.run.dir={out}"], workdir, MLOPS_TUNE_TEST_HOLD=str(hold))
    _wait_for(proc, lambda: any(t.state == TrialState.RUNNING for t in _trials(f"sqlite:///{workdir / 'optuna.db'}",
                                                                              "knn-digits")))
    shutil.rmtree(out)
    hold.unlink()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    _one_error_line(err, "cannot write the study's outputs in", str(out), "No such file or directory")
    _no_running(f"sqlite:///{workdir / 'mlflow.db'}")


# ----------------------------------------------------------------------------- nothing waits forever


@contextlib.contextmanager
def _stopped(server: Server) -> Iterator[None]:
    """The server's processes stopped (SIGSTOP): connections are accepted, nothing is answered."""
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)


def _held_study(server: Server, workdir: Path, **env: str) -> tuple[subprocess.Popen, Path]:
    hold = workdir / "hold"
    hold.touch()
    proc = _start([*SLOW, "study.n_trials=2", f"tracking.uri={server.url}"], workdir,
                  MLOPS_TUNE_TEST_HOLD=str(hold), **env)
    _wait_for(proc, lambda: any(t.state == TrialState.RUNNING for t in _trials(
        f"sqlite:///{workdir / 'optuna.db'}", "knn-digits")))
    return proc, hold


def test_a_tracking_server_that_stops_answering_ends_the_study_in_bounded_time(server: Server,
                                                                              workdir: Path) -> None:
    """A server that accepts connections and never answers: every request has a deadline
    (MLFLOW_HTTP_REQUEST_TIMEOUT, 20 s by default; 2 s here), so the study ends with exit 3 and
    one line naming the server after the retries, not after MLflow's 120 s x 8 tries."""
    proc, hold = _held_study(server, workdir, MLFLOW_HTTP_REQUEST_TIMEOUT="2", **FAST_GIVE_UP)
    with _stopped(server):
        started = time.monotonic()
        hold.unlink()  # the trial ends: its results go to the silent server
        _, err = proc.communicate(timeout=300)
        waited = time.monotonic() - started
    assert proc.returncode == 3, err[-3000:]
    _one_error_line(err, f"127.0.0.1:{server.port}")
    assert waited < 60, waited  # 2 tries of 2 s per call (unbounded, this was minutes)


def test_a_stop_signal_during_a_blocked_tracking_call_ends_the_study_within_seconds(server: Server,
                                                                                  workdir: Path) -> None:
    """SIGTERM (a Jenkins abort) while the study waits on a server that does not answer, with the
    default deadlines: it stops within 5 s; the runs it could not close are closed by the next start."""
    proc, hold = _held_study(server, workdir)
    with _stopped(server):
        hold.unlink()  # the trial's results go to the silent server: the study blocks there
        time.sleep(2)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        waited = time.monotonic() - started
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err[-3000:]
    assert "MLflow runs closed as KILLED" not in err, err  # they were not: the line says what happened
    assert waited <= 5, (waited, err[-2000:])


def test_a_stop_signal_while_blocked_inside_a_database_lock_ends_the_study_within_seconds(workdir: Path) -> None:
    """The study waits inside SQLite's C code for a lock another process holds (60 s busy
    timeout), where Python's signal handler cannot run until the call returns: the stop's
    deadline starts from the signal's wake-up pipe all the same."""
    hold = workdir / "hold"
    hold.touch()
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    proc = _start([*SLOW, "study.n_trials=2"], workdir, MLOPS_TUNE_TEST_HOLD=str(hold))
    _wait_for(proc, lambda: any(t.state == TrialState.RUNNING for t in _trials(storage, "knn-digits")))
    lock = sqlite3.connect(workdir / "optuna.db", isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # every write of the study waits for it
        hold.unlink()  # the trial ends: its result is a write
        time.sleep(2)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        waited = time.monotonic() - started
    finally:
        lock.rollback()
        lock.close()
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err, err[-3000:]
    assert waited <= 5, (waited, err[-2000:])
