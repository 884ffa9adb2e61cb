"""runner=docker: trials in their family's image, against a real Docker engine.

Needs a running engine and the images (`make images`). Without them these tests skip
with the reason, except under CI (CI=true), where they fail: CI must not lose them.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from devtools import devservices
from mlops_tune.config.cli import CONF_DIR
from mlops_tune.records import tracking
from tests.conftest import BIN, IN_CI, ROOT, command_env, mlflow_runs, run_command

DEFAULT_IMAGES = yaml.safe_load((CONF_DIR / "runner" / "docker.yaml").read_text())["images"]

pytestmark = pytest.mark.slow


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI must run the container tests; .ci/run starts dockerd and builds the images)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def engine() -> None:
    """A reachable Docker engine with both trial images."""
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:
        _missing(f"no Docker engine reachable ({str(exc).splitlines()[0][:120]})")
    try:
        for image in DEFAULT_IMAGES.values():
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                _missing(f"image {image} not built (make images)")
    finally:
        client.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An MLflow server on 127.0.0.1 (SQLite backend, proxied artifacts) that containers reach."""
    folder = tmp_path_factory.mktemp("docker-server")
    proc, url = devservices.start_mlflow_server(f"sqlite:///{folder / 'mlflow.db'}", folder / "artifacts",
                                                log=folder / "server.log")
    yield url
    devservices.stop_process(proc)


def _tune(workdir: Path, server: str, experiment: str, *args: str, **env: str):
    return run_command("mlops-tune", "runner=docker", f"tracking.uri={server}", f"tracking.experiment={experiment}",
                       f"study.storage=sqlite:///{workdir / 'optuna.db'}", *args, cwd=workdir, **env)


def _children(runs: list) -> list:
    """The trials' runs (not the warm workers' own runs); none before the study's run exists."""
    parents = [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) <= 1, parents
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") in parents
            and r.data.tags.get(tracking.TAG_ROLE) != "worker"]


def _workers(runs: list) -> list:
    return [r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "worker"]


def _containers_left() -> str:
    return subprocess.run(["docker", "ps", "-aq", "--filter", "name=mlops-tune-"], capture_output=True,
                          text=True).stdout.strip()


def _experiment() -> str:
    return f"docker-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("mode", [["runner.workers=2"], ["runner.fresh_per_trial=true"]], ids=["warm", "fresh"])
def test_knn_study_runs_every_trial_in_the_sklearn_image(engine, server: str, workdir: Path, mode: list[str]) -> None:
    experiment = _experiment()
    result = _tune(workdir, server, experiment, "model=knn", "study.n_trials=4", "gate.threshold=0.9999",
                   "study.pruner=none", "study.sampler=random", "runner.memory=1g", "runner.cpus=1.5", *mode)
    assert result.code == 1, result.stderr[-3000:]  # unreachable gate: the budget is spent
    study = optuna.load_study(study_name="knn-digits", storage=f"sqlite:///{workdir / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    runs = mlflow_runs(server, experiment)
    children, workers = _children(runs), _workers(runs)
    assert len(children) == 4
    # every container is a worker: a Project run of the `worker` entry point under the study's run;
    # two warm containers share the trials, or one container per trial (fresh)
    assert len(workers) == (2 if mode == ["runner.workers=2"] else 4)
    assert {w.info.status for w in workers} == {"FINISHED"}
    assert {w.data.tags["mlflow.docker.image.uri"] for w in workers} == {DEFAULT_IMAGES["sklearn"]}
    assert {w.data.tags["mlflow.project.entryPoint"] for w in workers} == {"worker"}
    assert {c.data.tags[tracking.TAG_WORKER_RUN] for c in children} == {w.info.run_id for w in workers}
    for child in children:  # every trial ran in the image, as its own child run
        tags = child.data.tags
        assert child.info.status == "FINISHED" and tags[tracking.TAG_STATE] == "COMPLETE"
        assert tags["mlflow.project.env"] == "docker"
        assert tags["mlflow.docker.image.uri"] == DEFAULT_IMAGES["sklearn"]
        assert tags["mlops_tune.image"] == "sklearn"
        assert tags["mlops_tune.uid"] != "0"  # not root inside the container
        assert tags["mlops_tune.memory_limit"] == str(2**30)
        quota, period = tags["mlops_tune.cpu_quota"].split()
        assert int(quota) / int(period) == pytest.approx(1.5)
        # 1.5 CPUs on a bigger machine: one thread per native pool, not one per core it sees
        assert tags["mlops_tune.threads"] == "1"
        assert child.data.metrics["val_accuracy"] == pytest.approx(
            study.trials[int(tags[tracking.TAG_TRIAL_NUMBER])].value)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert _containers_left() == ""  # no trial container is left behind


def test_gate_met_in_containers_promotes_the_champion(engine, server: str, workdir: Path) -> None:
    import mlflow

    experiment, registry = _experiment(), f"reg-{uuid.uuid4().hex[:8]}"
    result = _tune(workdir, server, experiment, "model=knn", "data=wine", "gate.threshold=0.9",
                   "study.n_trials=4", f"registry.name={registry}")
    assert result.code == 0, result.stderr[-3000:]
    version = mlflow.MlflowClient(tracking_uri=server).get_model_version_by_alias(registry, "champion")
    best = max(c.data.metrics["val_accuracy"] for c in _children(mlflow_runs(server, experiment)))
    assert best >= 0.9 and version.version == "1"


def test_confirmation_retrains_run_in_the_trials_container(engine, server: str, workdir: Path) -> None:
    """gate.confirm=2: a trial that reached the threshold is retrained with another seed by the worker
    that ran it, inside its container (the run's container tags say so), not in the study's process."""
    experiment = _experiment()
    result = _tune(workdir, server, experiment, "model=knn", "data=wine", "gate.threshold=0.9", "gate.confirm=2",
                   "study.n_trials=3", "registry.promote=false")
    assert result.code in (0, 1), result.stderr[-3000:]
    runs = mlflow_runs(server, experiment)
    confirms = [r for r in runs if "mlops_tune.confirm_of" in r.data.tags]
    assert confirms, [r.data.tags for r in runs]
    workers = {w.info.run_id for w in _workers(runs)}
    for run in confirms:
        tags = run.data.tags
        assert tags["mlops_tune.image"] == "sklearn" and tags["mlops_tune.uid"] != "0"
        assert tags["mlflow.docker.image.uri"] == DEFAULT_IMAGES["sklearn"]
        assert tags[tracking.TAG_WORKER_RUN] in workers and run.info.status == "FINISHED"
    assert "over 2 seeds" in result.stdout


def test_trials_in_containers_are_pruned_through_the_storage_proxy(engine, server: str, workdir: Path) -> None:
    experiment = _experiment()
    result = _tune(workdir, server, experiment, "model=knn", "study.n_trials=2", "gate.threshold=0.9999",
                   "study.pruner={_target_:optuna.pruners.ThresholdPruner,lower:0.9999}")
    assert result.code == 1, result.stderr[-3000:]
    trials = optuna.load_study(study_name="knn-digits", storage=f"sqlite:///{workdir / 'optuna.db'}").trials
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.PRUNED]
    # the values the pruner judged came from inside the containers
    assert all(t.intermediate_values and min(t.intermediate_values.values()) > 0.5 for t in trials)
    assert {c.data.tags[tracking.TAG_STATE] for c in _children(mlflow_runs(server, experiment))} == {"PRUNED"}


def test_keras_trial_runs_in_the_keras_image(engine, server: str, workdir: Path) -> None:
    experiment = _experiment()
    # TensorFlow's log level not preset anywhere: the trial in the container quiets TensorFlow itself
    result = _tune(workdir, server, experiment, "model=ann", "model.epochs=3", "study.n_trials=1",
                   "gate.threshold=0.9999", "study.pruner=none", TF_CPP_MIN_LOG_LEVEL="")
    assert result.code == 1, result.stderr[-3000:]
    noise = re.findall(r"^.*(?:absl|node_def_util|cpu_feature_guard|^[IWE]\d{4} ).*$", result.stderr, re.M)
    assert noise == [], noise[:3]
    [child] = _children(mlflow_runs(server, experiment))
    assert child.data.tags["mlflow.docker.image.uri"] == DEFAULT_IMAGES["keras"]
    assert child.data.tags["mlops_tune.image"] == "keras"
    assert child.data.tags["mlops_tune.uid"] != "0"
    import mlflow

    history = mlflow.MlflowClient(tracking_uri=server).get_metric_history(child.info.run_id, "val_accuracy")
    assert sorted({m.step for m in history}) == [0, 1, 2]  # one value per epoch (and the final one)


@pytest.mark.parametrize("mode", [["runner.workers=2", "runner.cpus=1"], ["runner.fresh_per_trial=true"]],
                         ids=["two-warm", "fresh"])
def test_terminated_study_removes_its_trial_container(engine, server: str, workdir: Path, mode: list[str]) -> None:
    """SIGTERM (a CI abort) while trials run in containers: every container is removed and
    no run is left RUNNING."""
    experiment = _experiment()
    args = ["runner=docker", f"tracking.uri={server}", f"tracking.experiment={experiment}",
            f"study.storage=sqlite:///{workdir / 'optuna.db'}", "model=ann", "model.epochs=200",
            "model.early_stopping_patience=0", "study.pruner=none", "study.n_trials=4", "gate.threshold=0.9999",
            *mode]
    proc = subprocess.Popen([str(BIN / "mlops-tune"), *args], cwd=workdir, env=command_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    expected = 2 if "runner.workers=2" in mode else 1  # containers at once
    deadline = time.time() + 180
    while len(_containers_left().split()) < expected or not [
            r for r in _children(mlflow_runs(server, experiment)) if r.info.status == "RUNNING"]:
        assert proc.poll() is None and time.time() < deadline, "the trial containers did not start"
        time.sleep(0.5)
    time.sleep(3)  # a trial is training inside a container
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err
    assert _containers_left() == "", err[-2000:]
    runs = mlflow_runs(server, experiment)
    states = {r.info.run_name: r.info.status for r in runs}
    assert states and set(states.values()) == {"KILLED"}, states
    assert len(_workers(runs)) == expected  # one worker run per container that ran


def test_a_killed_warm_container_costs_its_trial_nothing(engine, server: str, workdir: Path) -> None:
    """`docker kill` of the warm worker mid-trial: that trial is given back and runs again on a new
    worker; the study spends its whole budget on trials that trained."""
    experiment = _experiment()
    args = ["runner=docker", f"tracking.uri={server}", f"tracking.experiment={experiment}",
            f"study.storage=sqlite:///{workdir / 'optuna.db'}", "model=ann", "model.epochs=60",
            "model.early_stopping_patience=0", "study.pruner=none", "study.n_trials=2", "gate.threshold=0.9999",
            "study.sampler=random"]
    proc = subprocess.Popen([str(BIN / "mlops-tune"), *args], cwd=workdir, env=command_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    # killed once trial 1's run exists (the worker created it: the trial holds its ticket and is
    # RUNNING in Optuna), with its 60 epochs still to train, not between two trials
    while not [r for r in _children(mlflow_runs(server, experiment))
               if r.info.status == "RUNNING" and r.data.tags.get(tracking.TAG_TRIAL_NUMBER) == "1"]:
        assert proc.poll() is None and time.time() < deadline, "trial 1 did not start"
        time.sleep(0.2)
    victim = _containers_left()
    assert len(victim.split()) == 1
    subprocess.run(["docker", "kill", victim], check=True, capture_output=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    trials = optuna.load_study(study_name="ann-digits", storage=f"sqlite:///{workdir / 'optuna.db'}").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "exited mid-trial" in trials[1].user_attrs["not_charged"]
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    runs = mlflow_runs(server, experiment)
    assert len(_workers(runs)) == 2  # the killed worker, and the one that ran the retry
    assert not [r for r in runs if r.info.status == "RUNNING"] and _containers_left() == ""
    assert "not charged to the budget" in out


def test_a_warm_worker_gives_the_same_results_as_fresh_processes_and_in_process(
        engine, server: str, workdir: Path) -> None:
    """Keras state does not leak between the trials of a warm worker: the same configs and seed
    give the same validation accuracies in one warm container, one container per trial, and
    in-process."""
    common = ["model=ann", "model.epochs=3", "study.n_trials=3", "gate.threshold=0.9999", "study.pruner=none",
              "study.sampler=random"]
    values = {}
    for name, mode in (("warm", []), ("fresh", ["runner.fresh_per_trial=true"])):
        folder = workdir / name
        folder.mkdir()
        result = _tune(folder, server, _experiment(), *common, *mode)
        assert result.code == 1, result.stderr[-3000:]
        study = optuna.load_study(study_name="ann-digits", storage=f"sqlite:///{folder / 'optuna.db'}")
        values[name] = [(t.params, t.value) for t in study.trials]
    folder = workdir / "inprocess"
    folder.mkdir()
    result = run_command("mlops-tune", *common, f"study.storage=sqlite:///{folder / 'optuna.db'}", cwd=folder)
    assert result.code == 1, result.stderr[-3000:]
    study = optuna.load_study(study_name="ann-digits", storage=f"sqlite:///{folder / 'optuna.db'}")
    values["inprocess"] = [(t.params, t.value) for t in study.trials]
    assert len({len(v) for v in values.values()}) == 1 and len(values["warm"]) == 3
    assert values["warm"] == values["fresh"] == values["inprocess"], values


def test_sklearn_image_has_no_tensorflow_and_runs_as_non_root(engine) -> None:
    probe = ("import importlib.util, os; print(os.getuid(), importlib.util.find_spec('tensorflow') is None, "
             "importlib.util.find_spec('sklearn') is not None)")
    out = subprocess.run(["docker", "run", "--rm", DEFAULT_IMAGES["sklearn"], "python", "-c", probe],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] != "0" and out[1:] == ["True", "True"]
    out = subprocess.run(["docker", "run", "--rm", DEFAULT_IMAGES["keras"], "python", "-c", probe],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] != "0" and out[1:] == ["False", "True"]


# ----------------------------------------------------------------------------- bad set-ups: exit 2, nothing written


@pytest.mark.parametrize(("args", "env", "message"), [
    (["runner.images.sklearn=mlops-tune-sklearn:no-such-tag"], {}, "make images"),
    ([], {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}, "Docker engine is not reachable"),
    (["runner.cpus=0"], {}, "runner.cpus"),
    (["runner.memory=1m"], {}, "runner.memory: the Docker engine refuses"),  # below the engine's minimum
    (["runner.cpus=64"], {}, "runner.cpus: the Docker engine refuses"),  # more than the machine has
    (["study.storage=journal:///tmp/x.log"], {}, "study.storage"),
])
def test_bad_docker_setup_exits_2_and_writes_nothing(server: str, workdir: Path, args: list[str],
                                                     env: dict[str, str], message: str) -> None:
    experiment = _experiment()
    result = _tune(workdir, server, experiment, "model=knn", *args, **env)
    assert result.code == 2, result.stderr[-2000:]
    [line] = result.error_lines
    assert message in line
    assert not (workdir / "optuna.db").exists()  # the study storage is untouched
    assert mlflow_runs(server, experiment) == []


@pytest.mark.parametrize(("overrides", "words"), [
    (["data.target=nope"], "'nope' not in"),
    (["data.target=label", "model.n_neighbors=0"], "model.n_neighbors"),
])
def test_a_check_failing_after_the_containers_started_kills_them_and_writes_nothing(
        engine, server: str, workdir: Path, overrides: list[str], words: str) -> None:
    """The containers start once the image and the engine are checked, before the model's section
    and the data are: an error found then (a model parameter out of range, a target column the CSV
    lacks) is still exit 2 with one line, no run, no study, and no container left; the containers,
    which were waiting for their assignment, say nothing."""
    csv = workdir / "data.csv"
    csv.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40)))
    experiment = _experiment()
    result = _tune(workdir, server, experiment, "model=knn", "data=csv", f"data.path={csv}", *overrides,
                   "runner.workers=2")
    assert result.code == 2, result.stderr[-2000:]
    [line] = result.error_lines
    assert words in line
    assert not (workdir / "optuna.db").exists()
    assert mlflow_runs(server, experiment) == []
    assert _containers_left() == ""
    assert "Traceback" not in result.stderr and "mlops-tune worker" not in result.stdout + result.stderr


@pytest.mark.parametrize(("uri", "message"), [
    ("sqlite:///mlflow.db", "runner=docker needs an MLflow server"),
    ("http://127.0.0.1:9", "cannot reach the MLflow server"),
])
def test_docker_runner_needs_a_reachable_tracking_server(workdir: Path, uri: str, message: str) -> None:
    result = run_command("mlops-tune", "runner=docker", f"tracking.uri={uri}", "model=knn",
                         f"study.storage=sqlite:///{workdir / 'optuna.db'}", cwd=workdir)
    assert result.code == 2, result.stderr[-2000:]
    [line] = result.error_lines
    assert message in line
    assert not (workdir / "optuna.db").exists()
    assert mlflow_runs(workdir) == []


# ----------------------------------------------------------------------------- the team stack


def test_compose_stack_publishes_on_loopback_only() -> None:
    import yaml

    spec = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    ports = [(name, str(port)) for name, service in spec["services"].items() for port in service.get("ports", [])]
    assert {name for name, _ in ports} == {"postgres", "minio", "mlflow"}
    assert all(port.startswith("127.0.0.1:") for _, port in ports), ports
    command = spec["services"]["mlflow"]["command"]
    assert "--serve-artifacts" in command
    assert any(arg.startswith("--backend-store-uri=postgresql") for arg in command)
    assert any(arg.startswith("--artifacts-destination=s3://") for arg in command)


@pytest.fixture
def s3_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An S3-compatible store on loopback (moto's server), with a bucket ``mlflow``."""
    import boto3

    port = devservices.free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in (("AWS_ACCESS_KEY_ID", "team"), ("AWS_SECRET_ACCESS_KEY", "team-secret"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("MLFLOW_S3_ENDPOINT_URL", endpoint)):
        monkeypatch.setenv(name, value)
    deadline = time.time() + 30
    while True:
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="mlflow")
            break
        except Exception:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.3)
    yield endpoint
    proc.kill()
    proc.wait()


def test_team_stack_postgres_backend_and_s3_artifacts(engine, postgres, s3_store: str, workdir: Path,
                                                      tmp_path: Path) -> None:
    """The topology of docker/compose.yaml, started without Docker Hub: trials in containers
    track to a server on PostgreSQL whose artifacts land in the S3 store."""
    import boto3
    import mlflow

    proc, url = devservices.start_mlflow_server(postgres.url("mlflow"), "s3://mlflow/artifacts",
                                                log=tmp_path / "server.log")
    try:
        suffix = uuid.uuid4().hex[:8]
        experiment, registry = f"team-{suffix}", f"team-{suffix}"
        result = run_command(
            "mlops-tune", "runner=docker", f"tracking.uri={url}", f"tracking.experiment={experiment}",
            f"study.storage={postgres.url('optuna')}", f"study.name=team-{suffix}", f"registry.name={registry}",
            "model=knn", "data=wine", "gate.threshold=0.9", "study.n_trials=4", cwd=workdir)
        assert result.code == 0, result.stderr[-3000:]
        version = mlflow.MlflowClient(tracking_uri=url).get_model_version_by_alias(registry, "champion")
        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_store).list_objects_v2(
            Bucket="mlflow", Prefix="artifacts/")["Contents"]]
        assert any(key.endswith("/MLmodel") for key in keys)  # the trial's model, logged from its container
        assert version.source and any(key.endswith("config.yaml") for key in keys)
        assert "team-secret" not in result.stdout + result.stderr
    finally:
        devservices.stop_process(proc)
