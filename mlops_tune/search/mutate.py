"""The ``mutation`` sampler: the original "change the model and retrain" loop, done properly.

Each new trial starts from the best completed trial so far (the base model until one
completes) and applies one or two mutation operators of the search space (widen or
narrow a layer, add or remove a layer, change k, switch the scaler, ...). The child is
proposed with Optuna's public ``study.enqueue_trial`` (as the base model is), its parent
trial and operators as user attributes (``parent_trial``, ``mutations``), so every child
run can say where it came from. Anything not proposed is sampled at random.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import FrozenTrial, TrialState

from mlops_tune.runtime import keys
from mlops_tune.search.seeding import TrialSeeded, trial_seed
from mlops_tune.search.space import SearchSpace


class MutationSampler(BaseSampler):
    """Mutate the best trial so far; fall back to random sampling for anything unplanned.

    Operators that improved on their parent earlier in the study are chosen more often
    (see :func:`operator_weights`). The study calls :meth:`propose` before each trial.

    Args:
        space: the study's search space (its ``base`` is the starting point).
        seed: seeds operator choice and the fallback sampler.
        max_tries: attempts to find a child that no earlier trial has tried.
        feasible: whether a trial is within the gate's deployment limits; the parent is the best
            feasible trial (the best of all when none is).
    """

    def __init__(self, space: SearchSpace, seed: int | None = None, max_tries: int = 20,
                 feasible: Callable[[FrozenTrial], bool] = lambda trial: True) -> None:
        self._space = space
        self._feasible = feasible
        self._fallback = TrialSeeded(lambda s: RandomSampler(seed=s), seed)
        self._seed = self._fallback.seed
        self._max_tries = max_tries

    def reseed_rng(self) -> None:
        """Nothing to do: the choices for a study's N-th trial depend on the seed and N alone
        (:mod:`mlops_tune.search.seeding`), whichever worker makes them."""

    def propose(self, study: optuna.Study) -> None:
        """Enqueue the next child (unless a trial is already waiting to run)."""
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return
        rng = random.Random(trial_seed(self._seed, len(trials)))
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        parent = max(done, key=lambda t: (self._feasible(t), t.value or 0.0), default=None)
        point = self._space.decode(parent.params) if parent else dict(self._space.base)
        tried = {_key(t.params) for t in trials}
        weights = operator_weights(trials)
        params: dict[str, Any] = {}
        ops: list[str] = []
        for _ in range(self._max_tries):
            child, ops = self._space.mutate(point, rng, n_ops=rng.choice((1, 2)), weights=weights)
            params = self._space.encode(child)
            if ops and _key(params) not in tried:
                break
        if not ops:  # nothing to mutate: the fallback samples the trial
            return
        study.enqueue_trial(params, user_attrs={keys.PARENT: parent.number if parent else keys.BASE,
                                                keys.MUTATIONS: ",".join(ops)}, skip_if_exists=False)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._fallback.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._fallback.after_trial(study, trial, state, values)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)


def _key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def operator_weights(trials: list[FrozenTrial]) -> dict[str, float]:
    """Weight of each ``key:operator`` from its record in this study (success-based selection).

    A mutation succeeded when its child beat its parent. Weight = (1 + 2 successes) / (1 + tries):
    an untried operator weighs 1, one that keeps failing fades, one that works is preferred.
    """
    values = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    tries: dict[str, int] = {}
    wins: dict[str, int] = {}
    for t in trials:
        ops = t.user_attrs.get(keys.MUTATIONS)
        parent = t.user_attrs.get(keys.PARENT)
        if not ops or not isinstance(parent, int) or t.state not in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                         TrialState.FAIL):
            continue
        better = t.number in values and parent in values and values[t.number] > values[parent]
        for op in ops.split(","):
            tries[op] = tries.get(op, 0) + 1
            wins[op] = wins.get(op, 0) + int(better)
    return {op: (1 + 2 * wins[op]) / (1 + tries[op]) for op in tries}
