"""``mlops-tune``: run ONE study of mutations of the base model until the gate is met.

Exit codes: 0 gate met, 1 budget spent without reaching ``gate.threshold``, 2 bad
usage/config/data, 3 crash (including a study stopped by ``study.max_consecutive_failures``).
``mlops-tune -m model=ann,cnn,knn`` runs one study per model; it exits with the worst code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlops_tune.cli import hydra_main, record_job
from mlops_tune.errors import EXIT_GATE_MISSED, EXIT_OK

PROG = "mlops-tune"


def tune(cfg: Any) -> int:
    """The ``mlops-tune`` task: validate, run the study, write the best config next to the logs."""
    from mlops_tune.config import to_plain, validate_tune
    from mlops_tune.study import Study
    from mlops_tune.tracking import quiet_libraries

    quiet_libraries()
    plain = to_plain(cfg)
    validate_tune(plain)
    result = Study(plain).run()
    _write_best_config(result)
    return EXIT_OK if result.gate_passed else EXIT_GATE_MISSED


def _write_best_config(result: Any) -> None:
    """Save the best trial's config in Hydra's output folder, ready for ``mlops-train``."""
    if result.best_config is None:
        return
    import yaml

    from mlops_tune.tracking import redact_config

    try:
        from hydra.core.hydra_config import HydraConfig

        out = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under Hydra (called from Python)
        out = Path.cwd()
    path = out / "best_config.yaml"
    path.write_text(yaml.safe_dump(redact_config(result.best_config), sort_keys=False))
    print(f"best config: {path} (reproduce: mlops-train --config-path {out.resolve()} "
          "--config-name best_config)", flush=True)


def _job(cfg: Any) -> int:
    return record_job(tune, cfg, PROG)


def main() -> None:
    hydra_main("tune", _job, PROG)


if __name__ == "__main__":
    main()
