"""Time until a model reaches the target validation accuracy on digits, whole processes side by side.

Every method runs as a fresh process of its own (its imports and start-up count: they are
part of what a user waits for), over the same search space (conf/search/ann.yaml: 1-3 Dense
layers of 4-256 units, activation, dropout, learning rate, batch size, optimizer), the same
data split per seed and the same Keras training (30 epochs, early stopping on val_accuracy
with patience 5), a budget of 20 trials:

* ``mlops-tune``            the real ``mlops-tune`` command with its defaults (study.n_jobs=auto,
                            pruner=median, TPE, MLflow tracking, Optuna SQLite storage, the
                            base model as trial 0, the probe as trial 1, promotion in the registry)
* ``mlops-tune n_jobs=1``   the same, one trial at a time (what the parallel processes buy)
* ``mlops-tune pruner=none`` the same without pruning (what the pruner buys, or costs)
* ``mlops-tune probe=none``  the same without the probe (trial 1 = the base at its widest
                            layers): what the probe buys, or costs
* ``mlops-tune n_jobs=1 probe=none`` one process, no probe: its runs have enough trials to measure
                            the time a trial spends outside training
* ``mlops-tune sampler=mutation`` the same with the mutation sampler (mutations of the best so
                            far, starting from the base model) instead of TPE
* ``optuna tpe``            a plain Optuna TPE script: no tracking, no warm start, no pruning,
                            TensorFlow's default threads (what a user writes by hand)
* ``kt random``             Keras Tuner RandomSearch (seeded with seed + 1: it takes 0 as no seed;
                            Keras seeded and deterministic, as in every other method)
* ``kt hyperband``          Keras Tuner Hyperband (max_epochs=30, factor=3), seeded the same way
* ``original loop``         the rule this project replaced: from the base model (Dense(8)),
                            add 8 units to the last layer, then another Dense(8) layer, and so
                            on alternately, other settings as the base, until the target

A method that misses the target within the budget counts as its whole run's time. The
anytime view is the mean over seeds of the best val_accuracy reached by each second.

Run one seed (results merge): ``.venv/bin/python benchmarks/time_to_target.py --seed 3``
(about 10 minutes on 2 cores); all 5 and the merge: ``.venv/bin/python benchmarks/time_to_target.py``;
only the merge: ``--merge``. Needs ``pip install -e ".[bench]"`` (Keras Tuner). Writes
``benchmarks/results/time_to_target/seed-N.json``, ``benchmarks/results/time_to_target.json``
and ``benchmarks/results/time_to_target.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
RESULTS = HERE / "results"
SEED_DIR = RESULTS / "time_to_target"

#: chosen on the data, not guessed: in the run of 2026-11-27 (target 0.975, 8 methods x 20 trials
#: per seed) the best any method reached per seed was 0.975, 0.986, 0.983, 0.981 and 0.969
#: (seed 4: nobody reached 0.975). The lowest, seed 4's 0.969 (349 of 360 validation samples),
#: less one sample of margin: 0.965 (348 of 360). Plain Optuna TPE, mlops-tune's mutation
#: sampler and pruner=none reached it on every seed; Keras Tuner RandomSearch on 4 (0.964 on
#: seed 4). ``ceilings`` in the results re-checks it on each run.
TARGET = 0.965
#: also reported, read off the same runs' curves: a lower target (a run stops at TARGET)
LOWER_TARGET = 0.96
BUDGET = 20
SEEDS = 5
DATA = {"name": "digits", "loader": "sklearn", "dataset": "digits", "val_size": 0.2, "test_size": 0.2}


class StopSearch(Exception):
    """Stops a Keras Tuner search once the target is reached or the trial budget is spent."""


# ----------------------------------------------------------------------------- mlops-tune, the command
def run_mlops_tune(seed: int, launched: float, *overrides: str) -> dict[str, Any]:
    import optuna

    with tempfile.TemporaryDirectory() as folder:
        args = [str(ROOT / ".venv" / "bin" / "mlops-tune"), f"seed={seed}", f"gate.threshold={TARGET}",
                f"study.n_trials={BUDGET}", f"study.storage=sqlite:///{folder}/optuna.db",
                f"tracking.uri=sqlite:///{folder}/mlflow.db", f"hydra.run.dir={folder}/out", *overrides]
        env = {k: v for k, v in os.environ.items() if k != "MLOPS_TUNE_N_JOBS"}
        proc = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True)
        total = time.time() - launched
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"mlops-tune exited {proc.returncode}: {proc.stderr[-2000:]}")
        study = optuna.load_study(study_name="ann-digits", storage=f"sqlite:///{folder}/optuna.db")
        trials = study.get_trials(deepcopy=False)
    done = sorted((t for t in trials if t.datetime_complete is not None), key=lambda t: t.datetime_complete)
    curve, best, hit = [], 0.0, None
    for t in done:
        at = t.datetime_complete.timestamp() - launched
        if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None:
            best = max(best, t.value)
            if hit is None and t.value >= TARGET:
                hit = (at, len([d for d in done if d.datetime_complete <= t.datetime_complete]))
        curve.append((round(at, 2), best))
    # time a trial spends outside training and evaluation, including the gap to the next trial
    # of the same process (one trial at a time: the n_jobs=1 run): sampling, tracking, storage,
    # reporting epochs to Optuna, model logging, the trial line
    overheads = []
    for t, after in zip(done, [*done[1:], None], strict=True):
        a = t.user_attrs
        times = a.get("times") or {"fit": a.get("fit_seconds"),  # before the one attribute: three
                                    "evaluate": a.get("evaluate_seconds", 0.0), "report": a.get("report_seconds", 0.0)}
        if t.state != optuna.trial.TrialState.COMPLETE or times["fit"] is None:
            continue
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        gap = (after.datetime_start - t.datetime_complete).total_seconds() if after is not None else 0.0
        training = times["fit"] - times["report"] + times["evaluate"]
        overheads.append(wall + max(0.0, gap) - training)
    first = min((t.datetime_start for t in trials if t.datetime_start), default=None)
    return {"reached": hit is not None, "trials": hit[1] if hit else len(done),
            "seconds": hit[0] if hit else total, "end_to_end_seconds": total, "best": best, "curve": curve,
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
            "start_up_seconds": first.timestamp() - launched if first else None,
            "overhead_per_trial_s": statistics.median(overheads) if overheads else None}


# ----------------------------------------------------------------------------- peers, in this process
def space_and_base() -> tuple[Any, dict[str, Any]]:
    from hydra import compose, initialize_config_dir

    from mlops_tune.config import to_plain
    from mlops_tune.config.cli import CONF_DIR
    from mlops_tune.search.space import SearchSpace

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_plain(compose(config_name="tune"))
    return SearchSpace.from_config(cfg["search"]["space"], cfg), cfg["model"]


def train_point(model_cfg: dict[str, Any], splits: Any, seed: int, point: dict[str, Any]) -> float:
    from mlops_tune.families.keras import DenseFamily

    family = DenseFamily()
    cfg = dict(model_cfg)
    for key, value in point.items():
        cfg[key.split(".", 1)[1]] = value
    fit = family.fit(cfg, splits, seed, lambda _e, _m: None)
    return family.accuracy(fit.model, splits.x_val, splits.y_val)


def load_seed_splits(seed: int) -> Any:
    from mlops_tune.data import load_splits

    return load_splits(DATA, seed)


def run_plain_optuna(seed: int, launched: float) -> dict[str, Any]:
    import optuna

    space, model_cfg = space_and_base()
    splits = load_seed_splits(seed)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    curve: list[tuple[float, float]] = []

    training = [0.0]

    def objective(trial: optuna.Trial) -> float:
        point = space.suggest(trial)
        started = time.perf_counter()
        try:
            return train_point(model_cfg, splits, seed, point)
        finally:
            training[0] += time.perf_counter() - started

    def stop(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        curve.append((round(time.time() - launched, 2), study.best_value))
        if trial.value is not None and trial.value >= TARGET:
            study.stop()

    started = time.perf_counter()
    study.optimize(objective, n_trials=BUDGET, callbacks=[stop])
    outside = (time.perf_counter() - started - training[0]) / max(1, len(curve))
    return from_curve(curve, launched) | {"overhead_per_trial_s": outside}


def run_original_loop(seed: int, launched: float) -> dict[str, Any]:
    """The rule before this project: grow the base model until the target, alternately adding
    8 units to the last layer and another Dense(8) layer."""
    _, model_cfg = space_and_base()
    splits = load_seed_splits(seed)
    units = list(model_cfg["hidden_units"])
    curve: list[tuple[float, float]] = []
    best = 0.0
    for step in range(BUDGET):
        best = max(best, train_point(model_cfg, splits, seed, {"model.hidden_units": list(units)}))
        curve.append((round(time.time() - launched, 2), best))
        if best >= TARGET:
            break
        if step % 2 == 0:
            units[-1] += 8
        else:
            units.append(8)
    return from_curve(curve, launched)


def from_curve(curve: list[tuple[float, float]], launched: float) -> dict[str, Any]:
    hit = next((i for i, (_, v) in enumerate(curve) if v >= TARGET), None)
    return {"reached": hit is not None, "trials": (hit + 1) if hit is not None else len(curve),
            "seconds": curve[hit][0] if hit is not None else time.time() - launched,
            "end_to_end_seconds": time.time() - launched, "best": max((v for _, v in curve), default=0.0),
            "curve": curve}


def run_keras_tuner(seed: int, launched: float, kind: str) -> dict[str, Any]:
    import keras
    import keras_tuner as kt
    import tensorflow as tf

    splits = load_seed_splits(seed)
    # seeded and deterministic like every other method's training (mlops-tune's Keras family does
    # the same per trial); unseeded, the same draw reached 0.936 and 0.967 on seed 1 in two runs
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    mean, variance = splits.x_train.mean(axis=0), splits.x_train.var(axis=0)

    def build(hp: kt.HyperParameters) -> keras.Model:
        inputs = keras.Input(shape=(64,))
        x = keras.layers.Normalization(mean=mean, variance=variance)(inputs)
        activation = hp.Choice("activation", ["relu", "tanh", "elu"])
        dropout = hp.Float("dropout", 0.0, 0.4)
        for i in range(hp.Int("layers", 1, 3)):
            x = keras.layers.Dense(hp.Int(f"units_{i}", 4, 256, sampling="log"), activation=activation)(x)
            if dropout > 0:
                x = keras.layers.Dropout(dropout)(x)
        outputs = keras.layers.Dense(10, activation="softmax")(x)
        model = keras.Model(inputs, outputs)
        optimizer = keras.optimizers.get({"class_name": hp.Choice("optimizer", ["adam", "rmsprop", "adamw"]),
                                          "config": {"learning_rate": hp.Float("lr", 1e-4, 3e-2, sampling="log")}})
        model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    log: list[tuple[float, float]] = []

    class Stopping:
        def on_trial_end(self, tuner: Any, trial: Any) -> None:
            value = trial.metrics.get_best_value("val_accuracy")
            log.append((round(time.time() - launched, 2), max([value or 0.0, *(v for _, v in log)])))
            # Hyperband ignores max_trials (its schedule has many short trials): cap it here
            if (value is not None and value >= TARGET) or len(log) >= BUDGET:
                raise StopSearch

    def with_stop(cls: type) -> type:
        class Tuner(cls):  # type: ignore[misc, valid-type]
            def on_trial_end(self, trial: Any) -> None:
                super().on_trial_end(trial)
                Stopping().on_trial_end(self, trial)

            def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
                kwargs["batch_size"] = trial.hyperparameters.Choice("batch_size", [16, 32, 64, 128])
                return super().run_trial(trial, *args, **kwargs)

        return Tuner

    with tempfile.TemporaryDirectory() as folder:
        # Keras Tuner takes seed 0 as no seed (``seed or random.randint(1, 10000)``): its draws
        # then change from run to run. seed + 1 keeps every seed's draws fixed.
        common = {"objective": "val_accuracy", "seed": seed + 1, "directory": folder, "project_name": kind,
                  "overwrite": True}
        if kind == "random":
            tuner = with_stop(kt.RandomSearch)(build, max_trials=BUDGET, **common)
        else:
            tuner = with_stop(kt.Hyperband)(build, max_epochs=30, factor=3, **common)
        stopper = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=5, mode="max")
        with contextlib.suppress(StopSearch):
            tuner.search(splits.x_train, splits.y_train, validation_data=(splits.x_val, splits.y_val),
                         epochs=30, callbacks=[stopper], verbose=0)
    return from_curve(log, launched)


METHODS: dict[str, Callable[[int, float], dict[str, Any]]] = {
    "mlops-tune": lambda seed, at: run_mlops_tune(seed, at),
    "mlops-tune n_jobs=1": lambda seed, at: run_mlops_tune(seed, at, "study.n_jobs=1"),
    "mlops-tune pruner=none": lambda seed, at: run_mlops_tune(seed, at, "study.pruner=none"),
    "mlops-tune probe=none": lambda seed, at: run_mlops_tune(seed, at, "study.probe=none"),
    "mlops-tune n_jobs=1 probe=none": lambda seed, at: run_mlops_tune(seed, at, "study.n_jobs=1", "study.probe=none"),
    "mlops-tune sampler=mutation": lambda seed, at: run_mlops_tune(seed, at, "study.sampler=mutation"),
    "optuna tpe": run_plain_optuna,
    "kt random": lambda seed, at: run_keras_tuner(seed, at, "random"),
    "kt hyperband": lambda seed, at: run_keras_tuner(seed, at, "hyperband"),
    "original loop": run_original_loop,
}
IN_PROCESS = ("optuna tpe", "kt random", "kt hyperband", "original loop")


def run_one(method: str, seed: int) -> dict[str, Any]:
    """``method`` on ``seed`` in a fresh process (mlops-tune: the command itself)."""
    launched = time.time()
    if method not in IN_PROCESS:
        return METHODS[method](seed, launched)
    proc = subprocess.run([sys.executable, __file__, "--one", method, "--seed", str(seed), "--launched", str(launched)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_seed(seed: int, methods: list[str]) -> dict[str, Any]:
    SEED_DIR.mkdir(parents=True, exist_ok=True)
    out = SEED_DIR / f"seed-{seed}.json"
    results = json.loads(out.read_text())["methods"] if out.exists() else {}
    for method in methods:
        outcome = run_one(method, seed)
        results[method] = outcome
        print(f"seed {seed} {method:24s} reached={outcome['reached']!s:5s} trials={outcome['trials']:2d} "
              f"seconds={outcome['seconds']:7.1f} best={outcome['best']:.4f}", flush=True)
        out.write_text(json.dumps({"seed": seed, "target": TARGET, "budget_trials": BUDGET,
                                   "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                                   "methods": results}, indent=1) + "\n")
    return results


# ----------------------------------------------------------------------------- merge
def anytime(runs: list[dict[str, Any]], horizon: float) -> list[tuple[int, float]]:
    """Mean over seeds of the best val_accuracy reached by each second (0 before a first result)."""
    points = []
    for second in range(int(horizon) + 1):
        values = [max((v for t, v in run["curve"] if t <= second), default=0.0) for run in runs]
        points.append((second, statistics.fmean(values)))
    return points


def at_target(run: dict[str, Any], target: float) -> tuple[bool, float, int]:
    """(reached, seconds, trials) of ``run`` for ``target``, from its curve."""
    hit = next((i for i, (_, v) in enumerate(run["curve"]) if v >= target), None)
    if hit is None:
        return False, run["end_to_end_seconds"] if target < TARGET else run["seconds"], len(run["curve"])
    if target == TARGET:
        return True, run["seconds"], run["trials"]
    return True, run["curve"][hit][0], hit + 1


def summarize(runs: dict[str, list[dict[str, Any]]], target: float) -> dict[str, Any]:
    summary = {}
    for method, rs in runs.items():
        if not rs:
            continue
        judged = [(r["seed"], *at_target(r, target)) for r in rs]
        summary[method] = {
            "reached": f"{sum(j[1] for j in judged)}/{len(rs)}",
            "median_seconds": round(statistics.median(j[2] for j in judged), 1),
            "median_trials": statistics.median(j[3] for j in judged),
            "best_median": round(statistics.median(r["best"] for r in rs), 4),
            "missed_seeds": [j[0] for j in judged if not j[1]],
        }
    return summary


def pace(rs: list[dict[str, Any]]) -> float | None:
    rates = [(len(r["curve"]) - 1) * 60 / (r["curve"][-1][0] - r["curve"][0][0])
             for r in rs if len(r["curve"]) >= 4 and r["curve"][-1][0] > r["curve"][0][0]]
    return round(statistics.median(rates), 1) if rates else None


def merge() -> dict[str, Any]:
    files = sorted(SEED_DIR.glob("seed-*.json"))
    seeds = [json.loads(f.read_text()) for f in files]
    methods = list(METHODS)
    runs = {m: [s["methods"][m] | {"seed": s["seed"]} for s in seeds if m in s["methods"]] for m in methods}
    summary = summarize(runs, TARGET)
    ours = runs.get("mlops-tune") or []

    def ratio(peer: str, table: dict[str, Any] = summary) -> float | None:
        if "mlops-tune" not in table or peer not in table:
            return None
        return round(table["mlops-tune"]["median_seconds"] / table[peer]["median_seconds"], 3)

    # the same runs judged at a lower target, read off each run's curve (a run stops at TARGET,
    # after any lower target; one that never reaches it counts its whole time)
    lower = summarize(runs, LOWER_TARGET)

    def overhead(method: str) -> float | None:
        values = [r["overhead_per_trial_s"] for r in runs.get(method, []) if r.get("overhead_per_trial_s") is not None]
        return round(1000 * statistics.median(values), 1) if values else None
    report = {
        "target": TARGET, "budget_trials": BUDGET, "seeds": [s["seed"] for s in seeds],
        "date": max((s["date"] for s in seeds), default=None), "machine": {"cpus": os.cpu_count()},
        "target_reached_by_some_method": {s["seed"]: any(r["reached"] for r in s["methods"].values())
                                          for s in seeds},
        # per seed: the best val_accuracy any method reached before it stopped (at the target)
        "ceilings": {s["seed"]: round(max(r["best"] for r in s["methods"].values()), 4) for s in seeds},
        "summary": summary,
        "median_time_ratio_vs_optuna_tpe": ratio("optuna tpe"),
        "median_time_ratio_vs_kt_random": ratio("kt random"),
        "at_lower_target": {"target": LOWER_TARGET, "summary": lower,
                            "median_time_ratio_vs_optuna_tpe": ratio("optuna tpe", lower),
                            "median_time_ratio_vs_kt_random": ratio("kt random", lower)},
        # first to last finished trial of each run (4 trials or more), median over seeds
        "trials_per_minute_median": {m: pace(rs) for m, rs in runs.items() if pace(rs) is not None},
        # process start to the first trial's start (since 2026-11-27 TensorFlow is imported before it)
        "start_up_seconds_median": round(statistics.median(r["start_up_seconds"] for r in ours), 2) if ours else None,
        # process start to the first finished trial, every method (what start-up costs a user)
        "first_result_seconds_median": {m: round(statistics.median(r["curve"][0][0] for r in rs), 2)
                                        for m, rs in runs.items() if rs and all(r["curve"] for r in rs)},
        # per trial, outside training and evaluation, one trial at a time (TPE's sampling included)
        # one process without the probe: runs of 4-20 trials, most of which log no model (with the probe
        # a run is trials 0 and 1, both new bests that log their model: not a trial's usual cost)
        "time_outside_training_ms_median": {m: overhead(m) for m in ("mlops-tune n_jobs=1 probe=none",
                                                                     "mlops-tune n_jobs=1", "optuna tpe")},
        "targets": {"all_seeds_reached": bool(ours) and all(r["reached"] for r in ours),
                    "vs_optuna_tpe_max": 0.75, "vs_kt_random_max": 0.25, "overhead_ms_max": 150},
    }
    (RESULTS / "time_to_target.json").write_text(json.dumps(report | {"runs": runs}, indent=1) + "\n")
    draw(runs, RESULTS / "time_to_target.png")
    return report


def draw(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    horizon = max((r["end_to_end_seconds"] for rs in runs.values() for r in rs), default=60)
    fig, ax = plt.subplots(figsize=(9, 5))
    for method, rs in runs.items():
        if rs:
            points = anytime(rs, horizon)
            ax.step([p[0] for p in points], [p[1] for p in points], where="post", label=f"{method} ({len(rs)} seeds)")
    ax.axhline(TARGET, color="grey", linestyle="--", linewidth=1, label=f"target {TARGET}")
    ax.set_ylim(0.8, 1.0)
    ax.set_xlabel("seconds since the process started")
    ax.set_ylabel("best val_accuracy so far (mean over seeds)")
    ax.set_title("digits, dense network: best model by wall-clock time")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, help="run this seed only (results merge with the other seeds')")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--merge", action="store_true", help="only merge the seeds' results")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a peer in a fresh process: one JSON line out
        from mlops_tune.runtime.logs import quiet_libraries

        quiet_libraries()
        print(json.dumps(METHODS[args.one](args.seed, args.launched)))
        return
    if not args.merge:
        methods = [m for m in args.methods.split(",") if m]
        for seed in ([args.seed] if args.seed is not None else range(SEEDS)):
            run_seed(seed, methods)
    report = merge()
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    print(f"written to {RESULTS / 'time_to_target.json'} and {RESULTS / 'time_to_target.png'}")


if __name__ == "__main__":
    main()
