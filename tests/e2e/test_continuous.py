"""The loop a team runs build after build: data-aware studies, starting from the champion, the
champion judged on today's test split, confirmed wins and deployment limits (real MLflow, real
registry, real Optuna storage; the commands as processes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from mlops_tune.records import claims, tracking
from mlops_tune.runtime import keys
from tests.conftest import mlflow_client, mlflow_runs, run_command


def studies(folder: Path) -> dict[str, optuna.Study]:
    """The studies of the storage, without their trial tickets' companions (``NAME#ID#tickets``,
    one per study that ran a trial: checked here)."""
    storage = f"sqlite:///{folder / 'optuna.db'}"
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    companions = {name for name in names if name.endswith(claims.TICKETS)}
    studies = names - companions
    assert {name.split("#", 1)[0] for name in companions} <= studies, companions
    return {name: optuna.load_study(study_name=name, storage=storage) for name in studies}


def parents(folder: Path) -> list:
    return [r for r in mlflow_runs(folder) if tracking.TAG_GATE in r.data.tags]


def write_csv(path: Path, n: int, seed: int, concept: str = "x0", noise: float = 0.0) -> None:
    """Two informative features; the label follows ``concept`` (x0 > 0 or x1 > 0)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (x[:, 0 if concept == "x0" else 1] > 0).astype(int)
    flip = rng.random(n) < noise
    y[flip] = 1 - y[flip]
    pd.DataFrame({"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2], "label": y}).to_csv(path, index=False)


CSV = ("model=knn", "data=csv", "data.path=data.csv", "data.target=label")


def test_changed_data_starts_a_new_study_and_unchanged_data_resumes(workdir: Path) -> None:
    write_csv(workdir / "data.csv", 200, seed=1)
    first = run_command("mlops-tune", *CSV, "study.n_trials=2", "gate.threshold=0.999", cwd=workdir)
    assert first.code in (0, 1), first.stderr
    write_csv(workdir / "data.csv", 200, seed=2)  # same path, new rows
    second = run_command("mlops-tune", *CSV, "study.n_trials=2", "gate.threshold=0.999", cwd=workdir)
    assert second.code in (0, 1), second.stderr
    assert "the data changed since it ran" in second.stdout
    found = studies(workdir)
    assert len(found) == 2 and "knn-csv" in found
    [renamed] = [name for name in found if name != "knn-csv"]
    assert renamed.startswith("knn-csv-data-")
    fingerprints = {name: s.user_attrs[keys.DATA_FINGERPRINT] for name, s in found.items()}
    assert len(set(fingerprints.values())) == 2
    # no mixed trials: each study's trials ran on its own data (their runs say so, the MLflow way)
    runs = mlflow_runs(workdir)
    for name, study in found.items():
        trial_runs = [r for r in runs if r.data.tags.get(tracking.TAG_STUDY) == name
                      and tracking.TAG_TRIAL_NUMBER in r.data.tags]
        assert len(trial_runs) == len(study.trials) >= 1
        for run in trial_runs:
            [dataset_input] = run.inputs.dataset_inputs
            assert dataset_input.dataset.digest == fingerprints[name]
            assert dataset_input.dataset.name == "csv"
            assert run.data.tags[tracking.TAG_DATA] == fingerprints[name]
    assert {p.data.tags[tracking.TAG_DATA] for p in parents(workdir)} == set(fingerprints.values())
    before = len(found[renamed].trials)
    # unchanged data: the same study resumes (its budget is spent: no new trial, no new study)
    third = run_command("mlops-tune", *CSV, "study.n_trials=2", "gate.threshold=0.999", cwd=workdir)
    assert "the data changed" not in third.stdout
    assert f"continues study '{renamed}'" in third.stdout
    assert set(studies(workdir)) == set(found) and len(studies(workdir)[renamed].trials) == before
    # the switch: refuse to run on other data
    write_csv(workdir / "data.csv", 200, seed=3)
    refused = run_command("mlops-tune", *CSV, "study.on_data_change=fail", cwd=workdir)
    assert refused.code == 2
    assert refused.error_lines == [refused.error_lines[0]] and "ran on other data" in refused.error_lines[0]
    assert set(studies(workdir)) == set(found)


def test_start_from_champion_makes_trial_0_the_champions_architecture(workdir: Path) -> None:
    first = run_command("mlops-tune", "model=knn", "data=wine", "study.sampler=mutation", "study.n_trials=6",
                        "gate.threshold=0.94", cwd=workdir)
    assert first.code == 0, first.stdout[-2000:]
    champion = mlflow_client(workdir).get_model_version_by_alias("mlops-tune-knn-wine", "champion")
    best = studies(workdir)["knn-wine"].best_trial
    assert best.params != studies(workdir)["knn-wine"].trials[0].params  # the champion is not the base
    second = run_command("mlops-tune", "model=knn", "data=wine", "study.name=next-build", "study.n_trials=1",
                         "study.start_from=champion", "gate.threshold=0.94", cwd=workdir)
    assert second.code in (0, 1), second.stderr
    trial0 = studies(workdir)["next-build"].trials[0]
    assert trial0.params == best.params
    assert trial0.user_attrs[keys.START].startswith(f"champion models:/mlops-tune-knn-wine/{champion.version}")
    [parent] = [p for p in parents(workdir) if p.data.tags[tracking.TAG_STUDY] == "next-build"]
    assert parent.data.tags["mlops_tune.start_from"].startswith("champion models:/mlops-tune-knn-wine/")
    # a champion outside the search space widens it (here: a space without scalers), never fails
    assert best.params["scaler"] is not None
    third = run_command("mlops-tune", "model=knn", "data=wine", "study.name=narrow", "study.n_trials=1",
                        "study.start_from=champion", "search.space={model.scaler:{type:categorical,choices:[null]}}",
                        "registry.promote=false", cwd=workdir)
    assert third.code in (0, 1), third.stderr
    assert studies(workdir)["narrow"].trials[0].params == best.params


def test_the_champion_is_judged_on_the_new_test_split(workdir: Path) -> None:
    common = (*CSV, "study.n_trials=1", "gate.threshold=0", "registry.name=team-model")
    client = mlflow_client(workdir)
    write_csv(workdir / "data.csv", 400, seed=1, concept="x0")
    assert run_command("mlops-tune", *common, "study.name=a", cwd=workdir).code == 0
    v1 = client.get_model_version_by_alias("team-model", "champion")
    assert float(v1.tags["test_accuracy"]) > 0.85  # excellent on ITS data
    # the concept moved: on the new split the old champion is a coin toss; the new model wins
    write_csv(workdir / "data.csv", 400, seed=2, concept="x1")
    moved = run_command("mlops-tune", *common, "study.name=b", cwd=workdir)
    assert moved.code == 0, moved.stderr
    v2 = client.get_model_version_by_alias("team-model", "champion")
    assert v2.version != v1.version and float(v2.tags["test_accuracy"]) < float(v1.tags["test_accuracy"]) + 0.2
    [b] = [p for p in parents(workdir) if p.data.tags[tracking.TAG_STUDY] == "b"]
    assert b.data.metrics["previous_champion_test_accuracy"] < 0.7 < b.data.metrics["test_accuracy"]
    assert "the previous champion on this study's test split" in moved.stdout
    # new rows of the same concept, and a weak model (one neighbourhood of 240, the whole training split): it stays
    write_csv(workdir / "data.csv", 400, seed=3, concept="x1")
    weak = run_command("mlops-tune", *common, "study.name=c", "model.n_neighbors=240", cwd=workdir)
    assert weak.code == 0, weak.stderr
    assert client.get_model_version_by_alias("team-model", "champion").version == v2.version
    [c] = [p for p in parents(workdir) if p.data.tags[tracking.TAG_STUDY] == "c"]
    assert c.data.metrics["previous_champion_test_accuracy"] > c.data.metrics["test_accuracy"]
    assert "'champion' stays" in weak.stdout and "on this study's test split" in weak.stdout


def _seed_values(seed: int, n_estimators: int) -> list[float]:
    """val_accuracy of the random forest trained with seeds seed, seed+1, seed+2 on seed's split."""
    from mlops_tune.config import to_plain
    from mlops_tune.data import load_splits
    from mlops_tune.families import get_family
    from tests.conftest import compose_config

    cfg = to_plain(compose_config("tune", "model=random_forest", "data=wine", f"model.n_estimators={n_estimators}"))
    splits = load_splits(cfg["data"], seed)
    family = get_family("sklearn")
    values = []
    for s in (seed, seed + 1, seed + 2):
        fit = family.fit(cfg["model"], splits, s, lambda *_: None)
        values.append(family.accuracy(fit.model, splits.x_val, splits.y_val))
    return values


def test_gate_confirm_passes_on_the_mean_over_seeds_not_on_one_lucky_seed(workdir: Path) -> None:
    # construct it: a seed whose own forest is better than its mean over three seeds
    seed, values = next((s, v) for s in range(40, 120) for v in [_seed_values(s, 2)] if v[0] > np.mean(v))
    threshold = values[0]  # the first seed reaches it exactly; the mean does not
    args = ("model=random_forest", "data=wine", "model.n_estimators=2", "study.n_trials=1", f"seed={seed}",
            f"gate.threshold={threshold}")
    lucky = run_command("mlops-tune", *args, "study.name=one-seed", cwd=workdir)
    assert lucky.code == 0, lucky.stdout[-1500:]  # without confirmation the lucky seed passes
    confirmed = run_command("mlops-tune", *args, "gate.confirm=3", "study.name=three-seeds", cwd=workdir)
    assert confirmed.code == 1, confirmed.stdout[-1500:]
    assert "NOT confirmed over 3 seeds" in confirmed.stdout
    assert "did not confirm over gate.confirm=3 seeds" in confirmed.stdout
    trial = studies(workdir)["three-seeds"].trials[0]
    assert trial.value == pytest.approx(values[0])  # Optuna's value: the first run's
    assert trial.user_attrs[keys.CONFIRM_VALUES] == pytest.approx(values, abs=1e-6)
    runs = mlflow_runs(workdir)
    [child] = [r for r in runs if r.data.tags.get(tracking.TAG_STUDY) == "three-seeds"
               and r.data.tags.get(tracking.TAG_TRIAL_NUMBER) == "0"]
    history = mlflow_client(workdir).get_metric_history(child.info.run_id, "seed_val_accuracy")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(values, abs=1e-6)
    assert child.data.metrics["confirm_mean"] == pytest.approx(np.mean(values))
    assert child.data.metrics["confirm_spread"] == pytest.approx(max(values) - min(values))
    assert len([r for r in runs if r.data.tags.get("mlops_tune.confirm_of") == "0"
                and r.data.tags.get(tracking.TAG_STUDY) == "three-seeds"]) == 2


@pytest.mark.slow
def test_gate_max_params_is_respected_and_named_when_it_is_what_failed(workdir: Path) -> None:
    args = ("model=ann", "model.epochs=4", "study.n_trials=3", "gate.threshold=0.3")
    small = run_command("mlops-tune", *args, "study.name=fits", "gate.max_params=1000", cwd=workdir)
    assert small.code == 0, small.stdout[-2000:]
    study = studies(workdir)["fits"]
    winner = max((t for t in study.trials if t.value is not None and t.value >= 0.3
                  and t.user_attrs[keys.N_PARAMS] <= 1000), key=lambda t: t.value)
    [parent] = [p for p in parents(workdir) if p.data.tags[tracking.TAG_STUDY] == "fits"]
    assert parent.data.tags["mlops_tune.best_trial"] == str(winner.number)
    champion = mlflow_client(workdir).get_model_version_by_alias("mlops-tune-ann-digits", "champion")
    assert champion.tags["trial"] == str(winner.number)
    # only models larger than the limit reach the threshold (the base Dense(8) alone has 610)
    large = run_command("mlops-tune", *args, "study.name=too-large", "gate.max_params=500",
                        "registry.promote=false", cwd=workdir)
    assert large.code == 1, large.stdout[-2000:]
    assert "broke gate.max_params (smallest n_params 610 > 500)" in large.stdout
    assert all(t.constraints.get("gate.max_params", 0) > 0 for t in studies(workdir)["too-large"].trials
               if t.state == optuna.trial.TrialState.COMPLETE)


def test_other_training_settings_are_a_new_study_and_another_gate_a_new_verdict(workdir: Path) -> None:
    """A study's identity is what its trials answer (model and training settings, search space,
    data settings, metric), not only its name; a threshold is a judgement of the same trials."""
    args = ("model=knn", "study.n_trials=1", "study.sampler=random")

    def tune(*extra: str):
        return run_command("mlops-tune", *args, *extra, cwd=workdir)

    assert tune("gate.threshold=0.5").code == 0
    other = tune("gate.threshold=0.5", "model.weights=distance")
    assert other.code == 0, other.stderr
    assert "its objective changed since it ran (model.weights uniform -> distance)" in other.stdout
    [renamed] = [n for n in studies(workdir) if n != "knn-digits"]
    assert renamed.startswith("knn-digits-")
    assert [len(s.trials) for s in studies(workdir).values()] == [1, 1]  # nothing mixed
    again = tune("gate.threshold=0.5", "model.weights=distance")
    assert f"continues study '{renamed}'" in again.stdout and len(studies(workdir)[renamed].trials) == 1
    refused = tune("gate.threshold=0.5", "model.p=1", "study.on_data_change=fail")
    assert refused.code == 2 and "answers another objective (model.p 2 -> 1)" in refused.error_lines[0]

    client = mlflow_client(workdir)
    [first] = [p for p in parents(workdir) if p.data.tags[tracking.TAG_STUDY] == "knn-digits"]
    report = client.download_artifacts(first.info.run_id, "report.html", str(workdir / "before"))
    rejudged = tune("gate.threshold=0.9999")  # the same trials, judged again: missed
    assert rejudged.code == 1, rejudged.stderr
    assert "judged again with another gate (gate.threshold 0.5 -> 0.9999)" in rejudged.stdout
    run = client.get_run(first.info.run_id)
    assert run.data.tags[tracking.TAG_GATE] == "passed" and run.data.params["gate.threshold"] == "0.5"
    assert run.data.tags["mlops_tune.rejudged"] == "gate.threshold=0.9999: missed"
    after = client.download_artifacts(first.info.run_id, "", str(workdir / "after"))
    assert Path(after, "report.html").read_text() == Path(report).read_text()  # the first verdict's page stays
    assert Path(after, "rejudged", "gate.threshold=0.9999", "report.html").is_file()
