"""The one-trial seam in process: determinism, pruning and failure bookkeeping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from mlops_tune.config import to_plain, validate_train
from mlops_tune.records import tracking
from mlops_tune.trial import run_trial
from tests.conftest import compose_config, mlflow_runs


def compose_plain(config: str, *overrides: str) -> dict:
    return to_plain(compose_config(config, *overrides))


@pytest.fixture
def experiment(workdir: Path) -> str:
    return tracking.connect(f"sqlite:///{workdir / 'mlflow.db'}", "mlops-tune")


@pytest.mark.slow
def test_same_config_twice_gives_identical_results(experiment: str, workdir: Path) -> None:
    cfg = compose_plain("train", "model.epochs=3", "model.hidden_units=[16]")
    validate_train(cfg)
    first = run_trial(cfg, experiment_id=experiment)
    second = run_trial(cfg, experiment_id=experiment)
    assert first.val_accuracy == second.val_accuracy
    assert first.test_accuracy == second.test_accuracy
    client = __import__("mlflow").MlflowClient()
    losses = [[m.value for m in client.get_metric_history(o.run_id, "loss")] for o in (first, second)]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_sklearn_is_deterministic_with_a_seeded_estimator(experiment: str) -> None:
    cfg = compose_plain("train", "model=random_forest", "data=wine", "model.n_estimators=15", "seed=3")
    results = {run_trial(cfg, experiment_id=experiment).val_accuracy for _ in range(2)}
    assert len(results) == 1


@pytest.mark.slow
def test_nan_loss_fails_the_run(experiment: str, workdir: Path) -> None:
    from mlops_tune.families.keras import TrainingDiverged

    cfg = compose_plain("train", "model.epochs=5", "model.optimizer=sgd", "model.learning_rate=10",
                        "model.hidden_units=[256,256]", "model.early_stopping_patience=0")
    with pytest.raises(TrainingDiverged, match="loss became"):
        run_trial(cfg, experiment_id=experiment)
    [run] = mlflow_runs(workdir)
    assert run.info.status == "FAILED"
    assert "loss became" in run.data.tags[tracking.TAG_ERROR]
    assert run.data.tags[tracking.TAG_STATE] == "FAIL"


def test_pruned_trial_ends_finished_and_tagged(experiment: str, workdir: Path) -> None:
    class PruneAtOnce:
        def report(self, value: float, step: int) -> None:
            raise optuna.TrialPruned(f"pruned at {step}")

    cfg = compose_plain("train", "model=knn")
    with pytest.raises(optuna.TrialPruned):
        run_trial(cfg, experiment_id=experiment, reporter=PruneAtOnce())
    [run] = mlflow_runs(workdir)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_STATE] == "PRUNED"
    assert "val_accuracy" in run.data.metrics  # what was reached before pruning is kept


def test_failing_estimator_marks_the_run_failed_with_the_error(experiment: str, workdir: Path) -> None:
    cfg = compose_plain("train", "model=knn", "model._target_=tests.helpers.AlwaysFailsKNN")
    validate_train(cfg)
    with pytest.raises(RuntimeError, match="always fails"):
        run_trial(cfg, experiment_id=experiment)
    [run] = mlflow_runs(workdir)
    assert run.info.status == "FAILED"
    assert "always fails" in run.data.tags[tracking.TAG_ERROR]
    client = __import__("mlflow").MlflowClient()
    assert "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.parametrize("overrides", [
    ("model=ann",), ("model=ann", "model.hidden_units=[16,32]", "model.dropout=0.2"),
    ("model=cnn",), ("model=cnn", "model.conv_filters=[8,16,4]", "model.hidden_units=[]"),
], ids=["ann", "ann-2-layers", "cnn", "cnn-3-blocks"])
def test_the_size_check_counts_what_keras_builds(overrides: tuple[str, ...]) -> None:
    """model.max_params is judged on an estimate from the config: it must equal Keras' count."""
    from mlops_tune.data import load_splits
    from mlops_tune.families import get_family

    cfg = compose_plain("train", *overrides)
    family = get_family(cfg["model"]["family"])
    splits = load_splits(cfg["data"], cfg["seed"]).as_input(family.input_kind)
    built = family.build(cfg["model"], splits)
    assert family.estimate_params(cfg["model"], splits) == built.count_params()


@pytest.mark.slow
def test_logged_val_loss_is_the_validation_loss(experiment: str) -> None:
    """The last logged val_loss equals model.evaluate and the cross-entropy of the predictions.

    digits has pixels constant in training: Keras' Normalization divided them by 1e-7, so
    val_loss was in the thousands (all three figures agreed with each other only after the fix).
    """
    import mlflow
    import numpy as np

    from mlops_tune.data import load_splits
    from mlops_tune.families import get_family

    cfg = compose_plain("train", "model.epochs=3", "model.early_stopping_patience=0")
    validate_train(cfg)
    outcome = run_trial(cfg, experiment_id=experiment)
    logged = [m.value for m in mlflow.MlflowClient().get_metric_history(outcome.run_id, "val_loss")]
    assert len(logged) == 3
    family = get_family(cfg["model"]["family"])
    splits = load_splits(cfg["data"], int(cfg["seed"])).as_input(family.input_kind)
    model = family.load_model(outcome.model_uri)
    evaluated_loss, evaluated_accuracy = model.evaluate(splits.x_val, splits.y_val, verbose=0)
    probabilities = np.clip(model.predict(splits.x_val, verbose=0), 1e-7, 1 - 1e-7)
    cross_entropy = float(-np.mean(np.log(probabilities[np.arange(len(splits.y_val)), splits.y_val])))
    assert logged[-1] == pytest.approx(evaluated_loss, rel=1e-4)
    assert logged[-1] == pytest.approx(cross_entropy, rel=1e-3)
    assert evaluated_accuracy == pytest.approx(outcome.val_accuracy)


def test_a_process_running_trials_takes_its_imports_out_of_the_garbage_collector() -> None:
    """In a process mlops-tune started (heap.defer: the collector off during the imports),
    settle_imports imports the family's framework once, freezes every object made so far
    (without collecting them first) and turns the collector back on: a full collection
    afterwards (Keras' clear_session runs one before every model) sweeps only what was made
    since; a second call does nothing. A process that did not call defer (mlops-tune used as
    a library) keeps its collector as it was."""
    script = (
        "import gc, sys\n"
        "from mlops_tune.runtime import heap\n"
        "from mlops_tune.families import settle_imports\n"
        "if sys.argv[1] == 'library':\n"
        "    settle_imports('sklearn')\n"
        "    assert gc.get_freeze_count() == 0 and gc.isenabled()\n"
        "    print('untouched'); sys.exit()\n"
        "heap.defer()\n"
        "assert not gc.isenabled()\n"
        "import weakref\n"
        "class Cycle: pass\n"
        "garbage = Cycle(); garbage.me = garbage; gone = weakref.ref(garbage); del garbage\n"
        "settle_imports('sklearn')\n"
        "assert gone() is not None  # frozen, not collected: a collection first costs ~0.5 s\n"
        "frozen = gc.get_freeze_count()\n"
        "swept = len(gc.get_objects())\n"
        "assert gc.isenabled() and frozen > 20 * swept, (frozen, swept)\n"
        "settle_imports('sklearn')\n"
        "assert gc.get_freeze_count() == frozen\n"
        "print('settled')\n"
    )
    for mode, expected in (("owned", "settled"), ("library", "untouched")):
        assert _run_script(script, mode).stdout.strip() == expected


def test_keras_comes_without_scikit_learn_where_the_process_has_not_imported_it() -> None:
    """Keras imports scikit-learn at start for wrappers mlops-tune does not use (0.5-1.2 s of a
    process's start-up): a process that has not imported scikit-learn gets Keras without it, and
    can still import scikit-learn afterwards; one that has (the study's own process, which
    loaded the data with it) is left as it is."""
    script = (
        "import sys\n"
        "from mlops_tune.families.keras import _keras\n"
        "if sys.argv[1] == 'first':\n"
        "    import sklearn\n"
        "keras = _keras()\n"
        "print('sklearn' in sys.modules)\n"
        "from sklearn.neighbors import KNeighborsClassifier\n"
        "assert KNeighborsClassifier(n_neighbors=1).fit([[0.0], [1.0]], [0, 1]).predict([[0.9]])[0] == 1\n"
        "keras.layers.Dense(2)  # Keras itself works\n"
    )
    for mode, before in (("process", "False"), ("first", "True")):
        done = _run_script(script, mode, TF_CPP_MIN_LOG_LEVEL="")
        assert done.stdout.split() == [before]
        assert done.stderr == ""  # and TensorFlow printed nothing while it loaded (see test_logs.py)


def _run_script(script: str, mode: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``script`` run with ``mode`` in a fresh Python process (``env`` added to this one's), which
    must succeed."""
    done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done
