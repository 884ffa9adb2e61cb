"""Trials per minute of one study with 1, 2 and 4 workers as Ray tasks on a two-node Ray cluster,
against the same numbers of workers as local processes (``study.n_jobs``), and what placing a
worker on Ray costs before the first trial.

The cluster is two ``ray start`` nodes on this machine (2 logical CPUs each; the machine's cores
are what they share), the stores are PostgreSQL and an MLflow server on a PostgreSQL backend, as
a cluster needs. For each count, a KNN study (digits, ``TRIALS`` trials, random sampler, no
pruning, unreachable gate) runs ``REPEATS`` times per mode, in turn. Figures: trials per minute
from the first trial's start to the last trial's end (the median run), and the seconds from the
command's start to the first trial's start (start-up: for Ray, connecting as the driver, the task's
placement and its process's imports).

Run: ``.venv/bin/python benchmarks/ray_workers.py`` (about 8 minutes on 2 cores; needs the ray
extra and the PostgreSQL server binaries). Writes ``benchmarks/results/ray_workers.json``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
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
TRIALS = 40
REPEATS = 3
WORKERS = (1, 2, 4)


def study(stores: dict[str, str], work: Path, mode: list[str]) -> dict[str, float]:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    args = [str(BIN / "mlops-tune"), "model=knn", f"study.name={name}", f"study.n_trials={TRIALS}",
            "gate.threshold=1.0", "study.sampler=random", "study.pruner=none", "registry.promote=false",
            f"study.storage={stores['storage']}", f"tracking.uri={stores['tracking']}", f"tracking.experiment={name}",
            *mode]
    started = time.time()
    proc = subprocess.run(args, cwd=work, env={**os.environ, "MLOPS_TUNE_LIVE": "0"}, capture_output=True, text=True)
    if proc.returncode != 1:
        raise RuntimeError(f"{mode}: exited {proc.returncode}: {proc.stderr[-2000:]}")
    trials = optuna.load_study(study_name=name, storage=stores["storage"]).get_trials()
    if len([t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]) != TRIALS:
        raise RuntimeError(f"{mode}: not {TRIALS} complete trials")
    first = min(t.datetime_start for t in trials if t.datetime_start)
    last = max(t.datetime_complete for t in trials if t.datetime_complete)
    return {"trials_per_minute": 60.0 * TRIALS / (last - first).total_seconds(),
            "seconds_to_first_trial": first.timestamp() - started,
            "wall_seconds": time.time() - started}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="mlops-tune-bench-ray-"))
    pg_folder = Path(tempfile.mkdtemp(prefix="mlops-tune-bench-pg-"))  # its own: as root, postgres must enter it
    pg = devservices.start_postgres(pg_folder)
    server, url = devservices.start_mlflow_server(pg.url("mlflow"), work / "artifacts", log=work / "server.log")
    nodes = [work / "head", work / "node"]
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        address = devservices.start_ray_node(nodes[0], 2)
        devservices.start_ray_node(nodes[1], 2, address)
        stores = {"storage": pg.url("optuna"), "tracking": url}
        modes = {"local": lambda n: ["runner=inprocess", f"study.n_jobs={n}"],
                 "ray": lambda n: ["runner=ray", f"runner.address={address}", f"runner.workers={n}", "runner.cpus=1"]}
        study(stores, work, modes["local"](1))  # warms the server, the database and the page cache
        for n in WORKERS:
            runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
            for _ in range(REPEATS):
                for mode, overrides in modes.items():
                    runs[mode].append(study(stores, work, overrides(n)))
            for mode, measured in runs.items():
                row = {key: statistics.median(r[key] for r in measured) for key in measured[0]}
                row["trials_per_minute_runs"] = [round(r["trials_per_minute"], 1) for r in measured]
                results.setdefault(mode, {})[str(n)] = row
                print(f"{mode:5s} {n} worker(s): {row['trials_per_minute']:6.1f} trials/min, first trial after "
                      f"{row['seconds_to_first_trial']:.1f} s (runs {row['trials_per_minute_runs']})", flush=True)
    finally:
        for folder in reversed(nodes):
            devservices.kill_ray_node(folder)
        devservices.stop_process(server)
        devservices.stop_postgres(pg)
        shutil.rmtree(pg_folder, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    for n in map(str, WORKERS):
        ray, local = results["ray"][n], results["local"][n]
        results.setdefault("ray_over_local", {})[n] = {
            "trials_per_minute": ray["trials_per_minute"] / local["trials_per_minute"],
            "extra_seconds_to_first_trial": ray["seconds_to_first_trial"] - local["seconds_to_first_trial"]}
    report = {"benchmark": "runner=ray on a two-node cluster vs local processes, KNN", "cpus": os.cpu_count(),
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "trials": TRIALS,
              "repeats": REPEATS, "nodes": {"count": 2, "logical_cpus_each": 2}, "results": results}
    out = HERE / "results" / "ray_workers.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
