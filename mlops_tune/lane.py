"""``python -m mlops_tune.lane SPEC LANE``: one extra trial lane of a study (``study.n_jobs``).

Started by the study's own process (``mlops_tune.study.HelperLanes``), never by hand: SPEC
is the JSON file it wrote (the study's config, with the study name it settled on, and its
parent run), LANE this lane's number (1 ..). The lane takes trials from the study's storage
until the gate is met or the budget is spent, exactly as a scale-out worker does, and exits
0; its per-trial lines go to the study's output. Exit codes as ``mlops-tune``: 2 bad
usage, 3 the environment failed (or its trials kept failing), 130 / 143 stopped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROG = "mlops-tune lane"


def main(argv: list[str] | None = None) -> None:
    from mlops_tune import faults, heap, secrets
    from mlops_tune.cli import run_task
    from mlops_tune.errors import EXIT_USAGE

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not Path(args[0]).is_file() or not args[1].isdigit():
        print("usage: python -m mlops_tune.lane SPEC LANE (started by a study with study.n_jobs > 1)",
              file=sys.stderr)
        sys.exit(EXIT_USAGE)
    heap.defer()  # until the first trial: see mlops_tune.heap
    faults.install_signal_handlers()
    faults.quiet_background_faults()
    secrets.guard_streams()
    sys.exit(run_task(lambda _: _run(args[0], int(args[1])), None, f"{PROG} {args[1]}"))


def _run(spec_path: str, lane: int) -> int:
    from mlops_tune import tracking
    from mlops_tune.data import read_splits
    from mlops_tune.families import get_family
    from mlops_tune.logs import quiet_libraries, set_verbose
    from mlops_tune.study import HelperLanes, Study, wait_for_study

    cfg = json.loads(Path(spec_path).read_text())["cfg"]
    set_verbose(bool(cfg.get("verbose")))
    quiet_libraries()
    # imports first, while the study checks the config and loads the data (this lane's
    # critical path is CPU: the framework and MLflow's store take most of it)
    get_family(cfg["model"]["family"]).preload()
    tracking.preload(str(cfg["tracking"]["uri"]))
    checked = wait_for_study(spec_path, HelperLanes.CHECKED)
    if checked is None:  # a check failed: the study says why and ends us
        return 0
    study = Study(cfg, lane=lane, splits=read_splits(str(checked["splits"])))
    ready = wait_for_study(spec_path)
    if ready is None:
        return 0
    study.name = str(ready["name"])
    study.run_lane(str(ready["experiment_id"]), str(ready["parent_run_id"]), ready.get("started_at"),
                   ready.get("first_trial"))
    return 0


if __name__ == "__main__":
    main()
