"""Tracking overhead of one trial: wall time of ``run_trial`` minus fit and evaluation.

It covers everything mlops-tune adds around training: config flattening, creating and
ending the MLflow run, the batched params/metrics, the config artifact and logging the
model with its flavor, signature and explicit pip requirements. Interpreter start,
imports and the one-off creation of the MLflow DB are excluded (warm-up trials).

Run: ``.venv/bin/python benchmarks/tracking_overhead.py`` (about a minute). Writes
``benchmarks/results/tracking_overhead.json`` and prints a Markdown table.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mlops_tune.config import to_plain, validate_train  # noqa: E402
from mlops_tune.config.cli import CONF_DIR  # noqa: E402
from mlops_tune.data import load_splits  # noqa: E402
from mlops_tune.records import tracking  # noqa: E402
from mlops_tune.trial import run_trial  # noqa: E402

CASES = {
    "knn": ["model=knn"],
    "ann": ["model.epochs=3", "model.early_stopping_patience=0"],
}
WARMUP, REPEATS = 2, 8
TARGET_SECONDS = 0.3


def measure(overrides: list[str], experiment_id: str) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_plain(compose(config_name="train", overrides=overrides))
    validate_train(cfg)
    splits = load_splits(cfg["data"], cfg["seed"])
    overheads, totals, model_logged = [], [], []
    for i in range(WARMUP + REPEATS):
        log_model = i % 2 == 0  # a study logs the model only for trials that improve the best
        started = time.perf_counter()
        outcome = run_trial(cfg, experiment_id=experiment_id, splits=splits,
                            should_log_model=lambda _v, flag=log_model: flag)
        elapsed = time.perf_counter() - started
        if i >= WARMUP:
            overheads.append(outcome.overhead_seconds)
            totals.append(elapsed)
            model_logged.append(log_model)
    with_model = [o for o, m in zip(overheads, model_logged, strict=True) if m]
    without = [o for o, m in zip(overheads, model_logged, strict=True) if not m]
    return {
        "overhead_median_s": statistics.median(overheads),
        "overhead_with_model_log_median_s": statistics.median(with_model),
        "overhead_without_model_log_median_s": statistics.median(without),
        "trial_wall_median_s": statistics.median(totals),
        "overhead_share_of_trial": statistics.median(overheads) / statistics.median(totals),
        "repeats": REPEATS,
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        experiment_id = tracking.connect(f"sqlite:///{folder}/mlflow.db", "bench")
        results = {name: measure(overrides, experiment_id) for name, overrides in CASES.items()}
    report = {
        "benchmark": "tracking overhead per trial (run_trial wall - fit - evaluate)",
        "target_s": TARGET_SECONDS,
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    out = HERE / "results" / "tracking_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| model | overhead (median) | with model log | without | trial wall | target |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        verdict = "met" if r["overhead_with_model_log_median_s"] <= TARGET_SECONDS else "MISSED"
        ms = {key: f"{r[key] * 1000:.0f} ms" for key in r if key.startswith("overhead_") and key.endswith("_s")}
        print(f"| {name} | {ms['overhead_median_s']} | {ms['overhead_with_model_log_median_s']}"
              f" | {ms['overhead_without_model_log_median_s']} | {r['trial_wall_median_s']:.2f} s"
              f" | <= {TARGET_SECONDS * 1000:.0f} ms: {verdict} |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
