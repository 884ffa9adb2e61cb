"""Errors that map onto the public exit codes (see the README's exit-code table)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_MISSED = 1
EXIT_USAGE = 2
EXIT_CRASH = 3


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text (its type name when it has none), at most ``limit`` long."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


class UsageError(Exception):
    """Bad usage, config or data: reported as one line, exit code 2.

    The message names the offending key or file, e.g.
    ``data.target: column 'label' not in /tmp/x.csv (columns: a, b)``.
    """


class StudyAborted(Exception):
    """A study stopped because too many trials failed in a row: exit code 3."""


class EnvironmentFault(Exception):
    """What the study stands on failed while it ran (exit code 3, one line).

    ``component`` is ``tracking`` (MLflow store or server), ``storage`` (Optuna storage),
    ``disk`` or ``registry``; the message names it and, where known, the file or URL.
    The trial in flight is not charged to the budget (see ``mlops_tune.faults``).
    """

    def __init__(self, component: str, message: str) -> None:
        super().__init__(message)
        self.component = component


class TrialFailed(Exception):
    """The model of one trial failed (not the environment): the trial is FAIL, the study goes on."""
