"""runner=mlflow and the MLproject: trials as MLflow Project runs, pruning across processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mlops_tune.records import tracking
from tests.conftest import BIN, ROOT, command_env, mlflow_runs

pytestmark = pytest.mark.usefixtures("workdir")


def _study(folder: Path, name: str = "knn-digits") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")


def _trials_and_workers(runs: list) -> tuple[list, list]:
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    workers = [r for r in children if r.data.tags.get(tracking.TAG_ROLE) == "worker"]
    return [r for r in children if r not in workers], workers


@pytest.mark.parametrize("fresh", [False, True], ids=["warm", "fresh"])
def test_mlflow_runner_trials_are_project_runs_under_the_study(tune, workdir: Path, fresh: bool) -> None:
    result = tune("model=knn", "runner=mlflow", "study.n_trials=3", "gate.threshold=0.999",
                  f"runner.fresh_per_trial={str(fresh).lower()}")
    assert result.code == 1, result.stderr
    assert [t.state for t in _study(workdir).trials] == [TrialState.COMPLETE] * 3
    children, workers = _trials_and_workers(mlflow_runs(workdir))
    assert len(children) == 3
    # every worker is a Project run of the `worker` entry point under the study's run, ended FINISHED;
    # warm: ONE worker process ran every trial; fresh: a worker (a fresh process) per trial
    assert len(workers) == (3 if fresh else 1)
    for worker in workers:
        assert worker.data.tags["mlflow.project.entryPoint"] == "worker" and worker.info.status == "FINISHED"
        assert worker.data.tags["mlflow.source.type"] == "PROJECT"
    ran = [c.data.tags[tracking.TAG_WORKER_RUN] for c in children]
    assert sorted(ran) == sorted(w.info.run_id for w in workers) * (1 if fresh else 3)
    for child in children:
        assert child.data.tags[tracking.TAG_STATE] == "COMPLETE"
        assert child.info.status == "FINISHED"
    trial0 = next(c for c in children if c.data.tags[tracking.TAG_TRIAL_NUMBER] == "0")
    assert trial0.data.params["model.n_neighbors"] == "1"
    [parent] = [r for r in mlflow_runs(workdir) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(_study(workdir).best_value)


def test_a_timeout_that_ends_the_study_before_any_trial_trained_gives_no_verdict(tune, workdir: Path) -> None:
    """Exit 1 says the budget trained: a worker process starts well after 10 ms of the study's
    time, so its loop ends before its first trial, and the study says so (exit 3), no verdict."""
    result = tune("model=knn", "runner=mlflow", "study.n_trials=3", "study.timeout=0.01")
    assert result.code == 3, result.stderr[-2000:]
    [line] = result.error_lines
    assert "no trial trained" in line and "study.timeout=0.01" in line and "no verdict" in line
    assert "gate MISSED" not in result.stdout
    runs = mlflow_runs(workdir)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED" and tracking.TAG_GATE not in parent.data.tags
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_mlflow_runner_prunes_across_the_process_boundary(tune, workdir: Path) -> None:
    result = tune("model=knn", "runner=mlflow", "study.n_trials=2", "gate.threshold=0.999",
                  "study.pruner={_target_:optuna.pruners.ThresholdPruner,lower:0.999}")
    assert result.code == 1, result.stderr
    trials = _study(workdir).trials
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.PRUNED]
    # the value the pruner judged was reported by the trial's own process, to the shared storage
    assert all(set(t.intermediate_values) == {0} and t.intermediate_values[0] > 0.5 for t in trials)
    children, _ = _trials_and_workers(mlflow_runs(workdir))
    assert {c.data.tags[tracking.TAG_STATE] for c in children} == {"PRUNED"}


@pytest.mark.parametrize(("data", "threshold", "passes"), [("wine", "0.9", True), ("digits", "1.0", False)])
def test_mlflow_run_tune_entry_point_exit_code(workdir: Path, data: str, threshold: str, passes: bool) -> None:
    """As a Jenkins `sh` step calls it: `.venv/bin/mlflow run` with the venv NOT on PATH (the entry
    point finds the checkout's interpreter), into a named experiment."""
    overrides = (f"model=knn data={data} gate.threshold={threshold} study.n_trials=2 "
                 f"study.storage=sqlite:///{workdir / 'optuna.db'} hydra.run.dir={workdir / 'outputs'}")
    env = command_env(MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != BIN)
    proc = subprocess.run([str(BIN / "mlflow"), "run", str(ROOT), "-e", "tune", "-P", f"overrides={overrides}",
                           "--env-manager", "local", "--experiment-name", "mlops-tune"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == passes, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = mlflow_runs(workdir, experiment="mlops-tune")
    [project_run] = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "tune"]
    # the Project run is the study's parent run: the trials nest under it; MLflow calls a
    # non-zero exit FAILED, mlops_tune.gate says why
    assert project_run.data.tags[tracking.TAG_GATE] == ("passed" if passes else "missed")
    assert project_run.info.status == ("FINISHED" if passes else "FAILED")
    assert project_run.info.run_name.endswith(f" knn-{data}")  # its verdict, then the study's name
    assert [r for r in runs if r.data.tags.get("mlflow.parentRunId") == project_run.info.run_id]


def test_mlflow_run_without_a_python_that_has_the_project_says_what_to_do(tmp_path: Path) -> None:
    env = command_env()
    env["PATH"] = "/usr/bin:/bin"  # no venv, no .venv in the folder: the system Python only
    proc = subprocess.run(["sh", str(ROOT / "scripts" / "mlproject-python"), "-c", "pass"], cwd=tmp_path,
                          env={**env, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith("mlflow run: error: no Python with mlops_tune") and "make install" in line


def test_mlflow_run_with_tracking_uri_in_the_overrides_says_to_set_the_variable(workdir: Path) -> None:
    """MLflow creates the Project run in ITS store; a different tracking.uri cannot find it."""
    overrides = (f"model=knn data=wine study.n_trials=1 tracking.uri=sqlite:///{workdir / 'other.db'} "
                 f"study.storage=sqlite:///{workdir / 'optuna.db'} hydra.run.dir={workdir / 'outputs'}")
    env = command_env(MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    proc = subprocess.run([str(BIN / "mlflow"), "run", str(ROOT), "-e", "tune", "-P", f"overrides={overrides}",
                           "--env-manager", "local"], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("mlops-tune: error:")]
    assert "MLFLOW_RUN_ID" in line and f"set MLFLOW_TRACKING_URI=sqlite:///{workdir / 'other.db'}" in line


def test_mlflow_runner_works_from_an_installed_wheel(tmp_path: Path) -> None:
    """runner=mlflow needs no source checkout: the package built as a wheel, installed outside
    the repository and run from an unrelated folder runs its trials as Project runs."""
    source = tmp_path / "source"  # a copy, so the build writes nothing into the checkout
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "tests", "benchmarks", "outputs", "multirun", "mlruns", "*.db", "*.lock",
        ".hypothesis", ".pytest_cache", "__pycache__", "*.egg-info", "build", ".services"))
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = wheels.glob("mlops_tune-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    shutil.rmtree(source)  # nothing may be read from a checkout
    env = {key: value for key, value in os.environ.items() if key not in ("MLOPS_TUNE_CONF", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), TF_CPP_MIN_LOG_LEVEL="3", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    where = subprocess.run([sys.executable, "-c", "import mlops_tune; print(mlops_tune.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(site)), where  # the wheel's copy, not the editable checkout
    proc = subprocess.run([sys.executable, "-m", "mlops_tune.tune", "model=knn", "runner=mlflow", "study.n_trials=2",
                           "gate.threshold=0.999"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [t.state for t in _study(elsewhere).trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    children, [worker] = _trials_and_workers(mlflow_runs(elsewhere))
    assert len(children) == 2
    assert worker.data.tags["mlflow.project.entryPoint"] == "worker" and worker.info.status == "FINISHED"
    assert str(ROOT) not in worker.data.tags["mlflow.source.name"]
    for child in children:
        assert child.data.tags[tracking.TAG_STATE] == "COMPLETE" and child.info.status == "FINISHED"
