"""The accuracy gate, judged per trial: threshold, confirmation over seeds, deployment limits.

A trial **meets the gate** when it is COMPLETE, its value reaches ``gate.threshold``, it is
within ``gate.max_params`` and ``gate.max_predict_ms``, and, with ``gate.confirm`` = K > 1,
the mean validation accuracy over its K seeds reaches the threshold too. The trial's Optuna
value stays its first run's (so samplers compare like with like); the confirmation is its
own attribute.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlops_tune.runtime import keys


def limits(gate: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """The deployment limits set: ``(trial attribute, config key, limit)``."""
    return [(attr, f"gate.{key}", float(gate[key])) for attr, key in
            ((keys.N_PARAMS, "max_params"), (keys.PREDICT_MS, "max_predict_ms")) if gate.get(key) is not None]


def _number(value: float) -> str:
    return f"{value:,.0f}" if value.is_integer() else f"{value:.4g}"


def violations(trial: FrozenTrial, gate: Mapping[str, Any]) -> list[str]:
    """What ``trial`` breaks of the deployment limits, in words (``n_params 1,234 > gate.max_params 1,000``)."""
    broken = []
    for attr, key, limit in limits(gate):
        value = trial.user_attrs.get(attr)
        if value is not None and float(value) > limit:
            broken.append(f"{attr} {_number(float(value))} > {key} {_number(limit)}")
    return broken


def needs_confirmation(value: float, broken: Sequence[str], gate: Mapping[str, Any]) -> bool:
    return int(gate.get("confirm", 1)) > 1 and value >= float(gate["threshold"]) and not broken


def unconfirmed(trial: FrozenTrial, gate: Mapping[str, Any]) -> str:
    """Why a trial that reached the threshold is not confirmed ("" when it is, or needs none)."""
    if int(gate.get("confirm", 1)) <= 1:
        return ""
    mean = trial.user_attrs.get(keys.CONFIRMED_MEAN)
    if mean is None:
        return f"not confirmed over gate.confirm={gate['confirm']} seeds"
    if float(mean) < float(gate["threshold"]):
        return f"mean over {gate['confirm']} seeds {float(mean):.4f} < {gate['threshold']}"
    return ""


def meets(trial: FrozenTrial, gate: Mapping[str, Any]) -> bool:
    """Whether ``trial`` passes the gate (threshold, limits, confirmation)."""
    if trial.state != TrialState.COMPLETE or trial.value is None or trial.value < float(gate["threshold"]):
        return False
    return not violations(trial, gate) and not unconfirmed(trial, gate)


def feasible(gate: Mapping[str, Any]) -> Callable[[FrozenTrial], bool]:
    """A predicate: within the deployment limits (trials not yet measured count as within)."""
    return lambda trial: not violations(trial, gate)


def constraints(trial: Any, gate: Mapping[str, Any]) -> dict[str, float]:
    """Optuna constraint values of a measured trial (``trial.set_constraint``; <= 0 is within):
    TPE keeps infeasible trials out of the good group."""
    return {key: float(trial.user_attrs.get(attr, 0.0)) - limit for attr, key, limit in limits(gate)}


def missed_because(trials: Sequence[FrozenTrial], gate: Mapping[str, Any]) -> str:
    """Why the trials that reached the threshold did not pass, per constraint ("" when none reached it):
    ``2 trial(s) reached the threshold but broke gate.max_params (smallest n_params 12,345 > 10,000)``."""
    reached = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
               and t.value >= float(gate["threshold"])]
    if not reached:
        return ""
    parts = []
    for attr, key, limit in limits(gate):
        over = [float(t.user_attrs[attr]) for t in reached if float(t.user_attrs.get(attr, 0.0)) > limit]
        if over:
            parts.append(f"{len(over)} broke {key} (smallest {attr} {_number(min(over))} > {_number(limit)})")
    means = [float(t.user_attrs[keys.CONFIRMED_MEAN]) for t in reached
             if not violations(t, gate) and unconfirmed(t, gate) and keys.CONFIRMED_MEAN in t.user_attrs]
    if means:
        parts.append(f"{len(means)} did not confirm over gate.confirm={gate['confirm']} seeds "
                     f"(best mean {max(means):.4f} < {gate['threshold']})")
    return f"{len(reached)} trial(s) reached the threshold: " + "; ".join(parts) if parts else ""


def judged(trial: FrozenTrial) -> bool:
    """Whether ``trial`` really trained and was judged: it counts against ``study.n_trials``.

    COMPLETE and PRUNED trials were; a FAIL trial was only when its model failed (the error
    is recorded). A trial failed by a dead worker's stale heartbeat, a failing environment
    or a signal was not: its ticket goes back to the budget and it runs again.
    """
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and keys.ERROR in trial.user_attrs \
        and keys.NOT_CHARGED not in trial.user_attrs


def best_value(trials: Sequence[FrozenTrial], gate: Mapping[str, Any]) -> float:
    """The best validation accuracy of ``trials`` within the gate's deployment limits (-inf before any)."""
    return max((t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None
                and not violations(t, gate)), default=-math.inf)


def met(trials: Sequence[FrozenTrial], gate: Mapping[str, Any]) -> bool:
    """Whether any of ``trials`` meets the gate."""
    return any(meets(t, gate) for t in trials)


class GateAwarePruner(optuna.pruners.BasePruner):
    """``inner``, and once any trial of the study met the gate, every trial still running
    (in another worker) stops at its next epoch: its result can no longer change the outcome."""

    #: seconds between two looks at the study (one storage read), whatever the epochs' pace
    CHECK_EVERY = 1.0

    def __init__(self, inner: optuna.pruners.BasePruner, gate: Mapping[str, Any]) -> None:
        self.inner, self.gate = inner, gate
        self._checked, self._met = -math.inf, False

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if not self._met and time.monotonic() - self._checked >= self.CHECK_EVERY:
            done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            self._checked, self._met = time.monotonic(), met(done, self.gate)
        return self._met or self.inner.prune(study, trial)
