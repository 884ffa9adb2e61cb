"""Print the Markdown table of benchmarks/results/*.json that the README shows."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    rows = ["| what | figure | target |", "|---|---|---|"]
    if overhead := _load("tracking_overhead"):
        for model, r in overhead["results"].items():
            rows.append(f"| tracking overhead per trial, {model} (model logged / not logged) | "
                        f"{r['overhead_with_model_log_median_s'] * 1000:.0f} ms / "
                        f"{r['overhead_without_model_log_median_s'] * 1000:.0f} ms | <= 300 ms |")
    if ttt := _load("time_to_target"):
        seeds = len(ttt["seeds"])
        for method, s in ttt["summary"].items():
            missed = f", missed seeds {s['missed_seeds']}" if s["missed_seeds"] else ""
            rows.append(f"| digits ANN to val_accuracy >= {ttt['target']}, {method} ({seeds} seeds) | "
                        f"reached {s['reached']}, median {s['median_seconds']:.0f} s / {s['median_trials']:g} trials, "
                        f"median best {s['best_median']:.3f}{missed} | {'5/5' if method == 'mlops-tune' else ''} |")
        for peer, key, target in (("plain Optuna TPE", "median_time_ratio_vs_optuna_tpe", "<= 0.75x"),
                                  ("Keras Tuner RandomSearch", "median_time_ratio_vs_kt_random", "<= 0.25x")):
            if ttt.get(key) is not None:
                rows.append(f"| median time to target, mlops-tune (defaults) / {peer} | {ttt[key]:.2f}x | {target} |")
        if lower := ttt.get("at_lower_target"):
            for method, s in lower["summary"].items():
                missed = f", missed seeds {s['missed_seeds']}" if s["missed_seeds"] else ""
                rows.append(f"| same runs, to val_accuracy >= {lower['target']}, {method} | reached {s['reached']}, "
                            f"median {s['median_seconds']:.0f} s / {s['median_trials']:g} trials{missed} | |")
            for peer, key in (("plain Optuna TPE", "median_time_ratio_vs_optuna_tpe"),
                              ("Keras Tuner RandomSearch", "median_time_ratio_vs_kt_random")):
                if lower.get(key) is not None:
                    rows.append(f"| median time to {lower['target']}, mlops-tune / {peer} | {lower[key]:.2f}x | |")
        outside = ttt.get("time_outside_training_ms_median") or {}
        # one process without the probe: runs long enough to measure (with it, most runs end at trial 1)
        one = "mlops-tune n_jobs=1 probe=none"
        if outside.get(one) is not None:
            plain = outside.get("optuna tpe")
            rows.append(f"| time per trial outside training, mlops-tune (one at a time, `probe=none`) / plain "
                        f"Optuna TPE | {outside[one]:.0f} ms / {plain:.0f} ms | <= 150 ms added |")
        pace = ttt.get("trials_per_minute_median") or {}
        if "mlops-tune probe=none" in pace and one in pace:
            rows.append(f"| digits ANN trials/min (`probe=none`), mlops-tune two processes (`n_jobs=auto`) "
                        f"/ one process / "
                        f"plain Optuna TPE | {pace['mlops-tune probe=none']:.1f} / {pace[one]:.1f} / "
                        f"{pace.get('optuna tpe', float('nan')):.1f} | |")
        if ttt.get("start_up_seconds_median") is not None:
            rows.append(f"| mlops-tune start-up: process start to its first trial (new stores, TensorFlow imported) | "
                        f"{ttt['start_up_seconds_median']:.1f} s | |")
        first = ttt.get("first_result_seconds_median") or {}
        if "mlops-tune" in first and "optuna tpe" in first:
            rows.append(f"| first finished trial after process start, mlops-tune / plain Optuna TPE | "
                        f"{first['mlops-tune']:.1f} s / {first['optuna tpe']:.1f} s | |")
    if workers := _load("workers"):
        for model, by_storage in workers["results"].items():
            for storage, r in by_storage.items():
                rows.append(f"| trials/min {model}, {storage}: 1 worker -> 2 workers | "
                            f"{r['1_worker_trials_per_min']:.1f} -> {r['2_worker_trials_per_min']:.1f} "
                            f"({r['speedup']:.2f}x) | {'>= 1.6x' if model == 'ann' else ''} |")
    if runners := _load("runner_overhead"):
        targets = runners["targets"]
        for model, by_mode in runners["results"].items():
            base = by_mode["inprocess"]
            for mode in ("mlflow-fresh", "docker-fresh", "mlflow-warm", "docker-warm"):
                r = by_mode[mode]
                target = ""
                if (model, mode) == ("knn", "docker-warm"):
                    target = f"<= {targets['knn_warm_docker_amortized_overhead_s']['target']:g} s"
                pairs = r.get("amortized_pairs_s")
                how = (f"the median of {len(pairs)} pairs: {', '.join(f'{p:.2f}' for p in pairs)} s; "
                       if pairs else "")
                rows.append(f"| per-trial overhead vs inprocess, {model}, {mode} (amortized over {r['trials']} "
                            f"trials) | {r['amortized_overhead_vs_inprocess_s']:.2f} s ({how}median trial "
                            f"{r['trial_seconds_median']:.2f} s vs {base['trial_seconds_median']:.2f} s, first "
                            f"{r['first_trial_seconds']:.1f} s) | {target} |")
        ratio = targets["ann_warm_docker_trial_vs_inprocess"]
        rows.append(f"| 5-epoch ANN trial in a warm container / in-process | {ratio['measured']:.2f}x | "
                    f"<= {ratio['target']:g}x |")
        two = targets["knn_two_warm_containers_speedup"]
        knn = runners["results"]["knn"]
        one, both = knn["docker-warm-1cpu"], knn["docker-warm-2x1cpu"]
        pairs = knn.get("parallel_speedups") or []
        spread = f"; pairs {', '.join(f'{x:.2f}x' for x in pairs)}" if len(pairs) > 1 else ""
        rows.append(f"| trials/min knn, warm containers of 1 CPU: 1 -> 2 (`runner.workers=2`, {one['trials']} "
                    f"trials, the median of {max(1, len(pairs))} pairs run in turn) | "
                    f"{one['trials_per_minute']:.0f} -> {both['trials_per_minute']:.0f} ({two['measured']:.2f}x"
                    f"{spread}) | >= {two['target']:g}x |")
        if one.get("cores_busy_during_trials") and runners.get("two_workers_ceiling"):
            rows.append(f"| CPUs of the machine busy while 1 -> 2 such containers run (every process: server, "
                        f"proxy, workers); the ceiling of 2 | {one['cores_busy_during_trials']:.2f} -> "
                        f"{both['cores_busy_during_trials']:.2f} of {runners['machine']['cpus']}; "
                        f"{runners['two_workers_ceiling']:.2f}x | |")
        stolen = runners["machine"].get("cores_stolen_during_trials")
        if stolen and stolen["max"] >= 0.05:
            rows.append(f"| CPUs the host took from this machine during the studies (steal: their figures are "
                        f"partly the host's) | median {stolen['median']:.2f}, up to {stolen['max']:.2f} | |")
        b = runners["breakdown"]
        rows.append(f"| what a container trial pays before our code: container start / trial imports | "
                    f"{b['container_start_s']:.1f} s / {b['trial_imports_in_container_s']:.1f} s "
                    f"(host {b['trial_imports_on_host_s']:.1f} s) | |")
    if ray := _load("ray_workers"):
        for n, r in ray["results"]["ray"].items():
            local, ratio = ray["results"]["local"][n], ray["results"]["ray_over_local"][n]
            rows.append(f"| trials/min knn, {n} worker(s): Ray tasks on a two-node cluster / local processes | "
                        f"{r['trials_per_minute']:.0f} / {local['trials_per_minute']:.0f} "
                        f"({ratio['trials_per_minute']:.2f}x) | |")
            rows.append(f"| first trial after the command's start, {n} worker(s): Ray / local | "
                        f"{r['seconds_to_first_trial']:.1f} s / {local['seconds_to_first_trial']:.1f} s "
                        f"(+{ratio['extra_seconds_to_first_trial']:.1f} s) | |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
