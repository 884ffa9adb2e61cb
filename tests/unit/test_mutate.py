"""mutate: success-based operator weights."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import IntDistribution
from optuna.trial import TrialState, create_trial

from mlops_tune.runtime import keys
from mlops_tune.search.mutate import operator_weights


def _trial(number: int, value: float | None, state: TrialState = TrialState.COMPLETE, **user_attrs: object):
    trial = create_trial(state=state, value=value, params={"k": 1}, distributions={"k": IntDistribution(1, 9)},
                         user_attrs=user_attrs)
    trial.number = number
    return trial


def test_weights_favour_operators_that_beat_their_parent() -> None:
    trials = [
        _trial(0, 0.5, **{keys.PARENT: keys.ROOT}),
        _trial(1, 0.7, **{keys.PARENT: 0, keys.MUTATIONS: "k:increase"}),     # win
        _trial(2, 0.4, **{keys.PARENT: 1, keys.MUTATIONS: "k:decrease"}),     # loss
        _trial(3, 0.6, **{keys.PARENT: 1, keys.MUTATIONS: "k:decrease,p:change"}),  # loss
        _trial(4, None, TrialState.PRUNED, **{keys.PARENT: 1, keys.MUTATIONS: "k:increase"}),  # tried, no win
        _trial(5, None, TrialState.RUNNING, **{keys.PARENT: 1, keys.MUTATIONS: "k:change"}),  # not judged yet
    ]
    weights = operator_weights(trials)
    assert weights["k:increase"] == pytest.approx((1 + 2 * 1) / (1 + 2))
    assert weights["k:decrease"] == pytest.approx(1 / 3)
    assert weights["p:change"] == pytest.approx(1 / 2)
    assert "k:change" not in weights  # untried operators keep the default weight 1


def test_no_mutations_no_weights() -> None:
    assert operator_weights([_trial(0, 0.9)]) == {}
    assert optuna.__version__  # the trials above are Optuna's own FrozenTrials
