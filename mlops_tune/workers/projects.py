"""Workers as MLflow Project runs: ``runner=mlflow`` (local processes) and ``runner=docker`` (the
same, in the model family's image).

The study's process starts ``runner.workers`` runs of the ``worker`` entry point of a small
MLflow Project it generates (``docker_env`` naming the family's image for runner=docker), with
``mlflow.projects.run(..., synchronous=False)``. Each is a worker like any other: it runs the
worker loop (:func:`mlops_tune.workers.loop.run_worker`, from ``python -m mlops_tune.worker``)
and pulls its trials from the study's Optuna storage; a container reaches the storage through
Optuna's gRPC storage proxy, which the study serves on 127.0.0.1 while it runs. The proxy starts
once the checks have passed and the workers once the study's parent run exists: their start-up
(a container's imports take seconds) overlaps the study's own.

A local worker is a run of MLflow's asynchronous mode (an ``mlflow run`` process): the study
waits on its ``SubmittedRun`` and stops it with ``SubmittedRun.cancel()``. A container is a run of
MLflow's synchronous mode in a thread of the study's process (the asynchronous mode would spend
seconds starting an ``mlflow run`` process before the container starts): the thread waits for it,
and Docker's own stop (SIGTERM, then SIGKILL after a grace) stops it.

A worker that ends before the work does is replaced: a killed one (``docker kill``, the OOM
killer) costs its trial nothing (the trials its tickets name are given back and run again);
with ``runner.fresh_per_trial=true`` every worker runs one trial, so each trial gets a fresh
process (and container). Nothing is read from a source checkout: it works from an installed
package.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from mlops_tune.records import claims, tracking
from mlops_tune.runtime import faults, heap, keys
from mlops_tune.runtime.errors import EnvironmentFault, first_line
from mlops_tune.runtime.secrets import redact_text, write_private
from mlops_tune.search import gate
from mlops_tune.show import report
from mlops_tune.workers import ASSIGNMENT_FILE, CONFIG_FILE, containers
from mlops_tune.workers.loop import Assignment
from mlops_tune.workers.objective import give_back_lost

WORKER_ENTRY_POINT = "worker"
#: workers in a row that end before finishing any trial, before the study gives up (exit 3)
MAX_FRUITLESS_WORKERS = 2
#: seconds a stopped worker has to close its runs before it is killed
STOP_GRACE = 20


@dataclass
class _Worker:
    label: str
    run_id: str
    #: runner=mlflow: the SubmittedRun of MLflow's asynchronous mode (an ``mlflow run`` process)
    submitted: Any
    #: runner=docker: the container, which Docker stops
    container: str
    #: waits for the worker's end and puts it on the study's queue
    waiter: threading.Thread | None = None


class ProjectWorkers:
    """``runner.workers`` workers of one study as MLflow Project runs (in containers for runner=docker)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        """Check what the workers need (runner=docker: the image, an MLflow server; exit 2), writing nothing."""
        runner = dict(cfg["runner"])
        self.cfg, self.runner = cfg, runner
        self.docker = runner.get("name") == "docker"
        self.fresh = bool(runner.get("fresh_per_trial", False))
        self.n = int(runner.get("workers") or 1)
        self.image, self.mounts, self.data_path = (containers.check(runner, cfg) if self.docker
                                                   else ("", [], None))
        self.workdir: Path | None = None
        self.proxy: Any = None
        self.workers: dict[str, _Worker] = {}
        self.ended: queue.Queue[tuple[_Worker, bool]] = queue.Queue()
        self.count = itertools.count(1)
        self.stopping = False
        # the project command says `python`, and `mlflow run` starts the workers: this environment's
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

    def describe(self) -> str:
        what = "one trial per worker" if self.fresh else "trial after trial"
        where = f"container{'s' if self.n > 1 else ''} of {self.image}{containers.limits_text(self.runner)}" \
            if self.docker else f"MLflow Project run{'s' if self.n > 1 else ''}"
        proxy = f"; Optuna storage served to them on 127.0.0.1:{self.proxy.port}" if self.proxy else ""
        return f"{self.n} worker {where} at once ({what}){proxy}"

    # ------------------------------------------------------------------ the study's side
    def __enter__(self) -> ProjectWorkers:
        """Once every check has passed: runner=docker starts the storage proxy the containers will
        use (its process imports Optuna while the study opens its stores)."""
        if self.docker and self.proxy is None:
            from mlops_tune.search.optuna_setup import StorageServer

            self.proxy = StorageServer(str(self.cfg["study"]["storage"]))
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """The study ended: on an error or a signal its workers are stopped first; then the proxy and
        the workers' folder go."""
        if kind is not None:
            self.stop()
        self.close()

    def start(self, assignment: Assignment) -> None:
        """Start the workers as soon as the parent run exists: they import their libraries (seconds,
        in a container) while this process finishes opening the study (on a failure meanwhile,
        leaving this context stops them)."""
        self._folder(assignment)
        for _ in range(self.n):
            self._launch(assignment)

    def run(self, study: optuna.Study, storage: Any, budget: claims.Budget, assignment: Assignment,
            started: float) -> None:
        """Keep ``runner.workers`` workers at work while work remains; return once every worker has
        ended. Raises :class:`EnvironmentFault` when workers keep ending before finishing a trial."""
        if not self.workers:  # a study that runs its workers again (a dead process's trials)
            for _ in range(self.n):
                self._launch(assignment)
        gate_cfg, threshold = self.cfg["gate"], float(self.cfg["gate"]["threshold"])
        if self.proxy is not None:
            self.proxy.wait_ready()
        print(f"study '{assignment.name}': {self.describe()}", flush=True)
        # no trial trains in this process, so no first trial settles its heap: its start-up ends here
        # (with the collector left off, the study's garbage piled up for its whole run, and its exit
        # spent ~1 s collecting it)
        heap.settle()
        fruitless = 0
        while self.workers:
            worker, ok = self.ended.get()
            del self.workers[worker.run_id]
            finished = self._finished_by(study, worker.run_id)
            if not ok:
                lost = give_back_lost(study, storage, (worker.run_id,), budget,
                                      f"its worker ({worker.label}) exited mid-trial")
                for frozen in lost:
                    report.trial_line(study, frozen, threshold, time.perf_counter() - started, gate_cfg)
                self._close_run(worker, "FAILED")
                fruitless = 0 if finished else fruitless + 1
                if fruitless >= MAX_FRUITLESS_WORKERS:
                    raise EnvironmentFault("trial worker", f"{fruitless} workers in a row ended before finishing a "
                                           f"trial (last: {worker.label}, run {worker.run_id}); see its output above")
            if (finished or not ok) and self._work_left(study, budget, assignment, gate_cfg):
                self._launch(assignment)

    def stop(self) -> None:
        """The study failed or was stopped: every worker gets SIGTERM (it closes its runs as KILLED),
        and is killed after a grace."""
        self.stopping = True
        workers, deadline = list(self.workers.values()), time.monotonic() + STOP_GRACE
        if not workers:
            return
        faults.extend_stop(STOP_GRACE + faults.STOP_DEADLINE)  # a stop waits for them to close their runs
        for worker in workers:  # all at once; then each is waited for
            if worker.container:
                containers.signal_container(worker.container, signal.SIGTERM)
            else:
                with contextlib.suppress(Exception):
                    worker.submitted.cancel()  # SIGTERM to `mlflow run`'s process group, the worker's too
        for worker in workers:
            if worker.container:
                containers.end(worker.container, deadline)
            else:
                _wait_for_group(worker.submitted, deadline)
            if worker.waiter is not None:  # MLflow has marked its run ended: the study's status goes over it
                worker.waiter.join(max(0.0, deadline - time.monotonic()))
            self._close_run(worker, "KILLED")

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ workers
    def _folder(self, assignment: Assignment) -> None:
        """The project and the workers' config, in a private folder (readable by a container's user)."""
        import yaml

        self.workdir = Path(tempfile.mkdtemp(prefix="mlops-tune-workers-"))
        storage = str(self.cfg["study"]["storage"])
        if self.docker:
            assert self.proxy is not None, "the study enters this context first (__enter__)"
            storage = str(self.proxy.url)
            self.workdir.chmod(0o755)
        config = {**self.cfg, "runner": {"name": "inprocess"}, "study": {**self.cfg["study"], "storage": storage,
                                                                          "n_jobs": 1},
                  # the worker gets the server's URI from MLflow (MLFLOW_TRACKING_URI); no secret in the file
                  "tracking": {**self.cfg["tracking"], "uri": "${oc.env:MLFLOW_TRACKING_URI}"}}
        if self.data_path:
            config["data"] = {**config["data"], "path": self.data_path}
        write_private(self.workdir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
        spec: dict[str, Any] = {"name": "mlops-tune-worker", "entry_points": {WORKER_ENTRY_POINT: {
            "parameters": {"folder": {"type": "string"}},
            "command": "python -m mlops_tune.worker {folder}"}}}
        if self.docker:
            (self.workdir / CONFIG_FILE).chmod(0o644)  # the proxy URL and no secret: see above
            spec["docker_env"] = {"image": self.image, "volumes": [f"{self.workdir}:{self.workdir}:ro", *self.mounts]}
        project = self.workdir / "project"
        project.mkdir(mode=0o755)
        (project / "MLproject").write_text(yaml.safe_dump(spec, sort_keys=False))
        self._assignment = replace(assignment, trials=1 if self.fresh else None)

    def _launch(self, assignment: Assignment) -> None:
        """One more worker: its run (a child of the study's run), its folder, its Project run."""
        import mlflow.projects
        import yaml

        assert self.workdir is not None
        index = next(self.count)
        project = self.workdir / "project"
        run_id = tracking.create_run(assignment.experiment_id, f"worker-{index}", {
            "mlflow.parentRunId": assignment.parent_run_id, tracking.TAG_ROLE: "worker",
            "mlflow.source.type": "PROJECT", "mlflow.source.name": project.as_uri(),
            "mlflow.project.entryPoint": WORKER_ENTRY_POINT})
        tags = {tracking.TAG_WORKER_RUN: run_id}
        if self.docker:
            tags.update({"mlflow.project.env": "docker", "mlflow.docker.image.uri": self.image})
        folder = self.workdir / f"worker-{index}"
        folder.mkdir(mode=0o755)
        (folder / CONFIG_FILE).symlink_to(self.workdir / CONFIG_FILE)
        (folder / ASSIGNMENT_FILE).write_text(yaml.safe_dump(
            asdict(replace(self._assignment, owner=run_id, tags=tags)), sort_keys=False))
        container = f"mlops-tune-worker-{run_id}" if self.docker else ""
        options: dict[str, Any] = (
            {"docker_args": {**containers.docker_args(self.runner, container, self.workdir)}, "build_image": False}
            if self.docker else {"env_manager": "local"})
        run = functools.partial(mlflow.projects.run, str(project), entry_point=WORKER_ENTRY_POINT,
                                parameters={"folder": str(folder)}, run_id=run_id,
                                experiment_id=assignment.experiment_id, **options)
        worker = _Worker(f"worker-{index}", run_id, None, container)
        if self.docker:
            # MLflow's synchronous mode, in a thread: its asynchronous mode starts an `mlflow run` process
            # per worker, seconds of start-up before the container does; Docker stops the container
            wait = functools.partial(_ran, run, worker.label)
        else:
            worker.submitted = run(synchronous=False)
            wait = worker.submitted.wait
        self.workers[run_id] = worker
        worker.waiter = threading.Thread(target=lambda: self.ended.put((worker, bool(wait()))),
                                         name=f"mlops-tune-{worker.label}", daemon=True)
        worker.waiter.start()

    def _work_left(self, study: optuna.Study, budget: claims.Budget, assignment: Assignment,
                   gate_cfg: Mapping[str, Any]) -> bool:
        """Trials given back wait, or the gate is not met, tickets are left and time too."""
        if self.stopping:
            return False
        trials = study.get_trials(deepcopy=False)
        if any(t.state == optuna.trial.TrialState.WAITING for t in trials):
            return True
        timeout = self.cfg["study"]["timeout"]
        if timeout is not None and time.time() - assignment.started_at >= float(timeout):
            return False
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        return not gate.met(done, gate_cfg) and budget.tickets.held() < int(self.cfg["study"]["n_trials"])

    @staticmethod
    def _finished_by(study: optuna.Study, owner: str) -> int:
        """The trials worker ``owner`` finished (their tickets name it)."""
        return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished()
                   and keys.NOT_CHARGED not in t.user_attrs
                   and str(t.user_attrs.get(keys.TICKET, "")).partition(" ")[2].startswith(owner))

    @staticmethod
    def _close_run(worker: _Worker, status: str) -> None:
        """The status the study decided, over MLflow's FAILED for a worker it stopped."""
        import mlflow

        with contextlib.suppress(Exception):
            client = mlflow.MlflowClient()
            if status == "KILLED" or client.get_run(worker.run_id).info.status == "RUNNING":
                client.set_terminated(worker.run_id, status)


def _ran(run: Any, label: str) -> bool:
    """Run a worker's Project run to its end (``mlflow.projects.run(synchronous=True)``, which marks
    the run FINISHED or FAILED); whether its worker succeeded."""
    from mlflow.exceptions import ExecutionException

    try:
        run(synchronous=True)
        return True
    except ExecutionException:  # the worker exited non-zero: its output said why
        return False
    except Exception as exc:  # the Docker engine or the tracking server failed to start it
        print(f"{label}: could not start its container: {redact_text(first_line(exc, 300))}", file=sys.stderr,
              flush=True)
        return False


def _wait_for_group(submitted: Any, deadline: float) -> None:
    """Wait for every process of a stopped worker (``mlflow run`` leads its own process group:
    the worker is in it) until ``deadline``, then kill what is left."""
    pid = int(getattr(getattr(submitted, "command_proc", None), "pid", 0) or 0)
    if not pid:
        return
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.1)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
