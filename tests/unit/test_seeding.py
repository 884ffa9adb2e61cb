"""A study's trial N is proposed from the seed and N, whichever worker asks (mlops_tune.search.seeding)."""

from __future__ import annotations

from collections.abc import Callable

import optuna
import pytest

from mlops_tune.search.mutate import MutationSampler
from mlops_tune.search.optuna_setup import make_sampler
from tests.unit.test_search import _space

N_TRIALS = 9  # past TPE's 5 start-up trials


def _objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -3, 3)
    units = trial.suggest_int("units", 4, 256, log=True)
    act = trial.suggest_categorical("act", ["relu", "tanh", "elu"])
    return -(x - 1) ** 2 - abs(units - 64) / 64 + (0.5 if act == "tanh" else 0.0)


def _run(new_sampler: Callable[[], optuna.samplers.BaseSampler], fresh_per_trial: bool, reseed: bool) -> list[dict]:
    """N_TRIALS trials of one study: one sampler throughout (a warm worker), or a new sampler for
    every trial (a worker per trial); ``reseed`` as a worker does when it joins the study."""
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    sampler = new_sampler()
    for _ in range(N_TRIALS):
        if fresh_per_trial:
            sampler = new_sampler()
        study = optuna.load_study(study_name="s", storage=storage, sampler=sampler)
        if reseed:
            sampler.reseed_rng()
        study.optimize(_objective, n_trials=1)
    return [t.params for t in study.trials]


@pytest.mark.parametrize("name", ["tpe", "random"])
def test_a_trial_is_proposed_alike_by_a_warm_worker_a_fresh_one_and_a_reseeded_one(name: str) -> None:
    space, _ = _space("knn")
    make = lambda: make_sampler({"sampler": name}, space, seed=7)  # noqa: E731
    warm = _run(make, fresh_per_trial=False, reseed=False)
    assert warm == _run(make, fresh_per_trial=True, reseed=True) == _run(make, fresh_per_trial=False, reseed=True)
    assert len({str(sorted(p.items())) for p in warm}) == N_TRIALS  # no two trials share a random stream
    other_seed = _run(lambda: make_sampler({"sampler": name}, space, seed=8), fresh_per_trial=False, reseed=False)
    assert other_seed != warm


def test_the_mutation_sampler_proposes_alike_wherever_it_runs() -> None:
    space, _ = _space("knn")

    def run(fresh: bool) -> list[dict]:
        storage = optuna.storages.InMemoryStorage()
        optuna.create_study(study_name="m", storage=storage, direction="maximize")
        sampler = MutationSampler(space, seed=3)
        for _ in range(8):
            if fresh:
                sampler = MutationSampler(space, seed=3)
                sampler.reseed_rng()
            study = optuna.load_study(study_name="m", storage=storage, sampler=sampler)
            if not study.trials:
                study.enqueue_trial(space.encode(space.base))
            sampler.propose(study)
            study.optimize(lambda t: 1.0 / space.suggest(t)["model.n_neighbors"], n_trials=1)
        return [t.params for t in study.trials]

    assert run(fresh=False) == run(fresh=True)
