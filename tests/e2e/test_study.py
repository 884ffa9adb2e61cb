"""``mlops-tune`` end to end: a real Optuna storage, a real MLflow store and registry."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mlops_tune.records import tracking
from mlops_tune.runtime import keys
from mlops_tune.search.gate import judged
from tests.conftest import BIN, command_env, heavy_imports_after, kill_when_a_trial_runs, mlflow_client, mlflow_runs

pytestmark = pytest.mark.usefixtures("workdir")


def load_study(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'optuna.db'}")


def parents_and_children(folder: Path) -> tuple[list, list]:
    runs = mlflow_runs(folder)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def champion_version(folder: Path, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow_client(folder).get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def test_gate_met_exits_0_promotes_champion_and_logs_the_layout(tune, workdir: Path) -> None:
    result = tune("model=knn", "gate.threshold=0.98", "study.n_trials=5")
    assert result.code == 0, result.stderr
    assert "gate PASSED" in result.stdout and "[trial   0] COMPLETE" in result.stdout
    [parent], children = parents_and_children(workdir)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_GATE] == "passed"
    assert parent.data.tags[tracking.TAG_STUDY] == "knn-digits"
    assert parent.data.metrics["best_val_accuracy"] >= 0.98
    assert 0.9 < parent.data.metrics["test_accuracy"] <= 1.0
    # the base model (k=1 on unscaled digits, ~0.989) is trial 0 and already passes: the study stops
    [trial0] = children
    assert trial0.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert trial0.data.tags[tracking.TAG_TRIAL_NUMBER] == "0"
    assert trial0.data.tags[tracking.TAG_STATE] == "COMPLETE"
    assert trial0.data.params["model.n_neighbors"] == "1" and trial0.data.params["model.scaler"] == "None"
    client = mlflow_client(workdir)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_config.yaml", "optimization_history.png"} <= artifacts
    version = client.get_model_version_by_alias("mlops-tune-knn-digits", "champion")
    assert float(version.tags["test_accuracy"]) == pytest.approx(parent.data.metrics["test_accuracy"], abs=1e-6)
    assert len(load_study(workdir, "knn-digits").trials) == 1


def test_threshold_unreachable_exits_1_after_n_trials_without_registry_change(tune, workdir: Path) -> None:
    assert tune("model=knn", "gate.threshold=0.98", "study.n_trials=1", "study.name=first").code == 0
    assert champion_version(workdir, "mlops-tune-knn-digits") == "1"
    result = tune("model=knn", "gate.threshold=0.999", "study.n_trials=4", "study.name=second")
    assert result.code == 1, result.stderr
    assert "gate MISSED" in result.stdout
    study = load_study(workdir, "second")
    assert len(study.trials) == 4
    parents, _ = parents_and_children(workdir)
    second = next(p for p in parents if p.data.tags[tracking.TAG_STUDY] == "second")
    assert second.data.tags[tracking.TAG_GATE] == "missed"
    versions = mlflow_client(workdir).search_model_versions("name='mlops-tune-knn-digits'")
    assert [str(v.version) for v in versions] == ["1"]
    assert champion_version(workdir, "mlops-tune-knn-digits") == "1"


def test_a_worse_model_never_takes_champion(tune, workdir: Path) -> None:
    assert tune("model=knn", "gate.threshold=0.98", "study.n_trials=1", "study.name=good").code == 0
    result = tune("model=knn", "model.n_neighbors=25", "model.weights=distance", "gate.threshold=0.9",
                  "study.n_trials=1", "study.name=worse")
    assert result.code == 0, result.stderr
    assert "'champion' stays" in result.stdout
    versions = mlflow_client(workdir).search_model_versions("name='mlops-tune-knn-digits'")
    assert sorted(str(v.version) for v in versions) == ["1", "2"]
    assert champion_version(workdir, "mlops-tune-knn-digits") == "1"


def test_mutation_children_record_their_parent(tune, workdir: Path) -> None:
    result = tune("model=knn", "study.sampler=mutation", "gate.threshold=0.999", "study.n_trials=5")
    assert result.code == 1, result.stderr
    _, children = parents_and_children(workdir)
    by_number = {int(c.data.tags[tracking.TAG_TRIAL_NUMBER]): c for c in children}
    assert sorted(by_number) == [0, 1, 2, 3, 4]
    assert tracking.TAG_MUTATIONS not in by_number[0].data.tags
    for number in range(1, 5):
        tags = by_number[number].data.tags
        assert int(tags[tracking.TAG_PARENT_TRIAL]) < number
        assert re.fullmatch(r"model\.\w+:\w+(,model\.\w+:\w+)?", tags[tracking.TAG_MUTATIONS])
    assert "<- #0" in result.stdout


def test_resume_counts_all_trials_of_the_study(tune, workdir: Path) -> None:
    args = ("model=knn", "gate.threshold=0.999", "study.sampler=random")
    assert tune(*args, "study.n_trials=2").code == 1
    second = tune(*args, "study.n_trials=5")
    assert second.code == 1, second.stderr
    assert "resuming with 2 trial(s)" in second.stdout
    study = load_study(workdir, "knn-digits")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    parents, children = parents_and_children(workdir)
    assert len(parents) == 1 and len(children) == 5  # one parent run per study, resumed
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert tune(*args, "study.n_trials=5").code == 1  # budget already spent: no new trial
    assert len(load_study(workdir, "knn-digits").trials) == 5


def test_a_failing_trial_does_not_stop_the_study(tune, workdir: Path) -> None:
    result = tune("model=knn", "model._target_=tests.helpers.EvenFailsKNN", "model.n_neighbors=3",
                  "study.sampler=random", "gate.threshold=0.999", "study.n_trials=8")
    assert result.code == 1, result.stderr
    states = [t.state for t in load_study(workdir, "knn-digits").trials]
    assert len(states) == 8
    first_fail = states.index(TrialState.FAIL)
    assert TrialState.COMPLETE in states[first_fail + 1:]
    _, children = parents_and_children(workdir)
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == states.count(TrialState.FAIL)
    assert all("refusing even n_neighbors" in c.data.tags[tracking.TAG_ERROR] for c in failed)
    assert "FAIL" in result.stdout and "refusing even" in result.stdout


def test_consecutive_failures_end_the_study_with_a_clear_message(tune, workdir: Path) -> None:
    result = tune("model=knn", "model._target_=tests.helpers.AlwaysFailsKNN",
                  "study.max_consecutive_failures=2", "study.n_trials=10")
    assert result.code == 3
    assert "stopped after 2 failed trials in a row" in result.stderr
    assert "always fails" in result.stderr
    assert len(load_study(workdir, "knn-digits").trials) == 2
    assert [r for r in mlflow_runs(workdir) if r.info.status == "RUNNING"] == []


def test_multirun_runs_one_study_per_model_and_exits_with_the_worst_code(tune, workdir: Path) -> None:
    result = tune("-m", "model=knn,logreg", "gate.threshold=0.985", "study.n_trials=2")
    assert result.code == 1, result.stderr  # knn passes (0), logreg misses (1)
    parents, _ = parents_and_children(workdir)
    gates = {p.data.tags[tracking.TAG_STUDY]: p.data.tags[tracking.TAG_GATE] for p in parents}
    assert gates == {"knn-digits": "passed", "logreg-digits": "missed"}


def test_multirun_jobs_that_differ_are_distinct_studies_in_folders_of_their_own(tune, workdir: Path) -> None:
    """Jobs that sweep a key (not the model, data or worker) answer different questions: one
    study, one parent run and one output folder each; a study name never climbs out of the sweep."""
    result = tune("-m", "model=knn", "model.n_neighbors=1,3", "gate.threshold=0.5", "study.n_trials=1",
                  "hydra.sweep.dir=sweep")
    assert result.code == 0, result.stderr
    parents, _ = parents_and_children(workdir)
    names = sorted(p.data.tags[tracking.TAG_STUDY] for p in parents)
    assert names == ["knn-digits-model.n_neighbors=1", "knn-digits-model.n_neighbors=3"]
    for name in names:
        assert (workdir / "sweep" / name / "worker-0" / "report.html").is_file()
        assert len(load_study(workdir, name).trials) == 1

    named = tune("-m", "model=knn", "study.name=../up", "gate.threshold=0.5", "study.n_trials=1",
                 "hydra.sweep.dir=sweep2")
    assert named.code == 0, named.stderr
    assert (workdir / "sweep2" / "_._up" / "worker-0").is_dir() and not (workdir / "up").exists()
    assert len(load_study(workdir, "../up").trials) == 1  # the name itself is kept


def test_parallel_multirun_with_the_joblib_launcher(tune, workdir: Path) -> None:
    result = tune("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model=knn,logreg",
                  "gate.threshold=0.985", "study.n_trials=2")
    assert result.code == 1, result.stderr
    parents, _ = parents_and_children(workdir)
    assert sorted(p.data.tags[tracking.TAG_GATE] for p in parents) == ["missed", "passed"]


def test_best_config_reproduces_the_best_trial(tune, train, workdir: Path) -> None:
    result = tune("model=knn", "study.sampler=mutation", "gate.threshold=0.999", "study.n_trials=6")
    assert result.code == 1, result.stderr
    folder = re.search(r"--config-path (\S+) --config-name best_config", result.stdout).group(1)
    [parent], _ = parents_and_children(workdir)
    replay = train("--config-path", folder, "--config-name", "best_config")
    assert replay.code == 0, replay.stderr
    runs = [r for r in mlflow_runs(workdir) if r.data.tags.get("mlflow.runName", "").startswith("knn-digits")]
    assert runs[-1].data.metrics["val_accuracy"] == parent.data.metrics["best_val_accuracy"]


def test_knn_study_never_imports_tensorflow(workdir: Path) -> None:
    code, heavy, stderr = heavy_imports_after("tune", ["model=knn", "study.n_trials=3", "gate.threshold=0.999"],
                                              workdir)
    assert code == 1, stderr
    assert heavy == [], f"TensorFlow, Keras or Ray imported on a KNN study in this process: {heavy[:5]}"


def test_sigkilled_run_leaves_nothing_running_after_a_rerun(workdir: Path) -> None:
    args = ["model=knn", "study.heartbeat_interval=1", "study.grace_period=2", "study.n_trials=3",
            "gate.threshold=0.999", "study.sampler=random"]
    victim = subprocess.Popen(
        [str(BIN / "mlops-tune"), *args, "model._target_=tests.helpers.SlowKNN"], cwd=workdir,
        env=command_env(MLOPS_TUNE_TEST_SLEEP="120"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    kill_when_a_trial_runs(victim, "knn-digits", f"sqlite:///{workdir / 'optuna.db'}")
    time.sleep(3.5)  # past the grace period: the heartbeat is stale
    # the same study (the same model class: its trials now sleep 0 s)
    rerun = subprocess.run([str(BIN / "mlops-tune"), *args, "model._target_=tests.helpers.SlowKNN"], cwd=workdir,
                           env=command_env(MLOPS_TUNE_TEST_SLEEP="0"), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 1, rerun.stderr
    trials = load_study(workdir, "knn-digits").trials
    # the killed trial never trained: it is not charged, its copy runs, the budget still gets 3
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert trials[0].state == TrialState.FAIL and not judged(trials[0])
    assert sum(judged(t) for t in trials) == 3
    assert trials[1].system_attrs.get("failed_trial") == 0 and trials[1].params == trials[0].params
    assert all(t.state != TrialState.RUNNING for t in trials)
    runs = mlflow_runs(workdir)
    assert [r for r in runs if r.info.status == "RUNNING"] == []
    killed = [r for r in runs if r.info.run_id == trials[0].user_attrs["mlflow_run_id"]]
    assert killed[0].info.status == "KILLED"


@pytest.mark.slow
def test_trial_1_probes_the_base_model_at_its_widest_layers(tune, workdir: Path) -> None:
    common = ("model.epochs=1", "study.n_trials=2", "gate.threshold=0.9999", "study.n_jobs=1", "study.pruner=none")
    result = tune(*common)
    assert result.code == 1, result.stderr
    base, probe = load_study(workdir, "ann-digits").trials
    # the base model, then the same model with its Dense layer as wide as conf/search/ann.yaml allows
    assert base.params["hidden_units_0"] == 8 and probe.params == {**base.params, "hidden_units_0": 256}
    assert probe.user_attrs[keys.PARENT] == keys.BASE
    assert probe.user_attrs[keys.MUTATIONS] == "model.hidden_units:widest"
    assert "<- the base model model.hidden_units:widest" in result.stdout
    _, children = parents_and_children(workdir)
    [run] = [c for c in children if c.data.tags[tracking.TAG_TRIAL_NUMBER] == "1"]
    assert run.data.tags[tracking.TAG_MUTATIONS] == "model.hidden_units:widest"
    assert run.data.params["model.hidden_units"] == "[256]"
    # switched off: trial 1 is the sampler's
    result = tune(*common, "study.name=no-probe", "study.probe=none")
    assert result.code == 1, result.stderr
    assert keys.MUTATIONS not in load_study(workdir, "no-probe").trials[1].user_attrs
    # a widest model over model.max_params is not tried, and the study says so
    result = tune(*common, "study.name=small", "model.max_params=2000")
    assert result.code == 1, result.stderr
    assert "no probe of the widest layers (model.hidden_units: this architecture has 19,210 parameters" \
        in result.stdout
    assert keys.MUTATIONS not in load_study(workdir, "small").trials[1].user_attrs
    # nor one over the gate's deployment limit: it could not pass
    result = tune(*common, "study.name=deployable", "gate.max_params=2000")
    assert result.code == 1, result.stderr
    assert "no probe of the widest layers (over gate.max_params=2,000)" in result.stdout
    assert keys.MUTATIONS not in load_study(workdir, "deployable").trials[1].user_attrs


@pytest.mark.slow
def test_pruned_trials_are_pruned_in_optuna_and_mlflow(tune, workdir: Path) -> None:
    result = tune("model.epochs=3", "study.n_trials=2", "gate.threshold=0.999",
                  "study.pruner={_target_:optuna.pruners.ThresholdPruner,lower:0.99}")
    assert result.code == 1, result.stderr
    trials = load_study(workdir, "ann-digits").trials
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.PRUNED]
    _, children = parents_and_children(workdir)
    assert len(children) == 2
    assert {c.data.tags[tracking.TAG_STATE] for c in children} == {"PRUNED"}
    assert "PRUNED" in result.stdout
