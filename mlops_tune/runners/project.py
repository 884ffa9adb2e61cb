"""Trials as MLflow Project runs (``runner=mlflow``, and ``runner=docker`` = the same in a container).

The study side of the study/worker seam. For every study the runner generates a small
MLflow Project in a private folder: one entry point, ``trial``, running
``python -m mlops_tune.worker TRIAL_DIR`` (the trial's own process, ``mlops_tune.worker``).
With ``runner=docker`` the project also has a ``docker_env`` naming the model family's
image (``runner.images`` in ``conf/runner/docker.yaml``); Docker is a property of the
project, not another runner. Nothing is read from a source checkout, so both work from an
installed package.

Per trial the study creates the child run (nested under the study's run), writes the
trial's config and its link to the study into a trial folder, and calls
``mlflow.projects.run`` with that run id: the Project run IS the child run. The trial
process reports every epoch to the study's Optuna storage (for runner=docker through
Optuna's gRPC storage proxy, served by the study on 127.0.0.1), so the study's pruner
decides across the process boundary; the outcome is read back from the run.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlops_tune import attrs, tracking
from mlops_tune.errors import EnvironmentFault
from mlops_tune.runners import containers
from mlops_tune.runners._base import Runner, TrialContext
from mlops_tune.trial import TrialOutcome, write_trial_dir

ENTRY_POINT = "trial"


class ProjectRunner(Runner):
    """Runs each trial with ``mlflow.projects.run``: locally (``env_manager=local``) or in Docker."""

    def __init__(self, runner_cfg: Mapping[str, Any]) -> None:
        super().__init__(runner_cfg)
        self.docker = self.cfg.get("name") == "docker"
        self.workdir = Path(tempfile.mkdtemp(prefix="mlops-tune-trials-"))
        self.workdir.chmod(0o755)  # a container's unprivileged user reads the trial folders
        self.image = ""
        self.mounts: list[str] = []
        self.data_path: str | None = None
        self._project: Path | None = None
        self._proxy: Any = None
        if not self.docker:
            # the project command says `python`: make it this interpreter (and its packages)
            os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

    def check(self, cfg: Mapping[str, Any]) -> None:
        if self.docker:
            self.image, self.mounts, self.data_path = containers.check(self.cfg, cfg)

    def run(self, trial_cfg: Mapping[str, Any], trial: Any, context: TrialContext,
            tags: Mapping[str, str]) -> TrialOutcome:
        import mlflow
        import optuna

        started = time.perf_counter()
        name = f"trial-{trial.number}"
        project = self._project_dir()
        # the tags MLflow gives its own Project runs (it sets none on a run it is handed)
        run_id = tracking.create_run(context.experiment_id, name, {
            **tags, "mlflow.parentRunId": context.parent_run_id, "mlflow.source.type": "PROJECT",
            "mlflow.source.name": project.as_uri(), "mlflow.project.entryPoint": ENTRY_POINT,
        })
        trial.set_user_attr(attrs.RUN, run_id)
        folder = self.workdir / name
        write_trial_dir(folder, self._trial_file_config(trial_cfg), {
            "storage": self._storage_for_trial(context), "study": trial.study.study_name,
            "trial": trial.number, "pruner": context.pruner, "log_model_above": context.best_value(),
        })
        try:
            self._project_run(project, folder, run_id, context)
        except KeyboardInterrupt:  # MLflow cancels the process and marks the run FAILED: it was stopped
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
            model_uri=run.data.tags.get(tracking.TAG_MODEL_URI),
        )

    def close(self) -> None:
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ the study's side of the seam
    def _storage_for_trial(self, context: TrialContext) -> str:
        """The Optuna storage URL the trial process reports to (a container: the study's proxy)."""
        if not self.docker:
            return context.storage_url
        if self._proxy is None:
            from mlops_tune.optuna_setup import StorageServer

            self._proxy = StorageServer(context.storage_url)
            print(f"runner=docker: trials in {self.image}{containers.limits_text(self.cfg)}; "
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

    def _project_dir(self) -> Path:
        """The study's one-entry-point MLflow Project (with ``docker_env`` for runner=docker)."""
        import yaml

        if self._project is None:
            project = self.workdir / "project"
            project.mkdir(mode=0o755)
            spec: dict[str, Any] = {"name": "mlops-tune-trial"}
            if self.docker:
                spec["docker_env"] = {"image": self.image,
                                      "volumes": [f"{self.workdir}:{self.workdir}:ro", *self.mounts]}
            spec["entry_points"] = {ENTRY_POINT: {
                "parameters": {"trial_dir": {"type": "string"}},
                "command": "python -m mlops_tune.worker {trial_dir}",
            }}
            (project / "MLproject").write_text(yaml.safe_dump(spec, sort_keys=False))
            self._project = project
        return self._project

    def _project_run(self, project: Path, folder: Path, run_id: str, context: TrialContext) -> None:
        """``mlflow.projects.run`` of the ``trial`` entry point, synchronously; a failed trial's run
        tags say what happened."""
        import mlflow.projects
        from mlflow.exceptions import ExecutionException

        options: dict[str, Any] = {}
        container = ""
        if self.docker:
            container = f"mlops-tune-{run_id}"
            options = {"docker_args": containers.docker_args(self.cfg, container, self.workdir),
                       "build_image": False}
        else:
            options = {"env_manager": "local"}
        try:
            mlflow.projects.run(str(project), entry_point=ENTRY_POINT, parameters={"trial_dir": str(folder)},
                                run_id=run_id, experiment_id=context.experiment_id, synchronous=True,
                                **options)
        except ExecutionException:  # the trial failed (a container is gone: --rm)
            pass
        except BaseException:
            # interrupted (Ctrl-C, or SIGTERM: mlops_tune.faults turns it into the same):
            # MLflow stops its `docker run` client, not the container
            if container:
                containers.remove(container)
            raise
