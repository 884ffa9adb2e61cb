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
    The trial in flight is not charged to the budget (see ``mlops_tune.runtime.faults``).
    """

    def __init__(self, component: str, message: str) -> None:
        super().__init__(message)
        self.component = component


class TrialFailed(Exception):
    """The model of one trial failed (not the environment): the trial is FAIL, the study goes on."""


def check_int(value: object, key: str, low: int = 1, high: int | None = None) -> int:
    """``value`` as an integer in ``[low, high)``, else a :class:`UsageError` naming ``key``.

    ``bool`` is not an integer here (``true`` is not 1 trials).
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value >= high):
        if high is not None:
            wanted = f"an integer in [{low}, {high if high < 2**16 else '2**' + str(high.bit_length() - 1)})"
        else:
            wanted = {0: "an integer >= 0", 1: "a positive integer"}.get(low, f"an integer >= {low}")
        raise UsageError(f"{key}: must be {wanted}, got {value!r}")
    return value
