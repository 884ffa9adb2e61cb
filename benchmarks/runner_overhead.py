"""Per-trial overhead of runner=mlflow and runner=docker against runner=inprocess.

For a KNN (digits) and an ANN (digits, 5 epochs) it runs the same small study (random
sampler, fixed seed: the same trial configs for every runner; no pruning; unreachable
gate) with each runner, all tracking to one MLflow server on 127.0.0.1 (runner=docker
needs one). A trial's time is its wall time as the study sees it (``seconds``: from
creating its run to reading its outcome back); the overhead of a runner is its median
trial time minus runner=inprocess's (the trials do the same work). It is also split into
what is not training (``seconds - fit_seconds``, the fit measured inside the trial
wherever it runs) and the slower training of a cold process.

It also times what a container trial pays before any of our code runs: starting a
container (``docker run --rm IMAGE true``) and the imports of a trial process (mlflow,
scikit-learn, optuna, hydra, grpc) inside the image and on the host.

Run: ``.venv/bin/python benchmarks/runner_overhead.py`` (about 6 minutes; needs a Docker
engine and ``make images``). Writes ``benchmarks/results/runner_overhead.json``.
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
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from devtools import devservices  # noqa: E402
from mlops_tune.cli import CONF_DIR  # noqa: E402

DEFAULT_IMAGES = yaml.safe_load((CONF_DIR / "runner" / "docker.yaml").read_text())["images"]

BIN = Path(sys.executable).parent
RUNNERS = ("inprocess", "mlflow", "docker")
CASES = {
    "knn": (["model=knn"], 6),
    "ann": (["model=ann", "model.epochs=5", "model.early_stopping_patience=0"], 4),
}
TARGET_SKLEARN_DOCKER_S = 3.0
TRIAL_IMPORTS = ("import mlops_tune.worker, mlops_tune.trial, mlops_tune.optuna_setup, mlflow, sklearn.neighbors, "
                 "optuna, hydra, grpc")


def study_overheads(server: str, work: Path, overrides: list[str], n_trials: int, runner: str) -> dict:
    name = f"bench-{runner}-{uuid.uuid4().hex[:6]}"
    storage = f"sqlite:///{work / 'optuna.db'}"
    args = [str(BIN / "mlops-tune"), *overrides, f"runner={runner}", f"study.name={name}",
            f"study.n_trials={n_trials}", "study.sampler=random", "study.pruner=none", "gate.threshold=1.0",
            "registry.promote=false", f"study.storage={storage}", f"tracking.uri={server}",
            f"tracking.experiment={name}"]
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=work, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 1:
        raise RuntimeError(f"{runner}: mlops-tune exited {proc.returncode}: {proc.stderr[-2000:]}")
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(done) != n_trials:
        raise RuntimeError(f"{runner}: {len(done)} of {n_trials} trials completed")
    per_trial = [t.user_attrs["seconds"] - t.user_attrs["fit_seconds"] for t in done]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return {
        "trials": n_trials,
        "trial_seconds_median": statistics.median(t.user_attrs["seconds"] for t in done),
        "fit_seconds_median": statistics.median(t.user_attrs["fit_seconds"] for t in done),
        "non_fit_seconds_median": statistics.median(per_trial),
        "seconds_per_trial_in_study": span / n_trials,
        "process_wall_seconds": wall,
        "val_accuracies": [round(t.value, 4) for t in sorted(done, key=lambda t: t.number)],
    }


def timed(cmd: list[str], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="mlops-tune-bench-runners-"))
    server_proc, server = devservices.start_mlflow_server(f"sqlite:///{work / 'mlflow.db'}", work / "artifacts",
                                                          log=work / "server.log")
    results: dict[str, dict] = {}
    try:
        for model, (overrides, n_trials) in CASES.items():
            results[model] = {}
            for runner in RUNNERS:
                print(f"{model} / runner={runner}: {n_trials} trials ...", flush=True)
                r = study_overheads(server, work, overrides, n_trials, runner)
                results[model][runner] = r
                print(f"  trial {r['trial_seconds_median']:.2f} s (fit {r['fit_seconds_median']:.2f} s, "
                      f"rest {r['non_fit_seconds_median']:.2f} s)", flush=True)
            base = results[model]["inprocess"]
            for runner in RUNNERS[1:]:
                r = results[model][runner]
                # same configs, same work: the whole difference is the runner's (a fresh process
                # also trains slower: Keras traces its graphs anew in every process)
                r["overhead_vs_inprocess_s"] = r["trial_seconds_median"] - base["trial_seconds_median"]
                r["non_fit_overhead_vs_inprocess_s"] = r["non_fit_seconds_median"] - base["non_fit_seconds_median"]
            # the same configs ran everywhere: the runner must not change the result
            accuracies = {runner: results[model][runner]["val_accuracies"] for runner in RUNNERS}
            results[model]["same_val_accuracies"] = len({tuple(v) for v in accuracies.values()}) == 1
    finally:
        devservices.stop_process(server_proc)
        shutil.rmtree(work, ignore_errors=True)

    image = DEFAULT_IMAGES["sklearn"]
    container_start = timed(["docker", "run", "--rm", "--network", "host", image, "true"])
    container_imports = timed(["docker", "run", "--rm", "--network", "host", image, "python", "-c", TRIAL_IMPORTS])
    host_imports = timed([sys.executable, "-c", TRIAL_IMPORTS])
    breakdown = {
        "container_start_s": container_start,
        "trial_imports_in_container_s": container_imports - container_start,
        "trial_imports_on_host_s": host_imports,
    }
    knn_docker = results["knn"]["docker"]["overhead_vs_inprocess_s"]
    out = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "cases": {model: {"overrides": o, "trials": n} for model, (o, n) in CASES.items()},
        "results": results,
        "breakdown": breakdown,
        "target_sklearn_docker_overhead_s": TARGET_SKLEARN_DOCKER_S,
        "target_met": knn_docker <= TARGET_SKLEARN_DOCKER_S,
    }
    path = HERE / "results" / "runner_overhead.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for model in CASES:
        for runner in RUNNERS[1:]:
            print(f"{model}: runner={runner} overhead vs inprocess "
                  f"{results[model][runner]['overhead_vs_inprocess_s']:.2f} s per trial")
    print(f"container start {container_start:.2f} s, trial imports in the container "
          f"{breakdown['trial_imports_in_container_s']:.2f} s (host {host_imports:.2f} s)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
