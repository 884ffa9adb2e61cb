"""runner=ray: a study's workers as Ray tasks on a real multi-node Ray cluster.

Each node is its own ``ray start`` (a head, then nodes joining it), with its own CPU count and
temporary folder, on this machine; the stores are PostgreSQL and an MLflow server, as on a real
cluster. A node is killed by killing its processes (its raylet and every process under it). In
CI, Ray and PostgreSQL must be there (the tests fail otherwise); elsewhere they skip and say why.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from devtools import devservices
from mlops_tune.records import tracking
from mlops_tune.runtime import keys
from tests.conftest import BIN, IN_CI, ROOT, command_env

RAY = BIN / "ray"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
TAG_NODE = "mlops_tune.node"


@dataclass
class Node:
    folder: Path
    id: str


@dataclass
class Cluster:
    address: str
    head: Node
    nodes: list[Node]
    #: a file whose existence holds the trials of the second node in their fit (SlowKNN)
    hold: Path | None = None


def _ray_or_skip() -> None:
    if not RAY.exists():
        if IN_CI:
            pytest.fail("Ray is required in CI (make install: the ray extra)")
        pytest.skip("Ray is not installed (pip install 'mlops-tune[ray]')")


@contextlib.contextmanager
def _cluster(nodes: list[tuple[int, dict[str, str]]]) -> Iterator[Cluster]:
    """A head (the first CPU count and environment) and one node per further entry."""
    _ray_or_skip()
    root = Path(tempfile.mkdtemp(prefix="mlops-tune-ray-"))
    folders = [root / f"node-{index}" for index in range(len(nodes))]
    try:
        (cpus, env), *others = nodes
        # the nodes' workers import the test models (tests.helpers) as a real cluster's import the user's
        base = command_env(PYTHONPATH=str(ROOT))
        address = devservices.start_ray_node(folders[0], cpus, env={**base, **env})
        for folder, (cpus, env) in zip(folders[1:], others, strict=True):
            devservices.start_ray_node(folder, cpus, address, env={**base, **env})
        made = [Node(folder, devservices.ray_node_id(folder)) for folder in folders]
        yield Cluster(address, made[0], made)
    finally:
        for folder in reversed(folders):
            devservices.kill_ray_node(folder)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head of 2 CPUs and a node of 2 CPUs."""
    with _cluster([(2, {}), (2, {})]) as made:
        yield made


@pytest.fixture(scope="module")
def stores(postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    folder = tmp_path_factory.mktemp("ray-mlflow")
    proc, url = devservices.start_mlflow_server(postgres.url("mlflow"), folder / "artifacts",
                                                log=folder / "server.log")
    yield {"storage": postgres.url("optuna"), "tracking": url}
    devservices.stop_process(proc)


def _args(cluster: Cluster, stores: dict[str, str], study: str, *extra: str) -> list[str]:
    return [f"study.storage={stores['storage']}", f"tracking.uri={stores['tracking']}", f"tracking.experiment={study}",
            f"study.name={study}", f"registry.name=reg-{study}", "model=knn", "runner=ray",
            f"runner.address={cluster.address}", "study.sampler=random", *extra]


def _ray_cli(cluster: Cluster, *args: str) -> str:
    """``ray ARGS`` against ``cluster`` (its state API: what Ray's dashboard shows)."""
    proc = subprocess.run([str(RAY), *args], capture_output=True, text=True, timeout=120,
                          env=command_env(RAY_ADDRESS=cluster.address))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _tune(args: list[str], workdir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mlops-tune"), *args], cwd=workdir, env=command_env(), capture_output=True,
                          text=True, timeout=timeout)


def _runs(stores: dict[str, str], study: str) -> list:
    client = mlflow.MlflowClient(tracking_uri=stores["tracking"])
    experiment = client.get_experiment_by_name(study)
    return client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []


def _trials(stores: dict[str, str], study: str) -> list:
    return optuna.load_study(study_name=study, storage=stores["storage"]).get_trials()


def test_a_study_spreads_its_workers_over_the_nodes(cluster: Cluster, stores: dict[str, str], workdir: Path) -> None:
    study = f"ray-{uuid.uuid4().hex[:6]}"
    proc = _tune(_args(cluster, stores, study, "study.n_trials=12", "gate.threshold=0.999", "runner.workers=4"),
                 workdir)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # the gate missed: exit 1
    assert "4 workers as Ray tasks at once" in proc.stdout
    trials = _trials(stores, study)
    assert sorted(t.number for t in trials) == list(range(12)) and all(t.state in FINISHED for t in trials)
    runs = _runs(stores, study)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    trial_runs = [r for r in runs if tracking.TAG_TRIAL_NUMBER in r.data.tags]
    assert len(trial_runs) == 12
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parents[0].info.run_id}
    # Ray placed the workers on both nodes, and every trial run says where it ran
    assert {r.data.tags[TAG_NODE] for r in trial_runs} == {node.id for node in cluster.nodes}
    workers = [r for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "worker"]
    assert len(workers) >= 4 and {r.data.tags["mlflow.parentRunId"] for r in workers} == {parents[0].info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_workers_finishing_together_promote_once(cluster: Cluster, stores: dict[str, str], workdir: Path) -> None:
    study = f"ray-{uuid.uuid4().hex[:6]}"
    # the base model (k=1, ~0.989) passes: every worker sees the gate met
    proc = _tune(_args(cluster, stores, study, "study.n_trials=8", "gate.threshold=0.95", "runner.workers=4"), workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=stores["tracking"])
    assert len(client.search_model_versions(f"name='reg-{study}'")) == 1
    runs = _runs(stores, study)
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 1
    assert "RUNNING" not in {r.info.status for r in runs}


def test_fresh_per_trial_gives_every_trial_a_task_of_its_own(cluster: Cluster, stores: dict[str, str],
                                                            workdir: Path) -> None:
    study = f"ray-{uuid.uuid4().hex[:6]}"
    proc = _tune(_args(cluster, stores, study, "study.n_trials=3", "gate.threshold=0.999", "runner.workers=1",
                       "runner.fresh_per_trial=true"), workdir)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = _runs(stores, study)
    workers = {r.info.run_id for r in runs if r.data.tags.get(tracking.TAG_ROLE) == "worker"}
    trial_runs = [r for r in runs if tracking.TAG_TRIAL_NUMBER in r.data.tags]
    assert len(trial_runs) == 3 and len(workers) == 3
    assert sorted(r.data.tags[tracking.TAG_WORKER_RUN] for r in trial_runs) == sorted(workers)


def test_a_store_only_this_machine_reaches_is_fine_when_every_node_is_this_machine(
        cluster: Cluster, workdir: Path) -> None:
    study = f"ray-{uuid.uuid4().hex[:6]}"
    proc = _tune(["model=knn", "runner=ray", f"runner.address={cluster.address}", f"study.name={study}",
                  "study.n_trials=2", "gate.threshold=0.999", "runner.workers=2"], workdir)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(_trials({"storage": f"sqlite:///{workdir / 'optuna.db'}"}, study)) == 2


def test_no_cluster_at_the_address_is_one_line_and_exit_2(workdir: Path) -> None:
    port = devservices.free_port()
    proc = _tune(["model=knn", "runner=ray", f"runner.address=127.0.0.1:{port}"], workdir, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"runner.address: no Ray cluster answers at 127.0.0.1:{port}" in lines[0], lines
    assert not (workdir / "optuna.db").exists()


def test_a_worker_asking_for_a_resource_no_node_offers_is_exit_2(cluster: Cluster, workdir: Path) -> None:
    proc = _tune(["model=knn", "runner=ray", f"runner.address={cluster.address}", "+runner.resources.sklearn.gpu=1"],
                 workdir, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "runner.resources: no node of the Ray cluster offers what a sklearn worker asks (gpu 1)" in proc.stderr
    assert not (workdir / "optuna.db").exists()


def test_no_password_reaches_a_task_the_dashboard_or_ray_logs(cluster: Cluster, stores: dict[str, str],
                                                               workdir: Path) -> None:
    study = f"ray-{uuid.uuid4().hex[:6]}"
    password = f"pw-{uuid.uuid4().hex[:10]}"  # the throwaway cluster trusts loopback: any password works
    storage = stores["storage"].replace("postgres@", f"postgres:{password}@")
    args = _args(cluster, {**stores, "storage": storage}, study, "study.n_trials=4", "gate.threshold=0.999",
                 "runner.workers=2")
    proc = _tune(args, workdir)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert password not in proc.stdout + proc.stderr
    # the state API behind Ray's dashboard: jobs (the driver's command line), tasks (arguments, runtime env)
    for what in ("jobs", "tasks"):
        shown = _ray_cli(cluster, "list", what, "--detail", "--format", "json", "--limit", "10000")
        assert password not in shown, what
        if what == "jobs":
            assert "postgres:***@" in shown  # the study's job, its command line masked
    for node in cluster.nodes:
        for log in node.folder.glob("session_*/logs/*"):
            if log.is_file():
                assert password not in log.read_text(errors="replace"), log


@pytest.fixture(scope="module")
def doomed_cluster(postgres) -> Iterator[Cluster]:
    """A head of 1 CPU whose trials sleep 1 s, and a node of 1 CPU whose trials hold in their fit
    as long as a file exists: a trial to kill (or stop) mid-way, on the node."""
    hold = Path(tempfile.mkdtemp(prefix="mlops-tune-hold-")) / "hold"
    with _cluster([(1, {"MLOPS_TUNE_TEST_SLEEP": "1"}), (1, {"MLOPS_TUNE_TEST_HOLD": str(hold)})]) as made:
        made.hold = hold
        yield made


def _held_on(cluster: Cluster, stores: dict[str, str], study: str, proc: subprocess.Popen) -> dict:
    """Wait until a trial runs on the held node (its run tagged with that node, RUNNING)."""
    held = cluster.nodes[1].id
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        for run in _runs(stores, study):
            if run.data.tags.get(TAG_NODE) == held and run.info.status == "RUNNING" and \
                    tracking.TAG_TRIAL_NUMBER in run.data.tags:
                return {"run": run.info.run_id, "number": int(run.data.tags[tracking.TAG_TRIAL_NUMBER])}
        time.sleep(0.5)
    raise AssertionError("no trial ever ran on the held node")


def _held_study(cluster: Cluster, stores: dict[str, str], workdir: Path, n_trials: int,
                act: Callable[[subprocess.Popen], None]) -> tuple[subprocess.Popen, str, str, str, dict]:
    """A study of 2 workers (SlowKNN), and ``act(its process)`` once a trial of it holds on the second
    node; returns the process (ended), its output and error, the study and the held trial."""
    assert cluster.hold is not None
    cluster.hold.write_text("")
    study = f"ray-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen([str(BIN / "mlops-tune"), *_args(
        cluster, stores, study, f"study.n_trials={n_trials}", "gate.threshold=0.999", "runner.workers=2",
        "model._target_=tests.helpers.SlowKNN")], cwd=workdir, env=command_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        held = _held_on(cluster, stores, study, proc)
        act(proc)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc, out, err, study, held


def test_sigterm_stops_every_worker_on_every_node(doomed_cluster: Cluster, stores: dict[str, str],
                                                  workdir: Path) -> None:
    proc, out, err, study, _ = _held_study(doomed_cluster, stores, workdir, 20,
                                           lambda proc: proc.send_signal(signal.SIGTERM))
    cluster = doomed_cluster
    assert proc.returncode == 143, out[-3000:] + err[-3000:]
    trials = _trials(stores, study)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    runs = _runs(stores, study)
    assert not [r for r in runs if r.info.status == "RUNNING"], [(r.info.run_name, r.info.status) for r in runs]
    # no worker is left on any node: the held trial's process is gone with its task
    shown = _ray_cli(cluster, "list", "tasks", "--filter", "state=RUNNING", "--format", "json")
    assert shown.startswith("No resource") or json.loads(shown) == [], shown


def test_a_node_killed_mid_trial_costs_its_trial_nothing(doomed_cluster: Cluster, stores: dict[str, str],
                                                         workdir: Path) -> None:
    cluster = doomed_cluster
    proc, out, err, study, held = _held_study(cluster, stores, workdir, 4,
                                              lambda _proc: devservices.kill_ray_node(cluster.nodes[1].folder))
    assert proc.returncode == 1, out[-3000:] + err[-3000:]  # the gate missed; the study itself went on
    trials = _trials(stores, study)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    killed = next(t for t in trials if t.number == held["number"])
    assert killed.state == TrialState.FAIL and keys.NOT_CHARGED in killed.user_attrs
    retried = [t for t in trials if t.user_attrs.get(keys.RETRY_OF) == held["number"]]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE and retried[0].params == killed.params
    # the budget is exact: 4 trials judged, the killed one not among them
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) == 4
    runs = _runs(stores, study)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert next(r for r in runs if r.info.run_id == held["run"]).info.status == "KILLED"
    assert {r.data.tags.get(TAG_NODE) for r in runs if r.info.run_id != held["run"]
            and tracking.TAG_TRIAL_NUMBER in r.data.tags} == {cluster.head.id}
