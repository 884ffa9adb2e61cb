"""The objective a worker runs for each trial: train it through the runner, judge a failure
as the model's or the environment's, record what the study keeps of it."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlops_tune.records import claims, tracking
from mlops_tune.runners import TrialContext
from mlops_tune.runtime import faults, keys
from mlops_tune.runtime.errors import TrialFailed, first_line
from mlops_tune.runtime.secrets import redact_text
from mlops_tune.search import gate
from mlops_tune.show.progress import Progress
from mlops_tune.trial import TrialOutcome, trial_config
from mlops_tune.workers.plan import Plan

#: a confirmation run (gate.confirm): the number of the trial it retrains with another seed
TAG_CONFIRM_OF = "mlops_tune.confirm_of"


class Objective:
    """``objective(trial)``: the trial's validation accuracy, or ``TrialPruned`` / ``TrialFailed``
    (the model failed: charged); an environment fault or a stop gives the trial back and is raised."""

    def __init__(self, plan: Plan, context: TrialContext, budget: claims.Budget, progress: Progress) -> None:
        self.plan, self.context, self.budget, self.progress = plan, context, budget, progress

    def __call__(self, trial: optuna.Trial) -> float:
        plan = self.plan
        self.progress.trial_started(trial.number)
        ticket = self.budget.hand_over()
        if ticket:
            trial.set_user_attr(keys.TICKET, ticket)
        trial_cfg = trial_config(plan.space.apply(plan.cfg, plan.space.suggest(trial)))
        try:
            return self._train(trial, trial_cfg)
        except optuna.TrialPruned:
            done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if plan.n_jobs > 1 and gate.met(done, plan.gate):  # not the model's doing: say so
                trial.set_user_attr(keys.GATE_STOP, True)
            raise
        except KeyboardInterrupt as exc:
            give_back(trial, str(exc) or "interrupted", self.budget)
            raise
        except Exception as exc:
            fault = faults.classify(exc, tracking_uri=plan.tracking_uri, storage_url=plan.storage_url)
            if fault is not None:
                give_back(trial, str(fault), self.budget)
                raise fault from exc
            message = first_line(exc, 480) if str(exc).strip() else ""
            trial.set_user_attr(keys.ERROR, redact_text(f"{type(exc).__name__}: {message}")[:500])
            raise TrialFailed(message) from exc

    def _train(self, trial: optuna.Trial, trial_cfg: Mapping[str, Any]) -> float:
        """The trial through the runner, recorded, and confirmed over seeds where the gate asks."""
        plan = self.plan
        outcome = plan.runner.run(trial_cfg, trial, self.context, {**self.context.tags, **trial_tags(plan.name, trial)})
        record_outcome(trial, outcome)
        for key, value in gate.constraints(trial, plan.gate).items():
            trial.set_constraint(key, value)
        if gate.needs_confirmation(outcome.val_accuracy, gate.violations(trial, plan.gate), plan.gate):
            self.confirm(trial, trial_cfg, outcome)
        return outcome.val_accuracy

    def confirm(self, trial: optuna.Trial, trial_cfg: Mapping[str, Any], outcome: TrialOutcome) -> None:
        """``gate.confirm`` = K: retrain a trial that reached the threshold with K-1 more seeds on the
        same split, through the runner, where the trials run (each a child run tagged
        ``mlops_tune.confirm_of``); record every value, the mean and the spread on the trial and its
        run. Its Optuna value stays the first."""
        gate_cfg, values = self.plan.gate, [outcome.val_accuracy]
        for extra in range(1, int(gate_cfg["confirm"])):
            seed = int(trial_cfg["seed"]) + extra
            again = self.plan.runner.retrain({**trial_cfg, "seed": seed}, self.context,
                                             f"trial-{trial.number}-seed-{seed}",
                                             {**self.context.tags, tracking.TAG_STUDY: self.plan.name,
                                              TAG_CONFIRM_OF: str(trial.number)})
            values.append(again.val_accuracy)
        mean, spread = statistics.fmean(values), max(values) - min(values)
        trial.set_user_attr(keys.CONFIRM_VALUES, [round(v, 6) for v in values])
        trial.set_user_attr(keys.CONFIRMED_MEAN, mean)
        tracking.log_to(outcome.run_id, {"confirm_mean": mean, "confirm_spread": spread},
                        series={"seed_val_accuracy": values})
        verdict = "confirmed" if mean >= float(gate_cfg["threshold"]) else "NOT confirmed"
        print(f"[trial {trial.number:3d}] {verdict} over {len(values)} seeds: val_accuracy "
              f"{', '.join(f'{v:.4f}' for v in values)} (mean {mean:.4f}, spread {spread:.4f})", flush=True)


def record_outcome(trial: optuna.Trial, outcome: TrialOutcome) -> None:
    """What the study keeps of a trial that trained: its times, size, latency and its logged model."""
    trial.set_user_attr(keys.N_PARAMS, int(outcome.n_params))
    trial.set_user_attr(keys.PREDICT_MS, round(outcome.predict_ms, 4))
    trial.set_user_attr(keys.SECONDS, round(outcome.seconds, 3))
    trial.set_user_attr(keys.TIMES, {"fit": round(outcome.fit_seconds, 3),
                                     "evaluate": round(outcome.evaluate_seconds, 3),
                                     "report": round(outcome.report_seconds, 3)})
    if outcome.model_uri:
        trial.set_user_attr(keys.MODEL_URI, outcome.model_uri)


def give_back(trial: optuna.Trial, reason: str, budget: claims.Budget) -> None:
    """A trial that did not train: not charged, and queued to run again (best effort: the
    storage may be what failed; then the next start does it from the stale heartbeat)."""
    with contextlib.suppress(Exception):
        lineage = trial.user_attrs
        trial.set_user_attr(keys.NOT_CHARGED, redact_text(reason)[:500])
        budget.release_text(str(lineage.get(keys.TICKET, "")))
        retry = {k: v for k, v in lineage.items() if k in (keys.PARENT, keys.MUTATIONS)}
        trial.study.enqueue_trial(dict(trial.params), user_attrs={**retry, keys.RETRY_OF: trial.number},
                                  skip_if_exists=False)


def give_back_lost(study: optuna.Study, storage: Any, owners: tuple[str, ...], budget: claims.Budget,
                   reason: str) -> list[FrozenTrial]:
    """The trials that dead workers left RUNNING, found by their tickets (which name the worker
    that took them: ``owners`` are prefixes): given back (not charged, failed, queued to run
    again), or charged as failed when a worker had died running the same trial before (the
    trial's own doing: out of memory?). Their MLflow runs end KILLED. The tickets they took
    that no trial holds are given back too. Returns the trials as told."""
    import mlflow

    study_id = storage.get_study_id_from_name(study.study_name)
    told = []
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not str(frozen.user_attrs.get(keys.TICKET, "")).partition(" ")[2].startswith(owners):
            continue
        trial = optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number))
        if keys.RETRY_OF in frozen.user_attrs:
            trial.set_user_attr(keys.ERROR, "its worker died twice while running it (out of memory? see "
                                "runner.memory)")
        else:
            give_back(trial, reason, budget)
        run_id = frozen.user_attrs.get(keys.RUN)
        if run_id:
            with contextlib.suppress(Exception):
                client = mlflow.MlflowClient()
                client.set_tag(str(run_id), tracking.TAG_STATE, "FAIL")
                client.set_tag(str(run_id), tracking.TAG_ERROR, reason)
                client.set_terminated(str(run_id), "KILLED")
        told.append(study.tell(trial, state=TrialState.FAIL))
    # a ticket taken and held by no trial: the worker died (or its storage failed it) before its trial began
    held = {claims.ticket_id(str(t.user_attrs.get(keys.TICKET, ""))) for t in study.get_trials(deepcopy=False)}
    budget.tickets.give_back_unused(owners, {trial_id for trial_id in held if trial_id is not None})
    return told


def trial_tags(study_name: str, trial: optuna.Trial) -> dict[str, str]:
    """The child run's tags: the study, the trial number and its lineage (mutation sampler)."""
    lineage = trial.user_attrs
    tags = {tracking.TAG_STUDY: study_name, tracking.TAG_TRIAL_NUMBER: str(trial.number),
            tracking.TAG_PARENT_TRIAL: str(lineage.get(keys.PARENT, "")),
            tracking.TAG_MUTATIONS: str(lineage.get(keys.MUTATIONS, ""))}
    return {key: value for key, value in tags.items() if value}
