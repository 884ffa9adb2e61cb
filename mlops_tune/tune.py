"""``mlops-tune``: run ONE study of mutations of the base model until the gate is met.

Exit codes: 0 gate met, 1 budget spent on trials that trained without reaching
``gate.threshold``, 2 bad usage/config/data or an environment unusable from the start,
3 a crash or a failure of the environment during the study (including a study stopped by
``study.max_consecutive_failures``), 130 / 143 / 129 stopped by SIGINT / SIGTERM / SIGHUP.
``mlops-tune -m model=ann,cnn,knn`` runs one study per model; it exits with the worst code.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from mlops_tune.config.cli import hydra_main, note_job, record_job
from mlops_tune.runtime.errors import EXIT_GATE_MISSED, EXIT_OK, EnvironmentFault, StudyAborted, UsageError
from mlops_tune.show import junit

PROG = "mlops-tune"


def tune(cfg: Any) -> int:
    """The ``mlops-tune`` task: validate, run the study, write the best config next to the logs."""
    with contextlib.suppress(Exception):  # a name that does not resolve: the checks below say why
        # the first line before the heavy imports (Optuna, MLflow, the model's framework: ~1-2 s)
        print(f"study '{cfg.study.name}': checking the config ...", flush=True)
    from mlops_tune.config import load_tune
    from mlops_tune.runtime.logs import quiet_libraries, set_verbose
    from mlops_tune.runtime.secrets import redact_text
    from mlops_tune.study import Study

    set_verbose(bool(cfg.get("verbose")))
    quiet_libraries()
    plain = load_tune(cfg, model=False)  # the model's section: by the study's checks (Plan.check)
    started = time.perf_counter()
    junit_path = (plain.get("report") or {}).get("junit")
    if junit_path:
        junit.check(junit_path)  # what the study's end writes, refused now rather than after it ran
    try:
        result = Study(plain).run()
        _write_outputs(result)
    except (StudyAborted, UsageError, EnvironmentFault, KeyboardInterrupt) as exc:
        if junit_path:
            junit.record(junit_path, plain["study"]["name"], plain["model"]["name"],
                         time.perf_counter() - started, error=redact_text(str(exc) or "interrupted"))
        raise
    from mlops_tune.show.report import verdict_line

    note_job(f"study '{result.study_name}': {verdict_line(result)}")
    if junit_path:
        best = f"{result.best_value:.4f}" if result.best_value is not None else "none"
        missed = None if result.gate_passed else (
            f"best {plain['gate']['metric']} {best} < threshold {result.threshold} after {result.n_trials} trials")
        junit.record(junit_path, result.study_name, plain["model"]["name"], time.perf_counter() - started,
                     failure=missed)
    return EXIT_OK if result.gate_passed else EXIT_GATE_MISSED


def _write_outputs(result: Any) -> None:
    """Save the trials table and the best trial's config (ready for ``mlops-train``) in
    Hydra's output folder, where CI archives them."""
    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under Hydra (called from Python)
        out = Path.cwd()
    try:
        _write_files(out, result)
    except OSError as exc:  # the folder deleted (or made unwritable) while the study ran
        from mlops_tune.runtime import faults

        fault = faults.classify(exc)
        raise fault or EnvironmentFault("disk", f"cannot write the study's outputs in {out} "
                                                f"({exc.strerror or exc}); its verdict is in the MLflow run") from None


def _write_files(out: Path, result: Any) -> None:
    import yaml

    from mlops_tune.runtime.secrets import redact_config

    (out / "trials.csv").write_text(result.trials_csv)
    if result.report_html:
        (out / "report.html").write_text(result.report_html)
        print(f"study report: {out / 'report.html'} (also the parent run's report.html artifact)", flush=True)
    if result.best_config is None:
        return
    path = out / "best_config.yaml"
    path.write_text(yaml.safe_dump(redact_config(result.best_config), sort_keys=False))
    print(f"best config: {path} (reproduce: mlops-train --config-path {out.resolve()} "
          "--config-name best_config)", flush=True)


def _job(cfg: Any) -> int:
    return record_job(tune, cfg, PROG)


def main() -> None:
    from mlops_tune.runtime import heap, threads

    # under a CPU quota below the cores (a CI agent's container), before numpy loads; TensorFlow's
    # pools: the coordinator's threads.limit_threads, by the trials that share the quota
    threads.limit_to_quota()
    heap.defer()  # until the first trial: see mlops_tune.runtime.heap
    hydra_main("tune", _job, PROG)


if __name__ == "__main__":
    main()
