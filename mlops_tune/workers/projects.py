"""Workers as MLflow Project runs: ``runner=mlflow`` (local processes) and ``runner=docker`` (the
same, in the model family's image).

The study's process starts ``runner.workers`` runs of the ``worker`` entry point of a small
MLflow Project it generates (``docker_env`` naming the family's image for runner=docker). Each is
a worker like any other: it runs the worker loop (:func:`mlops_tune.workers.loop.run_worker`,
from ``python -m mlops_tune.worker``) and pulls its trials from the study's Optuna storage; a
container reaches the storage through Optuna's gRPC storage proxy, which the study serves on
127.0.0.1 while it runs (the proxy starts once the checks have passed).

A local worker (runner=mlflow) starts once the study's parent run exists, as a run of MLflow's
asynchronous mode (``mlflow.projects.run(..., synchronous=False)``, an ``mlflow run`` process):
the study waits on its ``SubmittedRun`` and stops it with ``SubmittedRun.cancel()``.

A container (runner=docker) starts as soon as the image and the engine are checked, before the
study checks the model's section, loads its data and opens its stores: its start and its imports
(seconds) overlap the study's own. It is the project's worker entry point run with ``docker
run`` (the command MLflow would run for its ``docker_env``, which needs the worker's run before
it starts), and it asks the study for its assignment once it has imported its libraries
(:mod:`mlops_tune.workers.handover`); the study creates the worker's run, a child of the parent
run, when it answers. A study that fails before that leaves no run: its containers are killed.
The study waits on the ``docker run`` process; Docker's own stop (SIGTERM, then SIGKILL after a
grace) stops a container.

A worker that ends before the work does is replaced: a killed one (``docker kill``, the OOM
killer) costs its trial nothing (the trials its tickets name are given back and run again);
with ``runner.fresh_per_trial=true`` every worker runs one trial, so each trial gets a fresh
process (and container). Nothing is read from a source checkout: it works from an installed
package.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from mlops_tune.records import claims, tracking
from mlops_tune.runtime import faults, heap
from mlops_tune.runtime.errors import EnvironmentFault, UsageError, first_line
from mlops_tune.runtime.secrets import redact_text, write_private
from mlops_tune.show import report
from mlops_tune.workers import ASSIGNMENT_FILE, CONFIG_FILE, containers
from mlops_tune.workers.handover import Desk
from mlops_tune.workers.launched import MAX_FRUITLESS_WORKERS, STOP_GRACE, close_run, finished_by, work_left
from mlops_tune.workers.loop import Assignment
from mlops_tune.workers.objective import give_back_lost

WORKER_ENTRY_POINT = "worker"


@dataclass
class _Worker:
    label: str
    #: its MLflow run ("": a container the study has not assigned yet)
    run_id: str
    #: runner=mlflow: the SubmittedRun of MLflow's asynchronous mode (an ``mlflow run`` process)
    submitted: Any
    #: runner=docker: the container, which Docker stops, and its ``docker run`` process
    container: str
    process: subprocess.Popen[bytes] | None = None
    #: waits for the worker's end and puts it on the study's queue
    waiter: threading.Thread | None = None


class ProjectWorkers:
    """``runner.workers`` workers of one study as MLflow Project runs (in containers for runner=docker)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        """Check what the workers need (runner=docker: the image, the engine, an MLflow server; exit 2),
        writing nothing; runner=docker: start the containers (they wait for :meth:`start`)."""
        runner = dict(cfg["runner"])
        self.cfg, self.runner = cfg, runner
        self.docker = runner.get("name") == "docker"
        self.fresh = bool(runner.get("fresh_per_trial", False))
        self.n = int(runner.get("workers") or 1)
        self.image, self.mounts, self.data_path = (containers.check(runner, cfg) if self.docker
                                                   else ("", [], None))
        self.workdir: Path | None = None
        self.proxy: Any = None
        self.workers: dict[str, _Worker] = {}  # by label
        self.ended: queue.Queue[tuple[_Worker, bool]] = queue.Queue()
        self.count = itertools.count(1)
        self.stopping = False
        self.assignment: Assignment | None = None
        self.lock = threading.Lock()  # an assignment and a stop: one at a time
        self.desk = Desk() if self.docker else None
        self.env_file = Path()  # runner=docker: the containers' environment (written with the folder)
        # the project command says `python`, and `mlflow run` starts the workers: this environment's
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        if self.docker:
            try:
                self._folder()
                for _ in range(self.n):
                    self._launch()
            except BaseException:
                self.stop()
                self.close()
                raise

    def check(self) -> None:
        """What is checked once the study's other checks passed (runner=docker: an experiment whose
        artifacts a container cannot write)."""
        if self.docker:
            containers.check_experiment(str(self.cfg["tracking"]["uri"]), str(self.cfg["tracking"]["experiment"]))

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
        """The parent run exists: runner=mlflow starts the workers (they import their libraries while
        this process finishes opening the study; on a failure meanwhile, leaving this context stops
        them); runner=docker's containers get their assignment."""
        self.assignment = replace(assignment, trials=1 if self.fresh else None)
        if self.desk is not None:
            self.desk.open(self._assign)
            return
        self._folder()
        for _ in range(self.n):
            self._launch()

    def run(self, study: optuna.Study, storage: Any, budget: claims.Budget, assignment: Assignment,
            started: float) -> None:
        """Keep ``runner.workers`` workers at work while work remains; return once every worker has
        ended. Raises :class:`EnvironmentFault` when workers keep ending before finishing a trial."""
        if not self.workers:  # a study that runs its workers again (a dead process's trials)
            for _ in range(self.n):
                self._launch()
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
            with self.lock:
                del self.workers[worker.label]
            finished = finished_by(study, worker.run_id) if worker.run_id else 0
            if not ok and worker.run_id:
                lost = give_back_lost(study, storage, (worker.run_id,), budget,
                                      f"its worker ({worker.label}) exited mid-trial")
                for frozen in lost:
                    report.trial_line(study, frozen, threshold, time.perf_counter() - started, gate_cfg)
            if worker.run_id and (worker.container or not ok):  # MLflow marks a Project run that ended well
                close_run(worker.run_id, "FINISHED" if ok else "FAILED")
            if not ok:
                fruitless = 0 if finished else fruitless + 1
                if fruitless >= MAX_FRUITLESS_WORKERS:
                    raise EnvironmentFault("trial worker", f"{fruitless} workers in a row ended before finishing a "
                                           f"trial (last: {worker.label}, run {worker.run_id}); see its output above")
            if (finished or not ok) and not self.stopping and work_left(self.cfg, study, budget, assignment):
                self._launch()

    def stop(self) -> None:
        """The study failed or was stopped: every worker gets SIGTERM (it closes its runs as KILLED),
        and is killed after a grace; a container not assigned yet is killed at once (it wrote nothing)."""
        with self.lock:  # no assignment from now on
            self.stopping = True
            workers, deadline = list(self.workers.values()), time.monotonic() + STOP_GRACE
        if self.desk is not None:
            self.desk.close()  # a container that asks later gets no answer and ends
        if not workers:
            return
        faults.extend_stop(STOP_GRACE + faults.STOP_DEADLINE)  # a stop waits for them to close their runs
        for worker in workers:  # all at once; then each is waited for
            if worker.container:
                containers.signal_container(worker.container, signal.SIGTERM if worker.run_id else signal.SIGKILL)
            else:
                with contextlib.suppress(Exception):
                    worker.submitted.cancel()  # SIGTERM to `mlflow run`'s process group, the worker's too
        for worker in workers:
            if worker.container:
                containers.end(worker.container, deadline)
            else:
                _wait_for_group(worker.submitted, deadline)
            if worker.waiter is not None:  # the worker has ended: the study's status goes over MLflow's
                worker.waiter.join(max(0.0, deadline - time.monotonic()))
            if worker.process is not None and worker.process.poll() is None:
                worker.process.kill()  # `docker run` of a container that never started
                worker.process.wait()
            if worker.run_id:
                close_run(worker.run_id, "KILLED")

    def close(self) -> None:
        if self.desk is not None:
            self.desk.close()
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ workers
    def _folder(self) -> None:
        """The project and the workers' config, in a private folder (readable by a container's user)."""
        import yaml

        self.workdir = Path(tempfile.mkdtemp(prefix="mlops-tune-workers-"))
        storage = str(self.cfg["study"]["storage"])
        if self.docker:
            storage = "grpc://"  # the proxy's address, which starts once the checks passed, comes with the assignment
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
        if self.desk is not None:
            self.env_file = containers.write_env_file(self.workdir, {
                "MLFLOW_TRACKING_URI": str(self.cfg["tracking"]["uri"]), **self.desk.environment()})

    def _launch(self) -> None:
        """One more worker: its folder, and its Project run (runner=mlflow; its run, a child of the
        study's run, made first) or its container (runner=docker; its run made once it asks)."""
        assert self.workdir is not None
        label = f"worker-{next(self.count)}"
        folder = self.workdir / label
        folder.mkdir(mode=0o755)
        (folder / CONFIG_FILE).symlink_to(self.workdir / CONFIG_FILE)
        if self.docker:
            worker = _Worker(label, "", None, f"mlops-tune-worker-{uuid.uuid4().hex[:12]}")
            command = containers.run_command(self.runner, worker.container, self.image,
                                             [f"{self.workdir}:{self.workdir}:ro", *self.mounts], self.env_file,
                                             ["python", "-m", "mlops_tune.worker", str(folder)])
            try:  # its output is the study's; a Ctrl-C meant for the study is the study's to pass on
                worker.process = subprocess.Popen(command, start_new_session=True)
            except OSError as exc:
                raise UsageError(f"runner=docker: cannot run the docker command ({exc.strerror or exc})") from None
            process = worker.process
            wait: Any = lambda: process.wait() == 0  # noqa: E731
        else:
            worker = self._project_run(label, folder)
            wait = worker.submitted.wait
        self.workers[label] = worker
        worker.waiter = threading.Thread(target=lambda: self.ended.put((worker, bool(wait()))),
                                         name=f"mlops-tune-{worker.label}", daemon=True)
        worker.waiter.start()

    def _project_run(self, label: str, folder: Path) -> _Worker:
        """runner=mlflow: the worker's run, its assignment file and its Project run (an ``mlflow run``)."""
        import mlflow.projects
        import yaml

        assert self.assignment is not None and self.workdir is not None
        run_id = self._create_run(label)
        (folder / ASSIGNMENT_FILE).write_text(yaml.safe_dump(
            asdict(replace(self.assignment, owner=run_id, tags={tracking.TAG_WORKER_RUN: run_id})), sort_keys=False))
        submitted = mlflow.projects.run(str(self.workdir / "project"), entry_point=WORKER_ENTRY_POINT,
                                        parameters={"folder": str(folder)}, run_id=run_id,
                                        experiment_id=self.assignment.experiment_id, env_manager="local",
                                        synchronous=False)
        return _Worker(label, run_id, submitted, "")

    def _assign(self, label: str) -> dict[str, Any]:
        """runner=docker: what container ``label`` is assigned when it asks: its run, made now."""
        with self.lock:
            worker = self.workers.get(label)
            if self.stopping or worker is None or self.assignment is None:
                raise LookupError(label)  # no answer: the container ends
            try:
                worker.run_id = self._create_run(label)
            except Exception as exc:  # the container gets no answer and ends: its end says no more
                print(f"{label}: the study could not create its run: {redact_text(first_line(exc, 300))}",
                      file=sys.stderr, flush=True)
                raise
            tags = {tracking.TAG_WORKER_RUN: worker.run_id, "mlflow.project.env": "docker",
                    "mlflow.docker.image.uri": self.image}
            assert self.proxy is not None, "the study enters this context first (__enter__)"
            return {**asdict(replace(self.assignment, owner=worker.run_id, tags=tags)), "storage": self.proxy.url}

    def _create_run(self, label: str) -> str:
        """A worker's run: a child of the study's run, a run of the project's worker entry point."""
        assert self.assignment is not None and self.workdir is not None
        tags = {"mlflow.parentRunId": self.assignment.parent_run_id, tracking.TAG_ROLE: "worker",
                "mlflow.source.type": "PROJECT", "mlflow.source.name": (self.workdir / "project").as_uri(),
                "mlflow.project.entryPoint": WORKER_ENTRY_POINT}
        if self.docker:
            tags.update({"mlflow.project.env": "docker", "mlflow.docker.image.uri": self.image})
        return tracking.create_run(self.assignment.experiment_id, label, tags)


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
