"""runner=mlflow and the MLproject: trials as MLflow Project runs, pruning across processes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mlops_tune import tracking
from tests.conftest import BIN, ROOT, command_env, mlflow_runs

pytestmark = pytest.mark.usefixtures("workdir")


def _study(folder: Path, name: str = "knn-digits") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")


def test_mlflow_runner_trials_are_project_runs_under_the_study(tune, workdir: Path) -> None:
    result = tune("model=knn", "runner=mlflow", "study.n_trials=2", "gate.threshold=0.999")
    assert result.code == 1, result.stderr
    assert [t.state for t in _study(workdir).trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    runs = mlflow_runs(workdir)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    for child in children:  # the Project run IS the trial's child run
        assert child.data.tags["mlflow.source.type"] == "PROJECT"
        assert child.data.tags["mlflow.project.entryPoint"] == "train"
        assert child.data.tags[tracking.TAG_STATE] == "COMPLETE"
        assert child.info.status == "FINISHED"
    trial0 = next(c for c in children if c.data.tags[tracking.TAG_TRIAL_NUMBER] == "0")
    assert trial0.data.params["model.n_neighbors"] == "1"
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(_study(workdir).best_value)


def test_mlflow_runner_prunes_across_the_process_boundary(tune, workdir: Path) -> None:
    result = tune("model=knn", "runner=mlflow", "study.n_trials=2", "gate.threshold=0.999",
                  "study.pruner={_target_:optuna.pruners.ThresholdPruner,lower:0.999}")
    assert result.code == 1, result.stderr
    trials = _study(workdir).trials
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.PRUNED]
    # the value the pruner judged was reported by the trial's own process, to the shared storage
    assert all(set(t.intermediate_values) == {0} and t.intermediate_values[0] > 0.5 for t in trials)
    children = [r for r in mlflow_runs(workdir) if "mlflow.parentRunId" in r.data.tags]
    assert {c.data.tags[tracking.TAG_STATE] for c in children} == {"PRUNED"}


@pytest.mark.parametrize(("data", "threshold", "passes"), [("wine", "0.9", True), ("digits", "1.0", False)])
def test_mlflow_run_tune_entry_point_exit_code(workdir: Path, data: str, threshold: str, passes: bool) -> None:
    overrides = (f"model=knn data={data} gate.threshold={threshold} study.n_trials=2 "
                 f"study.storage=sqlite:///{workdir / 'optuna.db'} hydra.run.dir={workdir / 'outputs'}")
    env = command_env(MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # `--env-manager local`: this environment's python
    proc = subprocess.run([str(BIN / "mlflow"), "run", str(ROOT), "-e", "tune", "-P", f"overrides={overrides}",
                           "--env-manager", "local"], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert (proc.returncode == 0) == passes, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = mlflow_runs(workdir, experiment="Default")
    [project_run] = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "tune"]
    # the Project run is the study's parent run: the trials nest under it
    assert project_run.data.tags[tracking.TAG_GATE] == ("passed" if passes else "missed")
    assert [r for r in runs if r.data.tags.get("mlflow.parentRunId") == project_run.info.run_id]
