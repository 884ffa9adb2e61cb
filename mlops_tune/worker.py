"""The trial's own process: ``python -m mlops_tune.worker TRIAL_DIR`` (MLproject entry point ``trial``).

With ``runner=mlflow`` or ``runner=docker`` the study submits each trial as an MLflow
Project run (``mlops_tune.runners.project``); this module is what runs on the other side,
in a fresh process or inside the family's container. ``TRIAL_DIR`` holds two files the
study wrote:

* ``config.yaml``: the trial's own config (model, data, seed, tracking), the same YAML
  ``mlops-train --config-path`` reproduces the trial from;
* ``link.yaml``: how to reach the study: its Optuna storage (a URL, or ``grpc://`` for the
  study's storage proxy), the study name, the trial number, the pruner, and the validation
  accuracy above which the model is worth logging.

The trial reports every epoch to its Optuna trial, so the study's pruner decides here as it
does in-process; its outcome goes to the MLflow run the study created (``link.yaml``'s
``run_id``), where the study reads it back. Exit codes are those of ``mlops-train``.

A **warm worker** (``python -m mlops_tune.worker --serve INBOX``, entry point ``worker``)
is one long-lived process (one MLflow Project run, in the family's container for
runner=docker) that runs every trial folder the study puts in its inbox, in order, so
imports, the MLflow connection and the dataset load happen once per worker, not per trial.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mlops_tune.trial import TRIAL_CONFIG_FILE, TRIAL_LINK_FILE

PROG = "mlops-tune trial"
#: in a warm worker's inbox: the study asks the worker to stop / says it is alive
STOP_FILE = "STOP"
ALIVE_FILE = "ALIVE"
#: a worker whose study has not touched ALIVE for this long stops (the study was killed)
ORPHAN_SECONDS = 60.0
POLL_SECONDS = 0.01


class TrialProcess:
    """Runs trials of one study in this process; what a warm worker keeps between trials:
    the imports, the MLflow connection, the loaded datasets and the study's storage."""

    def __init__(self) -> None:
        self._experiments: dict[tuple[str, str], str] = {}
        self._splits: dict[str, Any] = {}
        self._studies: dict[str, Any] = {}
        #: the worker's own MLflow Project run (a warm worker), tagged on every trial it runs
        self.worker_run = os.environ.get("MLFLOW_RUN_ID", "") if os.environ.get("MLOPS_TUNE_WARM") else ""

    def run(self, folder: Path) -> str:
        """Run the trial described in ``folder``; its MLflow run records the outcome. Returns a summary."""
        import json

        import yaml
        from omegaconf import OmegaConf
        from optuna import TrialPruned

        from mlops_tune import faults, tracking
        from mlops_tune.config import load_train
        from mlops_tune.data import load_splits
        from mlops_tune.families import settle_imports
        from mlops_tune.trial import run_trial

        plain = load_train(OmegaConf.load(folder / TRIAL_CONFIG_FILE))  # ${oc.env:...} in a container
        link = yaml.safe_load((folder / TRIAL_LINK_FILE).read_text())
        data_key = json.dumps([plain["data"], plain["seed"]], sort_keys=True, default=str)
        if data_key not in self._splits:
            self._splits[data_key] = load_splits(plain["data"], plain["seed"])
        uri, experiment = plain["tracking"]["uri"], plain["tracking"]["experiment"]
        if (uri, experiment) not in self._experiments:
            self._experiments[(uri, experiment)] = tracking.connect(uri, experiment)
        settle_imports(str(plain["model"]["family"]))
        tags = container_tags()
        if self.worker_run:
            tags[tracking.TAG_WORKER_RUN] = self.worker_run
        with faults.classified(tracking_uri=uri, storage_url=str(link.get("storage", ""))):
            reporter, should_log_model = self.study_link(link)
            try:
                outcome = run_trial(plain, experiment_id=self._experiments[(uri, experiment)],
                                    splits=self._splits[data_key], reporter=reporter, evaluate_test=False,
                                    should_log_model=should_log_model, tags=tags, run_id=link.get("run_id"))
            except TrialPruned as exc:
                return f"pruned: {exc}"
        return f"val_accuracy={outcome.val_accuracy:.4f}"

    def study_link(self, link: Mapping[str, Any]) -> tuple[Any, Callable[[float], bool]]:
        """The Optuna reporter for the study's trial, and when to log the model."""
        import json

        import optuna

        from mlops_tune.optuna_setup import make_pruner, open_storage
        from mlops_tune.trial import OptunaReporter

        if link.get("trial") is None:  # a retraining (gate.confirm): no Optuna trial, no model
            return None, lambda _value: False
        key = json.dumps([link["storage"], link["study"], link.get("pruner", "median")], sort_keys=True)
        if key not in self._studies:  # one storage connection and study per worker, not per trial
            storage = optuna.storages.get_storage(open_storage(str(link["storage"])))
            study = optuna.load_study(study_name=str(link["study"]), storage=storage,
                                      pruner=make_pruner(link.get("pruner", "median")))
            self._studies[key] = (study, storage, storage.get_study_id_from_name(study.study_name))
        study, storage, study_id = self._studies[key]
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, int(link["trial"]))
        reporter = OptunaReporter(optuna.trial.Trial(study, trial_id))
        above = float(link.get("log_model_above", -math.inf))
        return reporter, lambda val_accuracy: val_accuracy > above


def run(folder: Path) -> int:
    """One trial in a fresh process (``runner.fresh_per_trial=true``)."""
    from mlops_tune.errors import EXIT_OK

    print(f"{PROG}: {TrialProcess().run(folder)}", flush=True)
    return EXIT_OK


def serve(inbox: Path) -> int:
    """A warm worker: run every trial folder the study puts in ``inbox``, in order, until the
    study writes ``STOP`` (or stops touching ``ALIVE``: it was killed). A trial that fails ends
    its own run FAILED; the worker goes on with the next."""
    import time

    from mlops_tune.errors import EXIT_OK

    process = TrialProcess()
    done: set[str] = set()
    print(f"{PROG}: warm worker ready ({inbox.name.rsplit('-', 1)[0]})", flush=True)
    while not (inbox / STOP_FILE).exists():
        alive = inbox / ALIVE_FILE
        if alive.exists() and time.time() - alive.stat().st_mtime > ORPHAN_SECONDS:
            print(f"{PROG}: the study stopped answering for {ORPHAN_SECONDS:.0f} s; stopping", flush=True)
            break
        ready = sorted((p for p in inbox.glob("trial-*") if p.is_dir() and p.name not in done),
                       key=lambda p: int(p.name.split("-")[1]))
        if not ready:
            time.sleep(POLL_SECONDS)
            continue
        folder = ready[0]
        done.add(folder.name)
        try:
            process.run(folder)  # the study prints the trial's line
        except Exception as exc:  # the trial's run says what failed; the worker goes on
            _close_failed(folder, exc)
    return EXIT_OK


def _close_failed(folder: Path, exc: Exception) -> None:
    """A trial that failed before or outside its run (bad config, store down): end its run FAILED
    with the error, so the study, waiting on the run, learns what happened."""
    import contextlib

    import mlflow
    import yaml

    from mlops_tune import faults, tracking
    from mlops_tune.errors import first_line
    from mlops_tune.secrets import redact_text

    print(f"{PROG}: {folder.name} failed: {redact_text(first_line(exc))}", flush=True)
    with contextlib.suppress(Exception):
        run_id = yaml.safe_load((folder / TRIAL_LINK_FILE).read_text())["run_id"]
        client = mlflow.MlflowClient()
        if client.get_run(run_id).info.status != "RUNNING":
            return  # run_trial closed it (FAILED, with the error)
        tags = {tracking.TAG_STATE: "FAIL", tracking.TAG_ERROR: redact_text(first_line(exc))}
        if faults.classify(exc) is not None:
            tags[tracking.TAG_FAULT] = "environment"
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, "FAILED")


def container_tags() -> dict[str, str]:
    """In a trial image (``MLOPS_TUNE_IMAGE_FAMILY`` set by the Dockerfile): run tags saying
    which image, which user, and the memory and CPU limits the trial ran under (cgroup v2
    format: bytes or ``max``; ``QUOTA PERIOD`` in microseconds). Elsewhere: none."""
    family = os.environ.get("MLOPS_TUNE_IMAGE_FAMILY")
    if not family:
        return {}

    def read(*paths: str) -> str | None:
        for path in paths:
            with contextlib.suppress(OSError):
                return Path(path).read_text().strip()
        return None

    memory = read("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
    cpu = read("/sys/fs/cgroup/cpu.max")
    if cpu is None:  # cgroup v1: quota and period in two files
        quota, period = read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        cpu = f"{'max' if quota == '-1' else quota} {period}" if quota and period else None
    tags = {"mlops_tune.image": family, "mlops_tune.uid": str(os.getuid())}
    tags.update({tag: value for tag, value in (("mlops_tune.memory_limit", memory), ("mlops_tune.cpu_quota", cpu))
                 if value})
    return tags


def main(argv: list[str] | None = None) -> None:
    from mlops_tune import faults, heap, secrets
    from mlops_tune.cli import run_task
    from mlops_tune.errors import EXIT_USAGE

    args = sys.argv[1:] if argv is None else argv
    warm = len(args) == 2 and args[0] == "--serve" and Path(args[1]).is_dir()
    if not warm and (len(args) != 1 or not (Path(args[0]) / TRIAL_LINK_FILE).is_file()):
        print(f"usage: python -m mlops_tune.worker TRIAL_DIR | --serve INBOX (TRIAL_DIR: a folder with "
              f"{TRIAL_CONFIG_FILE} and {TRIAL_LINK_FILE}, written by a study with runner=mlflow or "
              "runner=docker; INBOX: a warm worker's folder of such trial folders)", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    heap.defer()  # until the first trial: see mlops_tune.heap
    faults.install_signal_handlers()
    faults.quiet_background_faults()
    secrets.guard_streams()
    if warm:
        os.environ["MLOPS_TUNE_WARM"] = "1"
        sys.exit(run_task(lambda _: serve(Path(args[1])), None, PROG))
    sys.exit(run_task(lambda _: run(Path(args[0])), None, PROG))


if __name__ == "__main__":
    main()
