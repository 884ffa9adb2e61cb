"""Errors that map onto the public exit codes (see DESIGN.md)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_MISSED = 1
EXIT_USAGE = 2
EXIT_CRASH = 3


class UsageError(Exception):
    """Bad usage, config or data: reported as one line, exit code 2.

    The message names the offending key or file, e.g.
    ``data.target: column 'label' not in /tmp/x.csv (columns: a, b)``.
    """


class StudyAborted(Exception):
    """A study stopped because too many trials failed in a row: exit code 3."""
