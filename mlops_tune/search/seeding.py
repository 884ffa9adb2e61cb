"""Proposals that depend on the seed and the trial's number, not on which worker asks.

Every worker of a study (the study's own process, a helper process, a container, a Project
run) builds its own sampler from the same ``seed``. Seeded alike and used as they are, two
workers would propose the same points; reseeded at random, the same study would propose
different trials depending on where they ran. :class:`TrialSeeded` does neither: it makes
the sampler afresh for each trial, seeded with :func:`trial_seed` of the seed and the trial's
number. Trial N of a study is proposed alike in-process, in a warm container or in a process
of its own, and two workers never share a random stream (their trials' numbers differ).
What a sampler learns from earlier trials it reads from the study, as Optuna's samplers do.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number`` in a study seeded with ``seed`` (32 bits, as NumPy wants)."""
    return random.Random(f"{seed}/{number}").getrandbits(32)


class TrialSeeded(BaseSampler):
    """``make(trial_seed(seed, trial.number))`` samples trial ``trial.number``.

    Example::

        sampler = TrialSeeded(lambda s: optuna.samplers.RandomSampler(seed=s), seed=42)
    """

    def __init__(self, make: Callable[[int], BaseSampler], seed: int | None) -> None:
        self._make = make
        self._seed = random.getrandbits(32) if seed is None else int(seed)
        self._by_trial: dict[int, BaseSampler] = {}
        self._lock = threading.Lock()

    @property
    def seed(self) -> int:
        return self._seed

    def sampler_for(self, number: int) -> BaseSampler:
        with self._lock:
            sampler = self._by_trial.get(number)
            if sampler is None:
                sampler = self._by_trial[number] = self._make(trial_seed(self._seed, number))
            return sampler

    def reseed_rng(self) -> None:
        """Nothing to do: no two trials share a random stream (see the module's docstring)."""

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.sampler_for(trial.number).before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.sampler_for(trial.number).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.sampler_for(trial.number).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.sampler_for(trial.number).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        sampler = self.sampler_for(trial.number)
        with self._lock:
            self._by_trial.pop(trial.number, None)
        sampler.after_trial(study, trial, state, values)
