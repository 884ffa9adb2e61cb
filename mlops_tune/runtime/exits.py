"""The public exit codes of a job: exceptions mapped onto them, with one line on stderr.

0 success, 2 bad usage/config/data (:class:`UsageError`), 3 a crash or a failure of the
environment (:class:`EnvironmentFault`, :class:`StudyAborted`, anything unexpected: with its
traceback), 130 / 143 / 129 stopped by SIGINT / SIGTERM / SIGHUP. Every process mlops-tune starts (the
commands, a study's helper processes, a trial's own process) ends through :func:`run_mapped`.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable

from mlops_tune.runtime import faults, secrets
from mlops_tune.runtime.errors import EXIT_CRASH, EXIT_USAGE, EnvironmentFault, StudyAborted, UsageError


def run_mapped(task: Callable[[], int], prog: str, note: Callable[[str], object] = lambda _outcome: None) -> int:
    """Run ``task`` and return its exit code; ``note`` gets the outcome in a few words when it failed."""
    try:
        return task()
    except UsageError as exc:
        say(prog, f"error: {exc}")
        note(f"error: {exc}")
        return EXIT_USAGE
    except StudyAborted as exc:
        say(prog, f"error: {exc}")
        note(f"error: {exc}")
        return EXIT_CRASH
    except EnvironmentFault as exc:
        note(f"environment failed: {exc}")
        say(prog, f"error: {exc} (the environment failed, not the model: fix it and rerun; "
                  "the trial in flight is not charged to the budget)")
        return EXIT_CRASH
    except KeyboardInterrupt as exc:
        note("stopped")
        closed = ("the tracking store did not answer: the next start closes the MLflow runs left RUNNING as KILLED"
                  if faults.closing_failed() else "MLflow runs closed as KILLED")
        say(prog, f"{exc if isinstance(exc, faults.Stopped) else 'interrupted'}: {closed}; a study's trial in "
                  "flight runs again on the next start")
        return faults.signal_exit_code(exc)
    except Exception:
        traceback.print_exc()
        say(prog, "crashed (a bug or an environment problem; the traceback is above)")
        note("crashed")
        return EXIT_CRASH


def say(prog: str, text: str) -> None:
    """One line on stderr, passwords redacted (none when stderr is gone: a closed pipe or terminal
    must not turn the outcome into a crash)."""
    with contextlib.suppress(OSError, ValueError):
        print(f"{prog}: {secrets.redact_text(text)}", file=sys.stderr, flush=True)
