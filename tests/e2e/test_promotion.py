"""A passed gate always ends with a champion: a process killed at any step between "a trial met
the gate" and "the alias moved" leaves a study that the next run finishes (docs/reliability.md,
rows 39-40). Each kill is real (SIGKILL, the process kills itself at that point of its code:
``tests/killpoint.py``), so the stores hold exactly what such a kill leaves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest

from mlops_tune.records import registry
from tests.conftest import ROOT, command_env, mlflow_runs

ARGS = ["model=knn", "gate.threshold=0.9", "study.n_trials=3", "study.n_jobs=1",
        "study.heartbeat_interval=1", "study.grace_period=2"]
MODEL = "mlops-tune-knn-digits"

#: where the first run dies: (what is killed, what is made to hang so the kill finds it unfinished)
KILLS = {
    "model files not written": ("mlops_tune.runners.inprocess:InProcessRunner.drain",
                                "hang=mlops_tune.trial:write_model"),
    "claimed, not registered": ("mlops_tune.records.registry:register",),
    "registered, alias not moved": ("mlops_tune.records.registry:set_champion",),
    "alias moved, decision not recorded": ("mlops_tune.records.registry:record_decision",),
    "promoted, report not written": ("mlops_tune.show.report:log_study_page",),
}


def _tune(workdir: Path, *points: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "tests.killpoint", *points, "--", *ARGS]
    return subprocess.run(command, cwd=workdir, env=command_env(PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=600)


def _study_versions(client: mlflow.MlflowClient) -> list:
    return [v for v in client.search_model_versions(f"name='{MODEL}'") if registry.STUDY_KEY in v.tags]


@pytest.mark.parametrize("where", list(KILLS))
def test_a_kill_between_the_gate_and_the_alias_is_finished_by_the_next_run(where: str, workdir: Path) -> None:
    killed = _tune(workdir, *KILLS[where])
    assert killed.returncode == -9, killed.stderr[-3000:]
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    study = optuna.load_study(study_name="knn-digits", storage=f"sqlite:///{workdir / 'optuna.db'}")
    winner = study.best_trial.number  # the gate was met before the kill

    rerun = _tune(workdir)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.tags["trial"] == str(winner)
    assert [v.version for v in _study_versions(client)] == [champion.version]  # registered once
    rebuilt = "trained again" in rerun.stdout
    assert rebuilt == (where == "model files not written"), rerun.stdout[-3000:]

    again = _tune(workdir)  # nothing left to do: no new version, no second rebuild
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already promoted" in again.stdout and "trained again" not in again.stdout, again.stdout[-3000:]
    assert len(_study_versions(client)) == 1
    assert [r.info.run_id for r in mlflow_runs(uri) if r.info.status == "RUNNING"] == []
