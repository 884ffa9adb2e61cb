"""Search spaces relative to the base model, and the mutation sampler."""

from __future__ import annotations

import random

import optuna
import pytest
import yaml

from mlops_tune.config.cli import CONF_DIR
from mlops_tune.runtime.errors import UsageError
from mlops_tune.runtime.keys import BASE, MUTATIONS, PARENT
from mlops_tune.search.mutate import MutationSampler
from mlops_tune.search.space import SearchSpace


def _model(name: str) -> dict:
    return yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())


def _space(name: str) -> tuple[SearchSpace, dict]:
    cfg = {"model": _model(name), "data": {"name": "digits"}}
    spec = yaml.safe_load((CONF_DIR / "search" / f"{name}.yaml").read_text())["space"]
    return SearchSpace.from_config(spec, cfg), cfg


@pytest.mark.parametrize("name", ["ann", "cnn", "knn", "random_forest", "logreg"])
def test_every_shipped_space_contains_its_base_model(name: str) -> None:
    space, cfg = _space(name)
    params = space.encode(space.base)
    assert space.decode(params) == space.base
    assert space.apply(cfg, space.base) == cfg


def test_list_entries_exist_only_when_the_list_is_that_long() -> None:
    space, _ = _space("ann")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    lengths = set()
    for _ in range(30):
        trial = study.ask()
        point = space.suggest(trial)
        n = trial.params["hidden_units_len"]
        lengths.add(n)
        assert point["model.hidden_units"] == [trial.params[f"hidden_units_{i}"] for i in range(n)]
        assert f"hidden_units_{n}" not in trial.params  # no phantom layer sizes
        assert all(4 <= u <= 256 for u in point["model.hidden_units"])
        study.tell(trial, 0.5)
    assert lengths == {1, 2, 3}  # base has 1 layer; extra_length 2


def test_bounds_grow_to_include_the_base_value() -> None:
    cfg = {"model": {"n_neighbors": 50, "scaler": "robust"}}
    space = SearchSpace.from_config({
        "model.n_neighbors": {"type": "int", "low": 1, "high": 30},
        "model.scaler": {"type": "categorical", "choices": [None, "standard"]},
    }, cfg)
    [k, scaler] = space.dimensions
    assert k.high == 50 and "robust" in scaler.choices


def test_bad_spaces_are_usage_errors() -> None:
    cfg = {"model": {"name": "x", "n_neighbors": 1}}
    with pytest.raises(UsageError, match=r"no key 'model\.k'"):
        SearchSpace.from_config({"model.k": {"type": "int", "low": 1, "high": 3}}, cfg)
    with pytest.raises(UsageError, match="type"):
        SearchSpace.from_config({"model.n_neighbors": {"type": "integer"}}, cfg)
    with pytest.raises(UsageError, match="no search space"):
        SearchSpace.from_config(None, cfg)


@pytest.mark.parametrize("name", ["ann", "cnn", "knn"])
def test_mutations_stay_inside_the_space(name: str) -> None:
    space, _ = _space(name)
    rng = random.Random(0)
    point = dict(space.base)
    seen_ops = set()
    for _ in range(200):
        child, ops = space.mutate(point, rng, n_ops=rng.choice((1, 2)))
        assert 1 <= len(ops) <= 2 and child != point
        seen_ops.update(op.split(":")[1] for op in ops)
        for dim in space.dimensions:
            value = child[dim.key]
            if dim.type == "int_list":
                assert dim.min_length <= len(value) <= dim.max_length
                assert all(dim.low <= v <= dim.high for v in value)
            elif dim.type == "categorical":
                assert value in dim.choices
            else:
                assert dim.low <= value <= dim.high
        point = child
    if name == "ann":
        assert {"widen_layer", "narrow_layer", "add_layer", "remove_layer"} <= seen_ops


def test_mutation_sampler_mutates_the_best_trial_and_records_lineage() -> None:
    space, _ = _space("knn")
    sampler = MutationSampler(space, seed=1)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial(space.encode(space.base))

    def objective(trial: optuna.Trial) -> float:
        point = space.suggest(trial)
        return 1.0 / point["model.n_neighbors"] + (0.1 if point["model.scaler"] is None else 0.0)

    for _ in range(12):  # as the study does: the sampler proposes (enqueues) each child, then it runs
        sampler.propose(study)
        study.optimize(objective, n_trials=1)
    trials = study.trials
    assert trials[0].params == space.encode(space.base)
    assert PARENT not in trials[0].user_attrs or trials[0].user_attrs[PARENT] != BASE
    for trial in trials[1:]:
        parent = trial.user_attrs[PARENT]
        assert isinstance(parent, int) and parent < trial.number
        ops = trial.user_attrs[MUTATIONS].split(",")
        assert 1 <= len(ops) <= 2
        # the child differs from its parent exactly in the mutated dimensions
        parent_point = space.decode(trials[parent].params)
        child_point = space.decode(trial.params)
        changed = {key for key in child_point if child_point[key] != parent_point[key]}
        assert changed <= {op.split(":")[0] for op in ops} and changed
        # the parent was the best completed trial when the child started
        best_before = max((t for t in trials[:trial.number] if t.value is not None), key=lambda t: t.value)
        assert trials[parent].value == best_before.value
    assert len({tuple(sorted(t.params.items(), key=str)) for t in trials}) == len(trials)  # no repeats


def test_widest_widens_every_layer_list_to_its_top_and_nothing_else() -> None:
    space, _ = _space("cnn")  # base: conv_filters [32, 32] (top 128), hidden_units [8] (top 256)
    point, ops = space.widest(space.base)
    assert point["model.conv_filters"] == [128, 128] and point["model.hidden_units"] == [256]
    assert ops == ["model.conv_filters:widest", "model.hidden_units:widest"]
    assert {k: v for k, v in point.items() if not k.endswith(("filters", "units"))} == \
        {k: v for k, v in space.base.items() if not k.endswith(("filters", "units"))}
    assert space.decode(space.encode(point)) == point  # a point of the space: Optuna can enqueue it
    # a layer already wider than the top (a champion outside the space) is kept
    wider = {**space.base, "model.conv_filters": [512, 16]}
    assert space.including(wider).widest(wider)[0]["model.conv_filters"] == [512, 512]
    # at the top already, or no layer list to widen: no probe
    assert space.widest(point) is None
    knn, _ = _space("knn")
    assert knn.widest(knn.base) is None
