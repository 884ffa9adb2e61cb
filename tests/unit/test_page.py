"""report.html from any mix of trials: every section drawn, the lineage a tree, nothing fetched."""

from __future__ import annotations

import json
import re

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.trial import TrialState

from mlops_tune.config import to_plain
from mlops_tune.runtime import keys
from mlops_tune.search.space import SearchSpace
from mlops_tune.show import page, svg
from tests.conftest import compose_config

CFG = to_plain(compose_config("tune", "model=ann", "data=digits"))
SPACE = SearchSpace.from_config(CFG["search"]["space"], CFG)
SECTIONS = ("verdict", "history", "epochs", "lineage", "parallel", "table")

# one trial: (state, value, parent choice: -1 the sampler, -2 "base", k >= 0 an earlier trial)
trial_specs = st.lists(
    st.tuples(st.sampled_from(["COMPLETE", "COMPLETE", "PRUNED", "FAIL"]),
              st.floats(0.0, 1.0, allow_nan=False), st.integers(-2, 30), st.integers(0, 6)),
    min_size=1, max_size=12)


def make_study(specs: list[tuple[str, float, int, int]]) -> tuple[optuna.Study, dict[int, list[float]]]:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize", study_name="made",
                                sampler=optuna.samplers.RandomSampler(seed=1))
    histories = {}
    for number, (state, value, parent, epochs) in enumerate(specs):
        trial = study.ask()
        SPACE.suggest(trial)
        if number == 0:
            trial.set_user_attr(keys.PARENT, keys.ROOT)
        elif parent == -2:
            trial.set_user_attr(keys.PARENT, keys.BASE)
            trial.set_user_attr(keys.MUTATIONS, "model.dropout:increase")
        elif parent >= 0:
            trial.set_user_attr(keys.PARENT, parent % number)
            trial.set_user_attr(keys.MUTATIONS, "model.hidden_units:widen_layer,model.learning_rate:decrease")
        if state == "PRUNED":
            trial.report(value, 0)
            study.tell(trial, state=TrialState.PRUNED)
        elif state == "FAIL":
            trial.set_user_attr(keys.ERROR, "ValueError: <b>not html</b>")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)
        if epochs >= 2:
            histories[number] = [value * (i + 1) / epochs for i in range(epochs)]
    return study, histories


def build(specs: list[tuple[str, float, int, int]]) -> tuple[dict, str]:
    study, histories = make_study(specs)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best = max(done, key=lambda t: t.value) if done else None
    verdict = {"passed": bool(best and best.value >= 0.95), "best_trial": best.number if best else None,
               "best_value": best.value if best else None, "test_accuracy": None, "registered": None}
    links = {t.number: f"/#/experiments/1/runs/run{t.number}" for t in study.trials}
    data = page.report_data(study, SPACE, CFG, verdict, histories, links)
    return data, page.render(data)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trial_specs)
def test_any_study_renders_every_section_and_a_tree(specs: list[tuple[str, float, int, int]]) -> None:
    data, page = build(specs)
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    # the embedded data is the data drawn
    embedded = re.search(r'id="report-data">(.*?)</script>', page, re.S).group(1).replace("<\\/", "</")
    assert json.loads(embedded) == json.loads(json.dumps(data, default=str))
    # a tree: one edge into every trial but the root, from an earlier trial, no cycle
    tree = data["lineage"]
    assert tree["root"] == 0
    targets = [edge["to"] for edge in tree["edges"]]
    assert sorted(targets) == list(range(1, len(specs)))
    assert all(edge["from"] < edge["to"] for edge in tree["edges"])
    assert page.count('<g class="node') == len(specs)
    if data["verdict"]["best_trial"] is not None:
        assert tree["winner_path"][0] == 0 and tree["winner_path"][-1] == data["verdict"]["best_trial"]
    # nothing the browser would fetch; user text escaped
    assert not re.search(r"\b(src|href)=\"(?!/#/experiments/)", page)
    assert "<b>not html</b>" not in page


def test_edges_follow_the_recorded_parents() -> None:
    data, _ = build([("COMPLETE", 0.5, 0, 3), ("COMPLETE", 0.6, 0, 3), ("COMPLETE", 0.7, 1, 3),
                     ("PRUNED", 0.4, -2, 0), ("COMPLETE", 0.9, -1, 3)])
    edges = {e["to"]: (e["from"], e["label"]) for e in data["lineage"]["edges"]}
    assert edges[1][0] == 0 and edges[2][0] == 1  # mutated from trial 0, then from trial 1
    assert edges[3] == (0, "model.dropout:increase")  # "base": under the base model's trial
    assert edges[4] == (0, "sampled")  # proposed by the sampler, no parent
    assert data["lineage"]["winner_path"] == [0, 4]
    by_number = {t["number"]: t for t in data["trials"]}
    assert by_number[3]["value"] == pytest.approx(0.4)  # a pruned trial shows its last reported value
    assert isinstance(by_number[0]["params"]["hidden_units"], list)
    assert svg.readable([64, 32]) == "[64, 32]"
