"""Trials as MLflow Project runs of the ``train`` entry point (``runner=mlflow``).

The study process creates the trial's child run (nested under the study's run), writes
the trial's config to a YAML file and calls ``mlflow.projects.run`` with that run id,
so the Project run IS the child run. The trial process (``mlops-train`` with a
``trial`` section in its config) reports every epoch to the same Optuna storage, so
the study's pruner decides across the process boundary, and writes its outcome to the
run; the study reads it back from MLflow.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlops_tune import tracking
from mlops_tune.errors import EnvironmentFault
from mlops_tune.runners._base import Runner, TrialContext
from mlops_tune.trial import TrialOutcome

#: the folder holding ``MLproject``
PROJECT_DIR = Path(__file__).resolve().parent.parent.parent


class MlflowRunner(Runner):
    """Runs each trial with ``mlflow.projects.run(..., env_manager="local")``."""

    def __init__(self, runner_cfg: Mapping[str, Any]) -> None:
        super().__init__(runner_cfg)
        self.workdir = Path(tempfile.mkdtemp(prefix="mlops-tune-trials-"))
        # the project command says `python`: make it this interpreter (and its packages)
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

    def run(self, trial_cfg: Mapping[str, Any], trial: Any, context: TrialContext,
            tags: Mapping[str, str]) -> TrialOutcome:
        import mlflow
        import optuna

        started = time.perf_counter()
        name = f"trial-{trial.number}"
        # the tags MLflow gives its own Project runs (it sets none on a run it is handed)
        run_id = tracking.create_run(context.experiment_id, name, {
            **tags, "mlflow.parentRunId": context.parent_run_id, "mlflow.source.type": "PROJECT",
            "mlflow.source.name": PROJECT_DIR.as_uri(), "mlflow.project.entryPoint": "train",
        })
        trial.set_user_attr("mlflow_run_id", run_id)
        link = {"storage": self.storage_for_trial(context), "study": trial.study.study_name,
                "trial_id": trial._trial_id, "pruner": context.pruner, "log_model_above": context.best_value()}
        try:
            self.launch(trial_cfg, name, run_id, link, context)
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
        shutil.rmtree(self.workdir, ignore_errors=True)

    def storage_for_trial(self, context: TrialContext) -> str:
        """The Optuna storage URL the trial process reports to."""
        return context.storage_url

    def launch(self, trial_cfg: Mapping[str, Any], name: str, run_id: str, link: Mapping[str, Any],
               context: TrialContext) -> None:
        """Run the ``train`` entry point as the Project run ``run_id`` and wait for it."""
        import yaml
        from mlflow.exceptions import ExecutionException

        config_file = self.workdir / f"{name}.yaml"
        config_file.write_text(yaml.safe_dump(self.trial_file_config(trial_cfg, link), sort_keys=False))
        config_file.chmod(0o644)
        overrides = (f"--config-path {self.workdir} --config-name {name} "
                     f"hydra.run.dir={self.trial_output_dir(name)}")
        with contextlib.suppress(ExecutionException):  # the run's tags say what happened
            self.project_run(overrides, run_id, context)

    def trial_file_config(self, trial_cfg: Mapping[str, Any], link: Mapping[str, Any]) -> dict[str, Any]:
        """The config the trial process reads: the trial's sections and its link to the study."""
        return {**trial_cfg, "trial": dict(link)}

    def trial_output_dir(self, name: str) -> str:
        """Hydra's output folder, as the trial process sees it."""
        return str(self.workdir / name)

    def project_run(self, overrides: str, run_id: str, context: TrialContext) -> None:
        """``mlflow.projects.run`` of the ``train`` entry point, synchronously."""
        import mlflow.projects

        mlflow.projects.run(str(PROJECT_DIR), entry_point="train", parameters={"overrides": overrides},
                            env_manager="local", run_id=run_id, experiment_id=context.experiment_id,
                            synchronous=True)


def trial_process_link(link: Mapping[str, Any]) -> tuple[Any, Callable[[float], bool]]:
    """In the trial process: the Optuna reporter for the study's trial, and when to log the model."""
    import optuna

    from mlops_tune.runners.inprocess import OptunaReporter
    from mlops_tune.study import make_pruner

    storage: Any = str(link["storage"])
    if storage.startswith("grpc://"):  # runner=docker: the study's storage, through its gRPC proxy
        from mlops_tune.runners.docker import grpc_storage

        storage = grpc_storage(storage)
    study = optuna.load_study(study_name=str(link["study"]), storage=storage,
                              pruner=make_pruner({"pruner": link.get("pruner", "median")}))
    reporter = OptunaReporter(optuna.trial.Trial(study, int(link["trial_id"])))
    above = float(link.get("log_model_above", -math.inf))
    return reporter, lambda val_accuracy: val_accuracy > above
