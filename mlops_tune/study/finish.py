"""The end of a study: the best trial judged on the test split, the study's artifacts and
verdict, and the promotion (exactly one per study, by claim)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlops_tune.data import Splits
from mlops_tune.families import get_family
from mlops_tune.records import claims, models, registry, tracking
from mlops_tune.runtime import faults, keys
from mlops_tune.runtime.errors import StudyAborted
from mlops_tune.search import gate
from mlops_tune.search.gate import judged
from mlops_tune.search.space import SearchSpace
from mlops_tune.show import report
from mlops_tune.show.report import StudyResult
from mlops_tune.study.runs import describe_study_run
from mlops_tune.trial import run_trial, trial_config

#: the child run that trained a trial's model again (its files were never written): the trial's number
TAG_REBUILD_OF = "mlops_tune.rebuild_of"


def finish(study: optuna.Study, cfg: Mapping[str, Any], space: SearchSpace, family: Any, splits: Splits,
           parent_run_id: str, budget: claims.Budget, worker: str) -> StudyResult:
    """The end of a study: the best trial judged on the test split, artifacts, verdict, promotion."""
    trials = study.get_trials(deepcopy=False)
    n_judged = sum(judged(t) for t in trials)
    if n_judged == 0:  # a verdict (exit 1: the gate missed) needs a budget that trained
        timeout = cfg["study"]["timeout"]
        why = f" (study.timeout={timeout} s ended the study before its first trial did; raise it)" if timeout else ""
        raise StudyAborted(f"study '{study.study_name}': no trial trained{why}: no verdict")
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    passing = [t for t in done if gate.meets(t, cfg["gate"])]
    feasible = [t for t in done if not gate.violations(t, cfg["gate"])]
    best = max(passing or feasible or done, key=lambda t: t.value or 0.0, default=None)
    threshold = float(cfg["gate"]["threshold"])
    passed = bool(passing)
    metrics: dict[str, float] = {"n_trials": float(n_judged)}
    best_cfg = test_accuracy = model_uri = None
    if best is not None:
        best_cfg = trial_config(space.apply(cfg, space.decode(best.params)))
        model_uri = best.user_attrs.get(keys.MODEL_URI)
        metrics["best_val_accuracy"] = float(best.value or 0.0)
        if model_uri and not models.model_ready(model_uri, grace=float(cfg["study"]["grace_period"])):
            if passed:  # the gate's winner must exist: trained again from its config and seed
                model_uri, test_accuracy = rebuild(best, best_cfg, splits, parent_run_id, study.study_name)
            else:
                print(f"study '{study.study_name}': the model of trial {best.number} is not in the tracking store "
                      f"({model_uri}: never written, or gone with a replaced store); it is not judged on the test "
                      "split", flush=True)
                model_uri = None
        if model_uri and test_accuracy is None:
            inputs = splits.as_input(family.input_kind)
            test_accuracy = family.accuracy(family.load_model(model_uri), inputs.x_test, inputs.y_test)
        if test_accuracy is not None:
            metrics["test_accuracy"] = test_accuracy
    verdict, folder = "passed" if passed else "missed", verdict_folder(study, cfg["gate"])
    verdict_tag = {TAG_REJUDGED: f"{folder.removeprefix('rejudged/')}: {verdict}"} if folder else {}
    tracking.log_batch(metrics=metrics, tags={
        **(verdict_tag or {tracking.TAG_GATE: verdict}),
        **({"mlops_tune.best_trial": str(best.number)} if best else {}),
    })
    result = StudyResult(
        study_name=study.study_name, gate_passed=passed, best_value=best.value if best else None,
        best_trial=best.number if best else None, test_accuracy=test_accuracy, n_trials=n_judged,
        threshold=threshold, parent_run_id=parent_run_id, best_config=best_cfg,
        gate_note="" if passed else gate.missed_because(done, cfg["gate"]),
        trials_csv=report.log_study_artifacts(study, best_cfg, str(cfg["gate"]["metric"]), threshold, folder),
    )
    if passed and cfg["registry"]["promote"] and best is not None:
        result = _promote(best, model_uri, result, cfg, budget, worker, splits)
    result = replace(result, report_html=report.log_study_page(study, cfg, space, result, folder))
    describe_study_run(study.study_name, report.verdict_line(result),
                       str(best.user_attrs.get(keys.RUN, "")) if best else "", report.headline(result))
    report.summary(study, result, int(cfg["study"]["n_trials"]))
    return result


#: the parent run's tag of a verdict given with another gate than the study's first one
TAG_REJUDGED = "mlops_tune.rejudged"
#: the gate keys that judge the trials (a change is a new verdict on the same study, not a new study)
VERDICT_KEYS = ("threshold", "confirm", "max_params", "max_predict_ms")


def verdict_folder(study: optuna.Study, gate_cfg: Mapping[str, Any]) -> str:
    """Where this verdict's artifacts go in the study's run: "" (its top) for the study's first
    gate; ``rejudged/gate.threshold=0.9`` for another one, so that a re-judgement never
    replaces the first verdict's report, trials table and best config (its tag ``mlops_tune.gate``
    and params stay those of the first)."""
    now = {key: gate_cfg.get(key) for key in VERDICT_KEYS}
    first = study.user_attrs.get(keys.JUDGED_GATE)
    if first is None:
        study.set_user_attr(keys.JUDGED_GATE, now)
        return ""
    changed = [key for key in VERDICT_KEYS if first.get(key) != now[key]]
    if not changed:
        return ""
    folder = "rejudged/" + "_".join(f"gate.{key}={now[key]}" for key in changed)
    print(f"study '{study.study_name}': judged again with another gate ("
          + ", ".join(f"gate.{key} {first.get(key)} -> {now[key]}" for key in changed)
          + f"): this verdict is logged under {folder}/ of the study's run; the first verdict's stays", flush=True)
    return folder


def rebuild(best: FrozenTrial, best_cfg: dict[str, Any], splits: Splits, parent_run_id: str,
            study_name: str) -> tuple[str | None, float | None]:
    """The model of the gate's winner, whose files were never written (its process was killed
    before its background writes ended): trained again, in this process, from the trial's
    config and seed, as a child run tagged ``mlops_tune.rebuild_of``; found, not trained again,
    on the next run. Returns its URI and test accuracy (None: judge the model found)."""
    experiment_id = tracking.experiment_of(parent_run_id)
    found = tracking.finished_child(experiment_id, parent_run_id, TAG_REBUILD_OF, str(best.number))
    if found is not None and found.data.tags.get(tracking.TAG_MODEL_URI):
        return found.data.tags[tracking.TAG_MODEL_URI], None
    print(f"study '{study_name}': the model of trial {best.number} is not in the tracking store (its process was "
          "stopped before writing it, or the store was replaced); training it again from the trial's config and "
          "seed ...", flush=True)
    outcome = run_trial(best_cfg, experiment_id=experiment_id, splits=splits,
                        parent_run_id=parent_run_id, run_name=f"trial-{best.number}-model",
                        tags={tracking.TAG_STUDY: study_name, TAG_REBUILD_OF: str(best.number)})
    print(f"study '{study_name}': trial {best.number} trained again: val_accuracy {outcome.val_accuracy:.4f} "
          f"(first {best.value or 0.0:.4f})", flush=True)
    return outcome.model_uri, outcome.test_accuracy


def _promote(best: FrozenTrial, model_uri: str | None, result: StudyResult, cfg: Mapping[str, Any],
             budget: claims.Budget, worker: str, splits: Splits) -> StudyResult:
    """Exactly one promotion per study, however many workers finish at once, and every step of it
    redone by the next run when a process is killed in the middle (see :func:`_take_promotion`)."""
    name = str(cfg["registry"]["name"])
    mine, version = _take_promotion(name, budget, worker, float(cfg["study"]["grace_period"]))
    if not mine:
        decision = str(version.tags.get(registry.DECISION, registry.CHAMPION_ALIAS))
        print(f"registry: the study's model was already promoted: {name} version {version.version} "
              f"({'the' if decision == registry.CHAMPION_ALIAS else 'not'} '{registry.CHAMPION_ALIAS}')",
              flush=True)
        return replace(result, registered_version=str(version.version),
                       champion=decision == registry.CHAMPION_ALIAS)
    if not model_uri or result.test_accuracy is None:
        print("registry: the best trial logged no model; nothing registered", flush=True)
        budget.release("promotion", worker)
        return result
    try:
        version, champion, previous = registry.promote(model_uri, name, result.test_accuracy, {
            "study": result.study_name, registry.STUDY_KEY: budget.key, "trial": str(best.number),
            "val_accuracy": f"{best.value:.6f}"}, judge=lambda version: judge_on(version, splits), existing=version)
    except BaseException:  # a failed promotion must not use up the study's claim
        budget.release("promotion", worker)
        raise
    if previous is not None:  # both figures on the same test split, on the study's run
        tracking.log_batch(metrics={"previous_champion_test_accuracy": previous})
    return replace(result, registered_version=version, champion=champion)


def _take_promotion(name: str, budget: claims.Budget, worker: str, grace: float) -> tuple[bool, Any]:
    """Whether this worker promotes the study's model now, and the version the study registered
    (None: none yet). The promotion is the claim's holder's; once its decision is recorded on
    the version (``registry.decided``) it is done. A holder that records no decision within
    ``grace`` seconds (``study.grace_period``) was killed in the middle: its claim is taken over
    and its steps are redone, reusing the version it registered."""
    deadline, said = time.monotonic() + grace, False
    holder = budget.claim("promotion", worker)
    while True:
        version = registry.study_version(name, budget.key)
        if registry.decided(version):
            return False, version
        if holder == worker:
            return True, version
        if time.monotonic() >= deadline:
            holder = budget.take_over("promotion", holder, worker)
            deadline = time.monotonic() + grace  # another taker won: theirs for a grace period
            continue
        if not said:
            print(f"registry: another process began the study's promotion and has not finished it; waiting up "
                  f"to {grace:g} s (study.grace_period) before taking it over", flush=True)
            said = True
        time.sleep(min(0.5, grace))
        holder = budget.claim("promotion", worker)


def judge_on(version: Any, splits: Splits) -> float:
    """A registered model version's accuracy on this study's test split (its family from its run).

    Raises:
        EnvironmentFault: the store failed while loading it (not a reason to replace it).
    """
    import mlflow

    try:
        return _accuracy_of_version(version, splits)
    except Exception as exc:
        fault = faults.classify(exc, tracking_uri=mlflow.get_tracking_uri())
        if fault is not None:
            raise fault from exc
        raise


def _accuracy_of_version(version: Any, splits: Splits) -> float:
    import mlflow

    family_name = mlflow.MlflowClient().get_run(version.run_id).data.tags.get(tracking.TAG_FAMILY) if version.run_id \
        else None
    family = get_family(family_name) if family_name else None
    if family is None:
        raise ValueError("its run records no model family")
    inputs = splits.as_input(family.input_kind)
    return family.accuracy(family.load_model(f"models:/{version.name}/{version.version}"), inputs.x_test,
                           inputs.y_test)
