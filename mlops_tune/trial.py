"""ONE trial: train one model from a resolved config, evaluate it, track it in MLflow.

``mlops-train`` calls it once; every worker of a study (``mlops_tune.workers``) calls it
for each trial it takes, in its own process (docs/architecture.md).
"""

from __future__ import annotations

import functools
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from optuna.exceptions import TrialPruned

from mlops_tune.data import Splits, load_splits
from mlops_tune.families import get_family
from mlops_tune.records import models, tracking
from mlops_tune.records.backlog import Backlog, take
from mlops_tune.runtime import faults

#: the config sections that make up one trial (and its reproducible YAML)
TRIAL_SECTIONS = ("model", "data", "seed", "tracking")


class Reporter(Protocol):
    """Receives the validation accuracy after every epoch; may raise ``optuna.TrialPruned``."""

    def report(self, value: float, step: int) -> None: ...


class OptunaReporter:
    """Reports per-epoch validation accuracy to an Optuna trial and prunes on its word.

    Each report is a storage write and each question a read (some 4 and 2-7 ms on SQLite, a
    30-epoch trial's largest cost outside training), so both start where they can matter:
    ``report_from`` is the first epoch written (None: none, nothing compares them), ``ask_from``
    the first epoch at which the pruner is asked (None: never).

    ``background=True`` takes them off the training's path: a thread of this reporter writes
    and asks while the next epoch trains, and the pruner's "stop" is acted on at the next
    epoch's report (one epoch later than in line: some 40 ms of a small Keras model). A
    storage error met there is raised on the training thread at the next report, or by
    :meth:`close`, which waits for what was handed over. A "stop" on the last epoch (the only
    one of a scikit-learn trial) is raised by :meth:`raise_verdict` once training returned:
    the decisions are the ones made in line."""

    def __init__(self, trial: Any, on_report: Callable[[float, int], None] | None = None,
                 report_from: int | None = 0, ask_from: int | None = 0, background: bool = False) -> None:
        self.trial = trial
        self.on_report = on_report
        self.report_from, self.ask_from = report_from, ask_from
        self.background = background
        self._queue: queue.SimpleQueue[tuple[float, int, bool, bool] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._verdict: str | None = None
        self._error: BaseException | None = None

    def report(self, value: float, step: int) -> None:
        faults.check_stopped()  # a stop signal whose first raise was lost ends the training here
        if self.on_report is not None:
            self.on_report(value, step)
        self._raise_error()
        self.raise_verdict()
        writes = self.report_from is not None and step >= self.report_from
        asks = self.ask_from is not None and step >= self.ask_from
        if not (writes or asks):
            return
        if not self.background:
            self._verdict = self._judge(value, step, writes, asks)
            self.raise_verdict()
            return
        if self._thread is None:
            # not a daemon: the interpreter must not finalize while it is inside the storage's C code
            # (a SIGTERM'd study aborted at exit: "PyThreadState_Get ... the GIL is released")
            self._thread = threading.Thread(target=self._work, name="mlops-tune-optuna-report")
            self._thread.start()
        self._queue.put((value, step, writes, asks))

    def close(self) -> None:
        """Wait for the reports handed to the thread; raise a storage error met there."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise_error()

    def raise_verdict(self) -> None:
        """Raise ``TrialPruned`` if the pruner said stop (after :meth:`close`: a stop on the last epoch)."""
        if self._verdict is not None:
            raise TrialPruned(self._verdict)

    def _judge(self, value: float, step: int, writes: bool, asks: bool) -> str | None:
        if writes:
            self.trial.report(value, step)
        if asks and self.trial.should_prune():
            return f"pruned at epoch {step} with val_accuracy={value:.4f}"
        return None

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _work(self) -> None:
        while True:
            item = take(self._queue)
            if item is None:
                return
            if self._verdict is not None or self._error is not None:
                continue  # decided: what is left goes unwritten, as in line
            try:
                self._verdict = self._judge(*item)
            except BaseException as exc:  # raised on the training thread
                self._error = exc


@dataclass(frozen=True)
class TrialOutcome:
    """What one trial produced (all accuracies on the splits of ``data``)."""

    run_id: str
    val_accuracy: float
    train_accuracy: float
    test_accuracy: float | None
    n_params: int
    epochs: int
    fit_seconds: float
    seconds: float
    model_uri: str | None
    evaluate_seconds: float = 0.0
    predict_ms: float = 0.0
    report_seconds: float = 0.0  # of fit_seconds: reporting epochs to Optuna (pruning)

    @property
    def overhead_seconds(self) -> float:
        """Wall time spent outside fit and evaluation (tracking, building, bookkeeping)."""
        return self.seconds - self.fit_seconds - self.evaluate_seconds


def data_source(data_cfg: Mapping[str, Any]) -> str:
    """Where the data came from, in words: ``sklearn digits``, ``csv /data/iris.csv``."""
    where = data_cfg.get("path") or data_cfg.get("dataset") or data_cfg.get("name")
    return f"{data_cfg.get('loader', '')} {where}".strip()


def trial_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config that defines one trial; logged as ``config.yaml``."""
    return {key: cfg[key] for key in TRIAL_SECTIONS if key in cfg}


def run_trial(
    cfg: Mapping[str, Any],
    *,
    experiment_id: str,
    splits: Splits | None = None,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    reporter: Reporter | None = None,
    evaluate_test: bool = True,
    should_log_model: Callable[[float], bool] = lambda _val_accuracy: True,
    on_run_started: Callable[[str], None] | None = None,
    run_id: str | None = None,
    backlog: Backlog | None = None,
) -> TrialOutcome:
    """Train, evaluate and track one model described by a validated, plain ``cfg``.

    Args:
        cfg: plain config with ``model``, ``data``, ``seed`` (and ``tracking``).
        experiment_id: MLflow experiment of the run (see :func:`tracking.connect`).
        splits: the loaded data; loaded from ``cfg["data"]`` when omitted.
        parent_run_id: the study's run, for a trial's child run.
        reporter: gets ``val_accuracy`` per epoch (pruning raises ``optuna.TrialPruned``).
        evaluate_test: also measure the test split (``mlops-train`` does; study trials don't).
        should_log_model: decides from the validation accuracy whether to log the model.
        on_run_started: called with the run id as soon as the run exists.
        run_id: an existing run to log into.
        backlog: writes the params, the config, the dataset input and the model's files in its
            thread, while the caller goes on (its ``wait()`` says when they are written; the
            model's URI is fixed here); None: all written here, before this returns.

    Raises:
        optuna.TrialPruned: the reporter pruned the trial (the run ends FINISHED, tagged PRUNED).
        Exception: training failed (the run ends FAILED with the error as tag and artifact).
    """
    started = time.perf_counter()
    model_cfg, seed = cfg["model"], int(cfg["seed"])
    family = get_family(model_cfg["family"])
    if splits is None:
        splits = load_splits(cfg["data"], seed)
    inputs = splits.as_input(family.input_kind)  # may reject the data before any run exists
    family.check_data(model_cfg, inputs)  # e.g. a model too large to build: before any run exists
    history: list[dict[str, float]] = []

    reporting = [0.0]

    def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
        if epoch == 1:  # a model that trains for epochs: its later ones leave Python's lock free
            tracking.warm_model_logging()
            if backlog is not None:
                backlog.resume()
        if len(history) <= epoch:
            history.append(dict(metrics))
        if reporter is not None:
            reported = time.perf_counter()
            try:
                reporter.report(metrics["val_accuracy"], epoch)
            finally:
                reporting[0] += time.perf_counter() - reported

    run_tags = {tracking.TAG_FAMILY: family.name, **(tags or {}),
                **({tracking.TAG_DATA: inputs.fingerprint} if inputs.fingerprint else {})}
    name = run_name or f"{model_cfg['name']}-{cfg['data']['name']}"
    pruned: TrialPruned | None = None
    params = {**tracking.flatten("model", model_cfg), **tracking.flatten("data", cfg["data"]), "seed": str(seed)}
    # a model that trains for epochs shows its params while it trains; a one-shot fit writes them
    # with its result (one request fewer per trial to the tracking server)
    later = {} if "epochs" in model_cfg else params
    with tracking.run(experiment_id, name, parent_run_id=parent_run_id, tags=run_tags,
                      resume_run_id=run_id) as run_id:
        if on_run_started is not None:
            on_run_started(run_id)
        writes = {
            "params": functools.partial(tracking.log_batch, params=params, run_id=run_id) if not later else None,
            "dataset": functools.partial(tracking.log_data, str(cfg["data"]["name"]), inputs.fingerprint,
                                         inputs.x_train, inputs.y_train, data_source(cfg["data"]), run_id=run_id)
            if inputs.fingerprint else None,
            "config": functools.partial(tracking.log_config, trial_config(cfg),
                                        artifact_uri=tracking.artifact_uri()),
        }
        for what, write in writes.items():  # with a backlog: written while this trial trains
            if write is not None and backlog is None:
                write()
            elif write is not None and backlog is not None:
                backlog.submit(f"the {what} of run {run_id}", write)
        random.seed(seed)
        np.random.seed(seed)
        fit_started = time.perf_counter()
        try:
            try:
                fit = family.fit(model_cfg, inputs, seed, on_epoch)
            finally:
                if backlog is not None and len(history) > 1:
                    backlog.pause()  # until the next trial's epoch 1: see mlops_tune.records.backlog
                if isinstance(reporter, OptunaReporter):
                    reporter.close()  # may raise a storage error met by its thread
            if isinstance(reporter, OptunaReporter):
                reporter.raise_verdict()  # a stop on the last epoch, decided beside the training
        except TrialPruned as exc:
            tracking.log_batch(params=later, history=history, tags={tracking.TAG_STATE: "PRUNED",
                                                                    tracking.RUN_NAME: f"{name}: pruned"})
            pruned = exc
        except Exception:
            tracking.log_batch(params=later, history=history, tags={tracking.TAG_STATE: "FAIL",
                                                                    tracking.RUN_NAME: f"{name}: failed"})
            raise
        else:
            fit_seconds = time.perf_counter() - fit_started
            evaluate_started = time.perf_counter()
            val_accuracy = family.accuracy(fit.model, inputs.x_val, inputs.y_val)
            # the prediction latency the gate may limit (gate.max_predict_ms): per sample, one batch
            predict_ms = (time.perf_counter() - evaluate_started) * 1000 / max(1, len(inputs.y_val))
            test_accuracy = (family.accuracy(fit.model, inputs.x_test, inputs.y_test)
                             if evaluate_test else None)
            evaluate_seconds = time.perf_counter() - evaluate_started
            n_params = family.n_params(fit.model)
            metrics = {"val_accuracy": val_accuracy, "fit_seconds": fit_seconds, "predict_ms": predict_ms,
                       "n_params": float(n_params), "epochs": float(len(fit.history))}
            if test_accuracy is not None:
                metrics["test_accuracy"] = test_accuracy
            model_uri = None
            log_model = should_log_model(val_accuracy)
            if log_model and backlog is None:
                tracking.wait_model_logging()
                model_uri = family.log_model(fit.model, inputs, "model")
            elif log_model and backlog is not None:
                # the model's URI now (the trial's result names it), its files while the next trial trains
                model_uri = models.start_model(run_id, experiment_id, "model", params)
                backlog.submit(f"the model of run {run_id}", functools.partial(
                    write_model, family, fit.model, inputs, model_uri))
            tracking.log_batch(
                params=later, metrics=metrics, history=history,
                tags={tracking.TAG_STATE: "COMPLETE", tracking.RUN_NAME: f"{name}: {val_accuracy:.4f}",
                      **({tracking.TAG_MODEL_URI: model_uri} if model_uri else {})},
            )
    if pruned is not None:
        raise pruned
    return TrialOutcome(
        run_id=run_id,
        val_accuracy=val_accuracy,
        train_accuracy=fit.history[-1].get("train_accuracy", float("nan")) if fit.history else float("nan"),
        test_accuracy=test_accuracy,
        n_params=n_params,
        epochs=len(fit.history),
        fit_seconds=fit_seconds,
        evaluate_seconds=evaluate_seconds,
        seconds=time.perf_counter() - started,
        model_uri=model_uri,
        predict_ms=predict_ms,
        report_seconds=reporting[0],
    )


def write_model(family: Any, model: Any, inputs: Splits, model_uri: str) -> None:
    """Write a model :func:`models.start_model` began (in a :class:`Backlog`'s thread)."""
    tracking.wait_model_logging()
    try:
        family.log_model(model, inputs, "model", model_id=models.model_id_of(model_uri))
    except BaseException:
        models.fail_model(model_uri)
        raise
