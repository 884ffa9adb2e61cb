"""Shared fixtures: a working folder with a ready MLflow DB, and the commands as subprocesses.

Creating an MLflow SQLite DB runs its migrations (~5 s here), so one template DB is made
per test session and copied into each test's folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devtools import devservices

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
#: under CI the tests that need PostgreSQL or Docker fail instead of skipping
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
#: CI runs as root: read-only mounts and tmpfs file systems are real there
IS_ROOT = os.geteuid() == 0
#: one trial at a time unless a test asks for more: trial order and counts stay deterministic.
#: tests/e2e/test_parallel.py and the main job's test run the default (study.n_jobs=auto)
os.environ.setdefault("MLOPS_TUNE_N_JOBS", "1")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """stderr lines written by mlops-tune itself ("prog: error: ...")."""
        return [line for line in self.stderr.splitlines() if ": error: " in line]


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mlflow-template")
    code = (
        "import mlflow, logging; logging.disable(logging.INFO); "
        "mlflow.set_tracking_uri('sqlite:///mlflow.db'); mlflow.MlflowClient().search_experiments()"
    )
    subprocess.run([sys.executable, "-c", code], cwd=folder, check=True, capture_output=True)
    return folder / "mlflow.db"


@pytest.fixture
def workdir(tmp_path: Path, mlflow_template: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh working folder holding a copy of the template MLflow DB; cwd for the test."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture(autouse=True)
def _forget_mlflow_state() -> Iterator[None]:
    """After every test that used MLflow in this process: no tracking URI, nor the experiment it
    set (tracking.connect -> mlflow.set_experiment): a later test's mlflow.start_run() would look
    for it in another store ("No Experiment with id=1 exists"), whatever folder the test used."""
    yield
    fluent = sys.modules.get("mlflow.tracking.fluent")
    if fluent is None:  # MLflow never imported: nothing to forget (and no import for it)
        return
    import mlflow

    mlflow.set_tracking_uri(None)
    fluent._active_experiment_id = None
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


def command_env(**extra: str) -> dict[str, str]:
    # not the experiment an in-process test left behind (mlflow.set_experiment sets
    # MLFLOW_EXPERIMENT_ID; `mlflow run --experiment-name` then refuses both)
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_EXPERIMENT_ID"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env.update(extra)
    return env


def run_command(name: str, *args: str, cwd: Path, timeout: float = 600, **env: str) -> Result:
    """Run ``mlops-train`` or ``mlops-tune`` as a user would, in ``cwd``."""
    proc = subprocess.run(
        [str(BIN / name), *args], cwd=cwd, env=command_env(**env),
        capture_output=True, text=True, timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def train(workdir: Path):
    def run(*args: str, **env: str) -> Result:
        return run_command("mlops-train", *args, cwd=workdir, **env)

    return run


@pytest.fixture
def tune(workdir: Path):
    def run(*args: str, **env: str) -> Result:
        return run_command("mlops-tune", *args, cwd=workdir, **env)

    return run


def mlflow_runs(store: Path | str, experiment: str = "mlops-tune") -> list:
    """All runs of ``experiment`` (oldest first) in ``store``: a folder's mlflow.db, or a tracking URI."""
    import mlflow

    uri = f"sqlite:///{store / 'mlflow.db'}" if isinstance(store, Path) else store
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(reversed(client.search_runs([exp.experiment_id], max_results=1000)))


def mlflow_client(folder: Path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")


def heavy_imports_after(command: str, args: list[str], cwd: Path) -> tuple[int, list[str], str]:
    """Run ``mlops_tune.<command>.main`` with ``args`` in a fresh interpreter; return its exit
    code, the TensorFlow, Keras and Ray modules it imported (none but where they are used), and its stderr."""
    probe = (
        "import sys\n"
        f"sys.argv = ['mlops-{command}', *{args!r}]\n"
        f"from mlops_tune.{command} import main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'ray'))\n"
        "print('HEAVY=' + ','.join(heavy))\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=cwd, env=command_env(),
                          capture_output=True, text=True, timeout=300)
    heavy = proc.stdout.rsplit("HEAVY=", 1)[-1].strip()
    return proc.returncode, [m for m in heavy.split(",") if m], proc.stderr


def kill_when_a_trial_runs(victim: subprocess.Popen, study: str, storage: str, timeout: float = 300) -> None:
    """SIGKILL ``victim`` as soon as one of its trials is RUNNING with its MLflow run created."""
    import signal
    import time

    import optuna
    from optuna.trial import TrialState

    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if victim.poll() is not None:
                _, err = victim.communicate()
                pytest.fail(f"the worker to kill exited by itself ({victim.returncode}): {err[-2000:]}")
            try:
                trials = optuna.load_study(study_name=study, storage=storage).get_trials()
            except KeyError:  # the study does not exist yet
                trials = []
            if any(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in trials):
                os.kill(victim.pid, signal.SIGKILL)
                return
            time.sleep(0.5)
        pytest.fail("the worker to kill never started a trial")
    finally:
        victim.kill()
        victim.communicate()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory):
    if devservices.postgres_bin("initdb") is None:
        if IN_CI:
            pytest.fail("PostgreSQL server binaries are required in CI")
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    # not under pytest's tmp folder: as root the cluster runs as `postgres`, which may not enter it
    folder = Path(tempfile.mkdtemp(prefix="mlops-tune-pg-"))
    pg = devservices.start_postgres(folder)
    yield pg
    devservices.stop_postgres(pg)
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` read-only: a read-only bind mount as root (even root cannot write it), modes elsewhere."""
    if IS_ROOT:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        # a process writing there right now (a file opened on the new mount between these two
        # calls) makes the remount "busy" for a moment: try again briefly
        for attempt in range(50):
            done = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True, text=True)
            if done.returncode == 0:
                break
            if attempt == 49 or "busy" not in done.stderr:
                subprocess.run(["umount", str(folder)], check=False)
                raise RuntimeError(f"cannot make {folder} read-only: {done.stderr.strip()}")
            time.sleep(0.1)
        try:
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=False)
    else:
        files = [folder, *folder.iterdir()]
        for path in files:
            path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            for path in files:
                path.chmod(0o755 if path.is_dir() else 0o644)


def compose_config(config: str, *overrides: str) -> Any:
    """The config ``mlops-<config>`` would get for these overrides, composed by Hydra from ``conf/``
    (a DictConfig, unresolved; ``mlops_tune.config.load_train``/``load_tune`` turn it into a checked dict)."""
    from hydra import compose, initialize_config_dir

    from mlops_tune.config.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config, overrides=list(overrides))
