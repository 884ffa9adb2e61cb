"""Trials as MLflow Project runs (``runner=mlflow``, and ``runner=docker`` = the same in a container).

The study side of the study/worker seam. For every study the runner generates a small
MLflow Project in a private folder with two entry points running ``mlops_tune.worker``
(the trial's own process): ``worker`` (a warm worker serving many trials) and ``trial``
(one trial, one process). With ``runner=docker`` the project also has a ``docker_env``
naming the model family's image (``runner.images`` in ``conf/runner/docker.yaml``);
Docker is a property of the project, not another runner. Nothing is read from a source
checkout, so both work from an installed package.

Per trial the study creates the child run (nested under the study's run), writes the
trial's config and its link to the study into a trial folder, and waits for the run to
end; the outcome is read back from the run. Where the trial runs:

* warm (default): ``runner.workers`` long-lived workers, each ONE Project run (and, for
  docker, one container) started once per study; the trial folder goes into the inbox of
  the worker of the study's lane (``Study`` runs one lane per worker). Imports and the
  dataset load happen once per worker. A worker that dies mid-trial (OOM-killed, ``docker
  kill``) costs nothing: the trial is given back and runs again on a new worker.
* ``runner.fresh_per_trial=true``: a Project run (and a container) per trial, its run
  being the child run itself: nothing is shared between trials.

Every epoch is reported to the study's Optuna storage (runner=docker: through Optuna's gRPC
storage proxy on 127.0.0.1), so the study's pruner decides across the process boundary."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlops_tune import attrs, tracking
from mlops_tune.errors import EnvironmentFault, WorkerLost
from mlops_tune.runners import containers
from mlops_tune.runners._base import Runner, TrialContext
from mlops_tune.trial import TrialOutcome, write_trial_dir

TRIAL_ENTRY_POINT = "trial"
WORKER_ENTRY_POINT = "worker"
#: files in a warm worker's inbox (mlops_tune.worker reads them)
STOP_FILE, ALIVE_FILE = "STOP", "ALIVE"
POLL_SECONDS = 0.02
#: workers that die before finishing any trial, in a row, before the study gives up (exit 3)
MAX_FRUITLESS_WORKERS = 2


class ProjectRunner(Runner):
    """Runs each trial with MLflow Projects: locally (``env_manager=local``) or in Docker."""

    def __init__(self, runner_cfg: Mapping[str, Any]) -> None:
        super().__init__(runner_cfg)
        self.docker = self.cfg.get("name") == "docker"
        self.fresh = bool(self.cfg.get("fresh_per_trial", False))
        self.n_workers = int(self.cfg.get("workers") or 1)
        self.workdir = Path(tempfile.mkdtemp(prefix="mlops-tune-trials-"))
        self.workdir.chmod(0o755)  # a container's unprivileged user reads the trial folders
        self.image = ""
        self.mounts: list[str] = []
        self.data_path: str | None = None
        self._project: Path | None = None
        self._proxy: Any = None
        self._lock = threading.Lock()
        self._lanes = threading.local()
        self._next_lane = itertools.count()
        self._workers: dict[int, _Worker] = {}
        self._fruitless = 0  # workers in a row that died before finishing a trial
        self._heartbeat: threading.Event | None = None
        self._interrupted: BaseException | None = None
        self._stopping = False  # set first on an interrupt: a worker's death is then no loss
        # the project command says `python`, and warm workers start through the `mlflow run` command:
        # make both this environment's
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

    @property
    def lanes(self) -> int:
        return 1 if self.fresh else self.n_workers

    def interrupt(self, exc: BaseException) -> None:
        """From the main thread: every worker is ended now (runs KILLED, containers removed); the
        lanes waiting on their trials raise a KeyboardInterrupt of their own."""
        self._stopping = True
        self._stop_workers(grace=0)
        self._interrupted = exc

    def check(self, cfg: Mapping[str, Any]) -> None:
        if self.docker:
            self.image, self.mounts, self.data_path = containers.check(self.cfg, cfg)

    def run(self, trial_cfg: Mapping[str, Any], trial: Any, context: TrialContext,
            tags: Mapping[str, str]) -> TrialOutcome:
        return self._run(trial_cfg, f"trial-{trial.number}", context, tags, trial=trial)

    def retrain(self, trial_cfg: Mapping[str, Any], context: TrialContext, run_name: str,
                tags: Mapping[str, str]) -> TrialOutcome:
        """In the trials' own processes (containers for runner=docker), as trials are."""
        return self._run(trial_cfg, run_name, context, tags, trial=None)

    def _run(self, trial_cfg: Mapping[str, Any], name: str, context: TrialContext, tags: Mapping[str, str],
             trial: Any) -> TrialOutcome:
        """One training in a trial process; ``trial``: the Optuna trial it reports to (None: none,
        and no model logged)."""
        import mlflow
        import optuna

        started = time.perf_counter()
        project = self.project_dir()
        worker = None if self.fresh else self._worker(context)
        run_tags = {**tags, "mlflow.parentRunId": context.parent_run_id}
        if worker is None:  # the tags MLflow gives its own Project runs (it sets none on a run it is handed)
            run_tags.update({"mlflow.source.type": "PROJECT", "mlflow.source.name": project.as_uri(),
                             "mlflow.project.entryPoint": TRIAL_ENTRY_POINT})
        else:  # ran by the worker's Project run; in its image, as MLflow tags the Project run
            run_tags[tracking.TAG_WORKER_RUN] = worker.run_id
            if self.docker:
                run_tags.update({"mlflow.project.env": "docker", "mlflow.docker.image.uri": self.image})
        run_id = tracking.create_run(context.experiment_id, name, run_tags)
        link: dict[str, Any] = {"run_id": run_id, "trial": None}
        if trial is not None:
            trial.set_user_attr(attrs.RUN, run_id)
            link.update({"storage": self._storage_for_trial(context), "study": trial.study.study_name,
                         "trial": trial.number, "pruner": context.pruner, "log_model_above": context.best_value()})
        try:
            if worker is None:
                folder = self.workdir / name
                write_trial_dir(folder, self._trial_file_config(trial_cfg), link)
                self._project_run(project, folder, run_id, context)
            else:
                worker.submit(name, self._trial_file_config(trial_cfg), link)
                self._wait(worker, run_id, retried=trial is not None and attrs.RETRY_OF in trial.user_attrs)
        except KeyboardInterrupt:  # stopped: the trial's run is KILLED, its process ended
            if worker is not None and self._interrupted is None:  # (lanes: the main thread ended them)
                self._stop_workers(grace=0)
            with contextlib.suppress(Exception):
                mlflow.MlflowClient().set_terminated(run_id, "KILLED")
            raise
        run = mlflow.MlflowClient().get_run(run_id)
        state = run.data.tags.get(tracking.TAG_STATE)
        if state == "PRUNED":
            raise optuna.TrialPruned(f"pruned in its trial process (run {run_id})")
        if state != "COMPLETE" or run.info.status != "FINISHED":
            error = run.data.tags.get(tracking.TAG_ERROR, "the trial process failed; see its MLflow run")
            if run.data.tags.get(tracking.TAG_FAULT) == "environment":
                raise EnvironmentFault("trial process", f"in the trial process: {error}")
            raise RuntimeError(error)
        metrics = run.data.metrics
        return TrialOutcome(
            run_id=run_id, val_accuracy=metrics["val_accuracy"],
            train_accuracy=metrics.get("train_accuracy", math.nan), test_accuracy=None,
            n_params=int(metrics.get("n_params", 0)), epochs=int(metrics.get("epochs", 0)),
            fit_seconds=metrics.get("fit_seconds", 0.0), seconds=time.perf_counter() - started,
            model_uri=run.data.tags.get(tracking.TAG_MODEL_URI), predict_ms=metrics.get("predict_ms", 0.0),
        )

    def close(self) -> None:
        self._stop_workers(grace=10)
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ warm workers
    def _worker(self, context: TrialContext) -> _Worker:
        """The live worker of this thread's lane, started (again) when needed."""
        if self._stopping:
            raise KeyboardInterrupt("stopped")
        lane = getattr(self._lanes, "index", None)
        if lane is None:
            lane = self._lanes.index = next(self._next_lane)
        worker = self._workers.get(lane)
        if worker is not None and worker.alive():
            return worker
        if worker is not None:  # died between trials
            worker.close("FAILED")
            self._count_loss(worker)
        with self._lock:
            if self._heartbeat is None:
                self._heartbeat = threading.Event()
                threading.Thread(target=self._touch_inboxes, name="mlops-tune-worker-heartbeat",
                                 daemon=True).start()
        options = ({"docker_args": containers.docker_args(self.cfg, "", self.workdir), "build_image": False}
                   if self.docker else {"env_manager": "local"})
        worker = _Worker(self, lane, context, options)
        self._workers[lane] = worker
        return worker

    def _wait(self, worker: _Worker, run_id: str, retried: bool) -> None:
        """Wait for the trial's run to end; a worker that dies meanwhile loses the trial."""
        import mlflow

        client = mlflow.MlflowClient()
        while True:
            if self._stopping:
                while self._interrupted is None:  # the main thread is ending the workers
                    time.sleep(POLL_SECONDS)
                raise KeyboardInterrupt(str(self._interrupted) or "interrupted")
            if client.get_run(run_id).info.status != "RUNNING":
                worker.finished_trials += 1
                self._fruitless = 0
                return
            if not worker.alive():
                time.sleep(0.5)  # it may have closed the run just before exiting
                if client.get_run(run_id).info.status != "RUNNING":
                    continue
                with contextlib.suppress(Exception):
                    client.set_tag(run_id, tracking.TAG_STATE, "FAIL")
                    client.set_tag(run_id, tracking.TAG_ERROR, "its worker exited mid-trial")
                    client.set_terminated(run_id, "KILLED")
                worker.close("FAILED")
                self._count_loss(worker)
                if retried:  # the second worker this trial takes down: the trial's doing (memory?)
                    raise RuntimeError("the trial's worker died twice while running it "
                                       "(out of memory? see runner.memory)")
                raise WorkerLost(f"its worker ({worker.label}) exited mid-trial; the trial runs again on a "
                                 "new worker")
            time.sleep(POLL_SECONDS)

    def _count_loss(self, worker: _Worker) -> None:
        if worker.finished_trials:
            self._fruitless = 0
            return
        self._fruitless += 1
        if self._fruitless >= MAX_FRUITLESS_WORKERS:
            raise EnvironmentFault("trial worker", f"{self._fruitless} trial workers in a row exited before "
                                   f"finishing a trial (last: {worker.label}); see the worker runs in MLflow")

    def _touch_inboxes(self) -> None:
        """Tell the workers the study is alive (a killed study's workers stop by themselves)."""
        while self._heartbeat is not None and not self._heartbeat.is_set():
            for worker in list(self._workers.values()):
                with contextlib.suppress(OSError):
                    (worker.inbox / ALIVE_FILE).touch()
            self._heartbeat.wait(5)

    def _stop_workers(self, grace: float) -> None:
        if self._heartbeat is not None:
            self._heartbeat.set()
        workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            worker.ask_to_stop()
        deadline = time.monotonic() + grace
        for worker in workers:
            while worker.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            worker.close("FINISHED" if worker.exit_code() == 0 else "KILLED")

    # ------------------------------------------------------------------ the study's side of the seam
    def _storage_for_trial(self, context: TrialContext) -> str:
        """The Optuna storage URL the trial process reports to (a container: the study's proxy)."""
        if not self.docker:
            return context.storage_url
        with self._lock:
            if self._proxy is None:
                from mlops_tune.optuna_setup import StorageServer

                self._proxy = StorageServer(context.storage_url)
                mode = "one container per trial" if self.fresh else \
                    f"{self.n_workers} warm container{'s' if self.n_workers > 1 else ''}"
                print(f"runner=docker: trials in {self.image}{containers.limits_text(self.cfg)}, {mode}; "
                      f"Optuna storage served to them on 127.0.0.1:{self._proxy.port}", flush=True)
        return str(self._proxy.url)

    def _trial_file_config(self, trial_cfg: Mapping[str, Any]) -> dict[str, Any]:
        if not self.docker:
            return dict(trial_cfg)
        config = {
            **trial_cfg,
            # the container gets the server's URI from MLflow (MLFLOW_TRACKING_URI); no secret in the file
            "tracking": {**trial_cfg["tracking"], "uri": "${oc.env:MLFLOW_TRACKING_URI}"},
        }
        if self.data_path:
            config["data"] = {**config["data"], "path": self.data_path}
        return config

    def project_dir(self) -> Path:
        """The study's MLflow Project (with ``docker_env`` for runner=docker)."""
        import yaml

        with self._lock:
            if self._project is None:
                project = self.workdir / "project"
                project.mkdir(mode=0o755)
                spec: dict[str, Any] = {"name": "mlops-tune-trial"}
                if self.docker:
                    spec["docker_env"] = {"image": self.image,
                                          "volumes": [f"{self.workdir}:{self.workdir}:ro", *self.mounts]}
                spec["entry_points"] = {
                    TRIAL_ENTRY_POINT: {"parameters": {"trial_dir": {"type": "string"}},
                                        "command": "python -m mlops_tune.worker {trial_dir}"},
                    WORKER_ENTRY_POINT: {"parameters": {"inbox": {"type": "string"}},
                                         "command": "python -m mlops_tune.worker --serve {inbox}"},
                }
                (project / "MLproject").write_text(yaml.safe_dump(spec, sort_keys=False))
                self._project = project
        return self._project

    def _project_run(self, project: Path, folder: Path, run_id: str, context: TrialContext) -> None:
        """One trial, one process: ``mlflow.projects.run`` of the ``trial`` entry point, synchronously;
        a failed trial's run tags say what happened."""
        import mlflow.projects
        from mlflow.exceptions import ExecutionException

        container = f"mlops-tune-{run_id}" if self.docker else ""
        options: dict[str, Any] = (
            {"docker_args": containers.docker_args(self.cfg, container, self.workdir), "build_image": False}
            if self.docker else {"env_manager": "local"})
        try:
            mlflow.projects.run(str(project), entry_point=TRIAL_ENTRY_POINT, parameters={"trial_dir": str(folder)},
                                run_id=run_id, experiment_id=context.experiment_id, synchronous=True, **options)
        except ExecutionException:  # the trial failed (a container is gone: --rm)
            pass
        except BaseException:
            # interrupted (Ctrl-C, or SIGTERM: mlops_tune.faults turns it into the same):
            # MLflow stops its `docker run` client, not the container
            if container:
                containers.remove(container)
            raise


class _Worker:
    """One warm worker: an MLflow Project run of the ``worker`` entry point, and its inbox.

    ``mlflow.projects.run`` runs synchronously in a thread of the study (MLflow's own
    asynchronous mode would start an ``mlflow run`` process first: seconds of imports more
    per worker); it returns when the worker exits, having set the run's status."""

    def __init__(self, runner: ProjectRunner, lane: int, context: TrialContext, options: dict[str, Any]) -> None:
        import mlflow.projects

        self.runner = runner
        self.finished_trials = 0
        self.inbox = runner.workdir / f"worker-{lane}-{time.monotonic_ns()}"
        self.inbox.mkdir(mode=0o755)
        (self.inbox / ALIVE_FILE).touch()
        self.run_id = tracking.create_run(context.experiment_id, f"worker-{lane}", {
            "mlflow.parentRunId": context.parent_run_id, tracking.TAG_ROLE: "worker",
            "mlflow.source.type": "PROJECT", "mlflow.source.name": runner.project_dir().as_uri(),
            "mlflow.project.entryPoint": WORKER_ENTRY_POINT,
        })
        self.label = f"worker-{lane}, run {self.run_id}"
        self.container = f"mlops-tune-worker-{self.run_id}" if runner.docker else ""
        if self.container:
            options = {**options, "docker_args": {**options["docker_args"], "name": self.container}}
        self._exit: int | None = None
        self._closed = False

        def serve() -> None:
            try:
                mlflow.projects.run(str(runner.project_dir()), entry_point=WORKER_ENTRY_POINT,
                                    parameters={"inbox": str(self.inbox)}, run_id=self.run_id,
                                    experiment_id=context.experiment_id, synchronous=True, **options)
                self._exit = 0
            except Exception:  # ExecutionException: it exited non-zero (killed, failed)
                self._exit = -1

        self._thread = threading.Thread(target=serve, name=f"mlops-tune-worker-{lane}", daemon=True)
        self._thread.start()

    def submit(self, name: str, trial_cfg: Mapping[str, Any], link: Mapping[str, Any]) -> None:
        """Put a trial folder in the inbox, appearing whole (written aside, then renamed)."""
        staging = self.inbox / f".{name}"
        write_trial_dir(staging, trial_cfg, link)
        staging.rename(self.inbox / name)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def exit_code(self) -> int | None:
        """0 when it stopped when asked, -1 when it failed or was killed, None while it runs."""
        return self._exit

    def ask_to_stop(self) -> None:
        with contextlib.suppress(OSError):
            (self.inbox / STOP_FILE).touch()

    def close(self, status: str) -> None:
        """End the worker (its process, its container) and its run."""
        import mlflow

        if self._closed:
            return
        self._closed = True
        if self.container:
            containers.remove(self.container)
        elif self.alive():  # the local worker's process group (its command line names the inbox)
            subprocess.run(["pkill", "-TERM", "-f", str(self.inbox)], capture_output=True, check=False)
        self._thread.join(15)
        with contextlib.suppress(Exception):  # the status we decided, over MLflow's "FAILED" for a killed run
            client = mlflow.MlflowClient()
            if status != "FINISHED" or client.get_run(self.run_id).info.status == "RUNNING":
                client.set_terminated(self.run_id, status)
