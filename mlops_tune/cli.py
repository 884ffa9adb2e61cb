"""Console scripts on top of Hydra, with the public exit codes.

Hydra parses the command line (overrides, ``-m`` multirun, ``--config-path`` ...) and
runs the task once per job. Hydra itself exits 1 on a config it cannot compose, and
discards the task's return value; this wrapper restores the contract:

* 0 success (gate met), 1 gate missed, 2 bad usage/config/data, 3 crash;
* a multirun exits with the worst code of its jobs (codes are collected through a
  file, so launchers that run jobs in other processes report too);
* errors are one line on stderr, no traceback, for everything that is the user's doing.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

from mlops_tune.errors import EXIT_CRASH, EXIT_USAGE, StudyAborted, UsageError

CONF_DIR = Path(os.environ.get("MLOPS_TUNE_CONF", Path(__file__).resolve().parent.parent / "conf"))
_CODES_ENV = "MLOPS_TUNE_EXIT_CODES_FILE"

Task = Callable[[Any], int]


class _HeldStderr(io.TextIOBase):
    """Holds what is written to stderr until the first job starts.

    Before a job starts only Hydra writes there, and only to report a config it could
    not compose: that text is turned into one line. Once a job runs, output passes.
    """

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner
        self.held: list[str] = []
        self.passing = False

    def write(self, text: str) -> int:  # type: ignore[override]
        if self.passing:
            return self.inner.write(text)
        self.held.append(text)
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def release(self) -> None:
        if not self.passing:
            self.passing = True
            self.inner.write("".join(self.held))
            self.held.clear()


def summarize_hydra_error(text: str) -> str:
    """One line from Hydra's (or argparse's) multi-line error report."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Set the environment variable", "Traceback"))]
    if not lines:
        return "invalid command line or config"
    for line in lines:
        if "error:" in line:  # argparse: "prog: error: unrecognized arguments: ..."
            return line.split("error:", 1)[1].strip()
    summary = lines[0]
    if any(line.startswith("Available options") for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        summary += f" (available: {', '.join(lines[start + 1:])})"
    elif len(lines) > 1 and lines[1].startswith("To append"):
        summary += f" {lines[1]}"
    return summary


def run_task(task: Task, cfg: Any, prog: str) -> int:
    """Run one job, mapping exceptions onto exit codes."""
    try:
        return task(cfg)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except StudyAborted as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CRASH
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"{prog}: crashed (a bug or an environment problem; the traceback is above)",
              file=sys.stderr, flush=True)
        return EXIT_CRASH


_held: _HeldStderr | None = None


def record_job(task: Task, cfg: Any, prog: str) -> int:
    """Body of a Hydra job: run ``task`` and record its exit code for the final exit.

    Commands define a module-level job function that calls this, so that launchers
    running jobs in other processes can pickle it by reference.
    """
    if _held is not None:
        _held.release()
    code = run_task(task, cfg, prog)
    codes_path = os.environ.get(_CODES_ENV)
    if codes_path:
        with open(codes_path, "a", encoding="utf-8") as codes:
            codes.write(f"{code}\n")
    return code


def hydra_main(config_name: str, job: Task, prog: str) -> NoReturn:
    """Run ``job`` under Hydra with ``config_name`` from ``conf/``; exit with the contract's code."""
    import hydra

    global _held
    fd, codes_path = tempfile.mkstemp(prefix="mlops-tune-codes-")
    os.close(fd)
    os.environ[_CODES_ENV] = codes_path
    _held = held = _HeldStderr(sys.stderr)
    sys.stderr = held  # type: ignore[assignment]
    hydra_failed = False
    try:
        hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(job)()
    except SystemExit as exc:
        hydra_failed = exc.code not in (0, None)
    finally:
        sys.stderr = held.inner
        _held = None
        os.environ.pop(_CODES_ENV, None)
    codes = [int(line) for line in Path(codes_path).read_text().split()]
    os.unlink(codes_path)
    if hydra_failed:
        if not held.passing:
            print(f"{prog}: error: {summarize_hydra_error(''.join(held.held))}", file=sys.stderr)
        codes.append(EXIT_USAGE)
    else:
        held.release()
    sys.exit(max(codes, default=0))
