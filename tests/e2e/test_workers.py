"""Scale-out: several workers on ONE study, over SQLite and PostgreSQL, tracked on one MLflow.

Every test runs for each storage mode (Optuna-style parametrization). PostgreSQL is a
throwaway cluster on 127.0.0.1 and the MLflow tracking server uses it as backend store;
in CI both must start (the tests fail otherwise), elsewhere they skip and say why.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from devtools import devservices
from mlops_tune.records import claims, tracking
from tests.conftest import BIN, command_env, kill_when_a_trial_runs, mlflow_runs

STORAGE_MODES = ["sqlite", "postgres"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("mlflow-server")
    proc, url = devservices.start_mlflow_server(postgres.url("mlflow"), folder / "artifacts",
                                                log=folder / "server.log")
    yield url
    devservices.stop_process(proc)


@pytest.fixture(params=STORAGE_MODES)
def stores(request: pytest.FixtureRequest, workdir: Path) -> dict[str, str]:
    """``study.storage`` and ``tracking.uri`` of one mode, plus a fresh experiment name."""
    experiment = f"exp-{uuid.uuid4().hex[:8]}"
    if request.param == "sqlite":
        return {"storage": f"sqlite:///{workdir / 'optuna.db'}", "tracking": f"sqlite:///{workdir / 'mlflow.db'}",
                "experiment": experiment}
    pg = request.getfixturevalue("postgres")
    return {"storage": pg.url("optuna"), "tracking": request.getfixturevalue("mlflow_server"),
            "experiment": experiment}


def _args(stores: dict[str, str], study: str, *extra: str) -> list[str]:
    return [f"study.storage={stores['storage']}", f"tracking.uri={stores['tracking']}",
            f"tracking.experiment={stores['experiment']}", f"study.name={study}",
            f"registry.name=reg-{study}", "model=knn", *extra]


def _start(args: list[str], workdir: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "mlops-tune"), *args], cwd=workdir, env=command_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _runs(stores: dict[str, str]) -> list:
    return mlflow_runs(stores["tracking"], stores["experiment"])


def test_two_workers_share_one_study(stores: dict[str, str], workdir: Path) -> None:
    study = f"two-{uuid.uuid4().hex[:6]}"
    # trials of ~1 s, so that both workers get trials whatever their start-up times
    args = _args(stores, study, "study.n_trials=10", "gate.threshold=0.999", "study.sampler=random",
                 "model._target_=tests.helpers.SlowKNN")
    workers = [_start(args, workdir, MLOPS_TUNE_TEST_SLEEP="1") for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [1, 1], outputs
    trials = optuna.load_study(study_name=study, storage=stores["storage"]).get_trials()
    assert len([t for t in trials if t.state in FINISHED]) == 10
    assert sorted(t.number for t in trials) == list(range(10))
    both = [out for out, _ in outputs]
    assert all("[trial" in out for out in both), "each worker ran trials"  # asynchronous, no barrier
    runs = _runs(stores)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 10
    assert sorted(int(c.data.tags[tracking.TAG_TRIAL_NUMBER]) for c in children) == list(range(10))
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_joblib_launcher_runs_local_workers(stores: dict[str, str], workdir: Path) -> None:
    study = f"launch-{uuid.uuid4().hex[:6]}"
    proc = subprocess.run(
        [str(BIN / "mlops-tune"), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "worker=0,1",
         *_args(stores, study, "study.n_trials=6", "gate.threshold=0.999", "study.sampler=random")],
        cwd=workdir, env=command_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    trials = optuna.load_study(study_name=study, storage=stores["storage"]).get_trials()
    assert sorted(t.number for t in trials) == list(range(6))
    assert len([r for r in _runs(stores) if "mlflow.parentRunId" not in r.data.tags]) == 1


def test_workers_finishing_together_promote_once(stores: dict[str, str], workdir: Path) -> None:
    study = f"race-{uuid.uuid4().hex[:6]}"
    # the base model (k=1, ~0.989) passes: both workers see the gate met at once and finish
    args = _args(stores, study, "study.n_trials=6", "gate.threshold=0.95", "study.sampler=random")
    workers = [_start(args, workdir) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    client = mlflow.MlflowClient(tracking_uri=stores["tracking"])
    versions = client.search_model_versions(f"name='reg-{study}'")
    assert len(versions) == 1
    assert str(client.get_model_version_by_alias(f"reg-{study}", "champion").version) == str(versions[0].version)
    assert sum("already promoted" in out for out, _ in outputs) == 1


def _claim(args: tuple[str, str, str]) -> str:
    url, key, me = args
    return claims.claim(url, key, "promotion", me)


def test_claims_have_exactly_one_winner(stores: dict[str, str]) -> None:
    key = f"claim-{uuid.uuid4().hex[:6]}"
    contenders = [f"worker-{i}" for i in range(8)]
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        seen = pool.map(_claim, [(stores["storage"], key, me) for me in contenders])
    assert len(set(seen)) == 1 and seen[0] in contenders


def test_killed_worker_trial_is_failed_and_retried(stores: dict[str, str], workdir: Path) -> None:
    study = f"kill-{uuid.uuid4().hex[:6]}"
    base = _args(stores, study, "study.n_trials=3", "gate.threshold=0.999", "study.sampler=random",
                 "study.heartbeat_interval=1", "study.grace_period=2", "model._target_=tests.helpers.SlowKNN")
    victim = _start(base, workdir, MLOPS_TUNE_TEST_SLEEP="300")
    kill_when_a_trial_runs(victim, study, stores["storage"])
    time.sleep(3.5)
    survivor = subprocess.run([str(BIN / "mlops-tune"), *base], cwd=workdir, env=command_env(MLOPS_TUNE_TEST_SLEEP="0"),
                              capture_output=True, text=True, timeout=600)
    assert survivor.returncode == 1, survivor.stderr
    trials = optuna.load_study(study_name=study, storage=stores["storage"]).get_trials()
    assert trials[0].state == TrialState.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == trials[0].params
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    # the killed trial cost the budget nothing: the study still judged n_trials trials
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 3, [t.state for t in trials]
    runs = _runs(stores)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = next(r for r in runs if r.info.run_id == trials[0].user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED"


def test_no_password_is_logged(postgres, mlflow_server: str, workdir: Path) -> None:
    secret = "S3cretPw"
    host = mlflow_server.removeprefix("http://")
    stores = {"storage": postgres.url("optuna").replace("postgres@", f"postgres:{secret}@"),
              "tracking": f"http://mlops:{secret}@{host}", "experiment": f"exp-{uuid.uuid4().hex[:8]}"}
    study = f"secret-{uuid.uuid4().hex[:6]}"
    proc = subprocess.run([str(BIN / "mlops-tune"), *_args(stores, study, "study.n_trials=2", "gate.threshold=0.95")],
                          cwd=workdir, env=command_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert secret not in proc.stdout + proc.stderr
    clean = {**stores, "tracking": mlflow_server}
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    runs = _runs(clean)
    assert runs
    for run in runs:
        texts = [*run.data.params.values(), *run.data.tags.values()]
        folder = Path(client.download_artifacts(run.info.run_id, "", dst_path=str(workdir / run.info.run_id)))
        texts += [p.read_text(errors="ignore") for p in folder.rglob("*") if p.is_file()]
        assert not [t for t in texts if secret in t], run.info.run_id
