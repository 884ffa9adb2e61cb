"""Trial throughput of one study with 1 and 2 workers, over SQLite and PostgreSQL.

For each model (KNN, and the ANN on digits with 10 epochs and no pruning), each storage
(SQLite file; PostgreSQL with an MLflow server on a PostgreSQL backend) and 1 or 2
concurrent ``mlops-tune`` workers on ONE study, it runs a fixed number of trials with an
unreachable gate and measures trials per minute from the first trial's start to the
last trial's end (process start-up excluded: a long study amortizes it).

Run: ``.venv/bin/python benchmarks/workers.py`` (about 10 minutes on 2 cores; needs the
PostgreSQL server binaries). Writes ``benchmarks/results/workers.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from devtools import devservices  # noqa: E402

BIN = Path(sys.executable).parent
CASES = {
    "knn": (["model=knn"], 40),
    "ann": (["model.epochs=10", "model.early_stopping_patience=0", "study.pruner=none"], 12),
}
TARGET_ANN_SPEEDUP = 1.6


def throughput(stores: dict[str, str], workdir: Path, overrides: list[str], n_trials: int, workers: int) -> float:
    study = f"bench-{uuid.uuid4().hex[:8]}"
    args = [str(BIN / "mlops-tune"), *overrides, f"study.name={study}", f"study.n_trials={n_trials}",
            "gate.threshold=1.0", "study.sampler=random", "registry.promote=false", "study.n_jobs=1",
            f"study.storage={stores['storage']}", f"tracking.uri={stores['tracking']}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [subprocess.Popen(args, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(workers)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 1:
            raise RuntimeError(f"worker exited {proc.returncode}: {err.decode()[-2000:]}")
    trials = optuna.load_study(study_name=study, storage=stores["storage"]).get_trials()
    start = min(t.datetime_start for t in trials if t.datetime_start)
    end = max(t.datetime_complete for t in trials if t.datetime_complete)
    return 60.0 * len(trials) / (end - start).total_seconds()


def main() -> None:
    results: dict[str, dict[str, dict[str, float]]] = {}
    pg_folder = Path(tempfile.mkdtemp(prefix="mlops-tune-bench-pg-"))
    work = Path(tempfile.mkdtemp(prefix="mlops-tune-bench-"))
    pg = devservices.start_postgres(pg_folder)
    server, server_url = devservices.start_mlflow_server(pg.url("mlflow"), work / "artifacts",
                                                         log=work / "server.log")
    try:
        storages = {
            "sqlite": {"storage": f"sqlite:///{work}/optuna.db", "tracking": f"sqlite:///{work}/mlflow.db"},
            "postgres": {"storage": pg.url("optuna"), "tracking": server_url},
        }
        for model, (overrides, n_trials) in CASES.items():
            for storage, stores in storages.items():
                row = {}
                for workers in (1, 2):
                    row[f"{workers}_worker_trials_per_min"] = throughput(stores, work, overrides, n_trials, workers)
                row["speedup"] = row["2_worker_trials_per_min"] / row["1_worker_trials_per_min"]
                results.setdefault(model, {})[storage] = row
                print(f"{model:4s} {storage:8s} 1 worker {row['1_worker_trials_per_min']:6.1f}/min  "
                      f"2 workers {row['2_worker_trials_per_min']:6.1f}/min  speedup {row['speedup']:.2f}x",
                      flush=True)
    finally:
        devservices.stop_process(server)
        devservices.stop_postgres(pg)
        shutil.rmtree(pg_folder, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "trials per minute of one study, 1 vs 2 workers", "cpus": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d"), "trials": {m: n for m, (_, n) in CASES.items()},
              "target_ann_speedup": TARGET_ANN_SPEEDUP, "results": results}
    out = HERE / "results" / "workers.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
