"""What a study shows: a line per trial, a summary table, and its artifacts in MLflow."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from mlops_tune.runtime import keys
from mlops_tune.search import gate

if TYPE_CHECKING:
    import optuna

    from mlops_tune.search.space import SearchSpace


@dataclass(frozen=True)
class StudyResult:
    """How a study ended."""

    study_name: str
    gate_passed: bool
    best_value: float | None
    best_trial: int | None
    test_accuracy: float | None
    n_trials: int
    threshold: float
    parent_run_id: str
    registered_version: str | None = None
    champion: bool = False
    #: the best trial's config (model, data, seed, tracking), for ``mlops-train``
    best_config: dict[str, Any] | None = None
    #: every trial of the study as CSV (also logged to the parent run)
    trials_csv: str = ""
    #: the study report page (also logged to the parent run as report.html)
    report_html: str = ""
    #: why trials that reached the threshold did not pass (deployment limits, confirmation)
    gate_note: str = ""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def architecture(params: Mapping[str, Any]) -> str:
    """Compact ``key=value`` text of a trial's params, lists rebuilt (``hidden_units=[16,8]``)."""
    lists: dict[str, list[Any]] = {}
    parts = []
    for key, value in params.items():
        stem, _, index = key.rpartition("_")
        if key.endswith("_len"):
            continue
        if index.isdigit() and f"{stem}_len" in params:
            lists.setdefault(stem, []).append(value)
        else:
            parts.append(f"{key}={_fmt(value)}")
    return " ".join([f"{k}=[{','.join(map(str, v))}]" for k, v in lists.items()] + parts)


def _best(study: optuna.Study, done: Sequence[FrozenTrial] | None = None) -> float | None:
    if done is None:
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max((t.value for t in done if t.value is not None), default=None)


def study_header(name: str, cfg: Mapping[str, Any], space: SearchSpace, existing: int) -> None:
    resumed = f", resuming with {existing} trial(s) stored" if existing else ""
    print(
        f"study '{name}': model={cfg['model']['name']} data={cfg['data']['name']} "
        f"sampler={cfg['study']['sampler'] if isinstance(cfg['study']['sampler'], str) else 'custom'} "
        f"gate {cfg['gate']['metric']} >= {cfg['gate']['threshold']} within {cfg['study']['n_trials']} "
        f"trials{resumed}; {len(space.dimensions)} dimensions searched",
        flush=True,
    )


def trial_line(study: optuna.Study, trial: FrozenTrial, threshold: float, elapsed: float,
               gate_cfg: Mapping[str, Any] | None = None, done: Sequence[FrozenTrial] | None = None) -> None:
    """One progress line: number, state, accuracy, seconds, best so far (of ``done``, the study's
    complete trials, when the caller has them), architecture."""
    value = f"{trial.value:.4f}" if trial.value is not None else "  -   "
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        value = f"{trial.intermediate_values[step]:.4f}@{step}"
    best = _best(study, done)
    seconds = trial.user_attrs.get(keys.SECONDS)
    if seconds is None and trial.datetime_complete and trial.datetime_start:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    origin = ""
    if keys.MUTATIONS in trial.user_attrs and trial.user_attrs.get(keys.PARENT) == keys.BASE:
        origin = f"  <- the base model {trial.user_attrs[keys.MUTATIONS]}"  # the probe: no trial of its own
    elif keys.MUTATIONS in trial.user_attrs:
        origin = f"  <- #{trial.user_attrs.get(keys.PARENT)} {trial.user_attrs[keys.MUTATIONS]}"
    elif keys.START in trial.user_attrs:
        origin = f"  (start: the {trial.user_attrs[keys.START]})"
    elif trial.user_attrs.get(keys.PARENT) == keys.ROOT:
        origin = "  (base model)"
    error = ""
    if trial.state == TrialState.FAIL and keys.NOT_CHARGED in trial.user_attrs:
        error = f"  not charged to the budget: {trial.user_attrs[keys.NOT_CHARGED]}"
    elif trial.state == TrialState.FAIL and keys.ERROR in trial.user_attrs:
        error = f"  error: {trial.user_attrs[keys.ERROR]}"
    mark = ""
    if trial.state == TrialState.PRUNED and trial.user_attrs.get(keys.GATE_STOP):
        mark = "  (stopped: another trial met the gate)"
    elif trial.value is not None and trial.value >= threshold:
        broken = gate.violations(trial, gate_cfg or {})
        mark = f" (over the limits: {', '.join(broken)})" if broken else (
            "" if gate_cfg and not gate.meets(trial, gate_cfg) else " *gate*")
    print(
        f"[trial {trial.number:3d}] {trial.state.name:8s} val_accuracy={value:<8s} "
        f"best={(f'{best:.4f}' if best is not None else '-'):6s} {seconds or 0:6.1f}s "
        f"(elapsed {elapsed:5.0f}s)  {architecture(trial.params)}{origin}{mark}{error}",
        flush=True,
    )


#: the best trials the summary lists
TOP = 5


def summary(study: optuna.Study, result: StudyResult, budget: int | None = None) -> None:
    """A table of the best trials, what ended the study, and the gate's verdict (bold, green or
    red, on a terminal without ``NO_COLOR``)."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -(t.value or 0.0))
    if result.gate_passed:
        ended = f"the gate (trial {result.best_trial} met it)"
    elif budget is not None and result.n_trials >= budget:
        ended = f"the budget (study.n_trials={budget})"
    else:
        ended = "study.timeout or a stop before the budget"
    print(f"\nstudy '{result.study_name}': {len(trials)} trials "
          f"({', '.join(f'{n} {k.lower()}' for k, n in counts.items() if n)}); ended by {ended}", flush=True)
    if done:
        shown = "" if len(done) <= TOP else f" (the best {TOP} of {len(done)} complete trials)"
        print(f"  rank  trial  val_accuracy  architecture{shown}")
        for rank, t in enumerate(done[:TOP], 1):
            print(f"  {rank:4d}  {t.number:5d}  {t.value:12.4f}  {architecture(t.params)}")
    line = verdict_line(result)
    if _colour(sys.stdout):
        line = f"\x1b[1;{32 if result.gate_passed else 31}m{line}\x1b[0m"
    print(f"{line}; MLflow parent run {result.parent_run_id}", flush=True)


def _colour(stream: Any) -> bool:
    """Colour only on a terminal, and never with ``NO_COLOR`` set (https://no-color.org)."""
    try:
        return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


def headline(result: StudyResult) -> str:
    """The verdict in three words, for the parent run's name: ``PASSED 0.9861`` / ``MISSED 0.9722``."""
    best = f" {result.best_value:.4f}" if result.best_value is not None else " (no trial)"
    return f"{'PASSED' if result.gate_passed else 'MISSED'}{best}"


def verdict_line(result: StudyResult) -> str:
    """``gate PASSED: best val_accuracy 0.9778 (trial 1) vs threshold 0.95, test_accuracy 0.9722``."""
    verdict = "PASSED" if result.gate_passed else "MISSED"
    best = f"{result.best_value:.4f}" if result.best_value is not None else "none"
    test = f", test_accuracy {result.test_accuracy:.4f}" if result.test_accuracy is not None else ""
    note = f" - {result.gate_note}" if result.gate_note else ""
    return (f"gate {verdict}: best val_accuracy {best} (trial {result.best_trial}) vs threshold "
            f"{result.threshold:.4f}{test}{note}")


def log_study_artifacts(study: optuna.Study, best_config: Mapping[str, Any] | None,
                        metric: str = "val_accuracy", threshold: float = 1.0, folder: str = "") -> str:
    """Log the trials table (CSV), optimization history and parameter importance (PNG) and
    the best config (YAML) to the active run (in ``folder`` of its artifacts); return the CSV text."""
    import mlflow

    from mlops_tune.records import tracking

    frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs",
                                          "datetime_start", "datetime_complete", "duration"))
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    mlflow.log_text(buffer.getvalue(), _in(folder, "trials.csv"))
    if best_config is not None:
        tracking.log_config(best_config, _in(folder, "best_config.yaml"))
    _log_plots(study, metric, threshold, folder)
    return buffer.getvalue()


def _in(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _log_plots(study: optuna.Study, metric: str, threshold: float, folder: str = "") -> None:
    """optimization_history.png (labelled: metric, threshold, study, pruned trials) and,
    from :data:`MIN_TRIALS_FOR_IMPORTANCE` complete trials on, param_importances.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = [("optimization_history.png", _history_figure)]
    if len(done) >= MIN_TRIALS_FOR_IMPORTANCE and len({tuple(sorted(t.params.items())) for t in done}) >= 2:
        plots.append(("param_importances.png", _importance_figure))
    for name, plot in plots:
        with contextlib.suppress(Exception):  # a plot is a convenience, never a reason to fail
            figure = plot(plt, study, metric, threshold)
            figure.tight_layout()
            mlflow.log_figure(figure, _in(folder, name))
            plt.close(figure)


#: parameter importances from fewer complete trials are noise (Optuna warns below 2 per regime)
MIN_TRIALS_FOR_IMPORTANCE = 10


def _history_figure(plt: Any, study: optuna.Study, metric: str, threshold: float) -> Any:
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(8, 5))
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    axes.scatter([t.number for t in done], [t.value for t in done], label="complete", zorder=3)
    axes.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                 marker="s", facecolors="none", edgecolors="tab:orange", label="pruned (last epoch)", zorder=3)
    best, xs, ys = float("-inf"), [], []
    for t in sorted(trials, key=lambda t: t.number):
        if t in done and (t.value or 0) > best:
            best = t.value or 0.0
        if best > float("-inf"):
            xs.append(t.number)
            ys.append(best)
    axes.step(xs, ys, where="post", color="tab:green", label="best so far")
    axes.axhline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("trial")
    axes.set_ylabel(metric)
    axes.set_title(f"study {study.study_name}: {metric} per trial")
    axes.legend(loc="lower right")
    return figure


def _importance_figure(plt: Any, study: optuna.Study, metric: str, threshold: float) -> Any:
    import optuna

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    importances = optuna.importance.get_param_importances(study)
    names = [readable_param(name) for name in importances][::-1]
    figure, axes = plt.subplots(figsize=(8, 5))
    axes.barh(names, list(importances.values())[::-1])
    axes.set_xlabel(f"importance for {metric} (Optuna's default evaluator, {len(done)} complete trials)")
    axes.set_title(f"study {study.study_name}: what moved {metric}")
    return figure


def readable_param(name: str) -> str:
    """``hidden_units_len`` -> ``hidden_units (layers)``, ``hidden_units_0`` -> ``hidden_units[0]``."""
    stem, _, index = name.rpartition("_")
    if index == "len":
        return f"{stem} (layers)"
    if index.isdigit() and stem:
        return f"{stem}[{index}]"
    return name


#: where ``mlflow ui`` (``make ui``) serves a local tracking store by default
LOCAL_UI = "http://127.0.0.1:5000"


def ui_address(tracking_cfg: Mapping[str, Any]) -> str:
    """The MLflow UI that run links open: ``tracking.ui_url``, else the tracking server (without
    its credentials), else where ``mlflow ui`` serves a local store."""
    from urllib.parse import urlsplit, urlunsplit

    given = tracking_cfg.get("ui_url")
    uri = str(given or tracking_cfg.get("uri") or "")
    if not uri.startswith(("http://", "https://")):
        return LOCAL_UI
    parts = urlsplit(uri)
    name = f"[{parts.hostname}]" if ":" in str(parts.hostname) else str(parts.hostname)
    host = f"{name}:{parts.port}" if parts.port else name
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def log_study_page(study: optuna.Study, cfg: Mapping[str, Any], space: SearchSpace,
                   result: StudyResult, folder: str = "") -> str:
    """Build report.html (see :mod:`mlops_tune.show.page`), log it to the active (parent) run, return it."""
    import mlflow

    from mlops_tune.show import page

    client = mlflow.MlflowClient()
    experiment_id = mlflow.active_run().info.experiment_id if mlflow.active_run() else "0"
    ui = ui_address(cfg["tracking"])
    epochs = "epochs" in cfg["model"]  # a one-step fit (scikit-learn) has no curve to read
    histories, links = {}, {}
    for trial in study.get_trials(deepcopy=False):
        run_id = trial.user_attrs.get(keys.RUN)
        if not run_id:
            continue
        links[trial.number] = f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"
        if not epochs:
            continue
        with contextlib.suppress(Exception):  # a run deleted meanwhile: no curve
            per_step: dict[int, float] = {}
            # per epoch the first value of a step: the final evaluation is logged later at the last step
            for m in sorted(client.get_metric_history(str(run_id), "val_accuracy"), key=lambda m: m.timestamp):
                per_step.setdefault(m.step, m.value)
            if len(per_step) >= 2:  # a one-step fit (scikit-learn) has no curve
                histories[trial.number] = [per_step[step] for step in sorted(per_step)]
    registered = None
    if result.registered_version:
        registered = (f"registered as {cfg['registry']['name']} version {result.registered_version}"
                      f"{' (champion)' if result.champion else ''}")
    verdict = {"passed": result.gate_passed, "best_trial": result.best_trial, "best_value": result.best_value,
               "test_accuracy": result.test_accuracy, "registered": registered}
    try:
        html = page.render(page.report_data(study, space, cfg, verdict, histories, links))
    except Exception as exc:  # a page is a convenience: never a reason to fail a study that ran
        print(f"study report: not written ({type(exc).__name__}: {exc}; please report this bug)", flush=True)
        return ""
    mlflow.log_text(html, _in(folder, "report.html"))
    return html
