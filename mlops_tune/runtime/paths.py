"""Paths mlops-tune creates, checked before anything is written, and names made fit to be
one folder name.

A path from the config (a store's file, ``report.junit``, an output folder) is refused with one
line (exit 2) when the file system could not take it: a name longer than the file system allows,
a file where a folder must be. A study name becomes a folder of a multirun through
:func:`folder_name`: it cannot climb out of the sweep folder (``../``) or be too long.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mlops_tune.runtime.errors import UsageError

#: the longest folder name :func:`folder_name` makes (a longer name keeps its start and a digest)
MAX_FOLDER_NAME = 100


def shown(path: str | os.PathLike[str], width: int = 40) -> str:
    """``path`` for a message: each name longer than ``width`` shortened in its middle."""
    parts = [p if len(p) <= width else f"{p[:width // 2]}...{p[-8:]}" for p in str(path).split("/")]
    return "/".join(parts)


def check_creatable(path: str | os.PathLike[str], key: str) -> None:
    """Refuse a file path that the study will create (or write) and the file system cannot take.

    Raises:
        UsageError: a name in it is longer than the file system allows (``File name too long``),
            or an existing part of it that must be a folder is a file.
    """
    file = Path(path).expanduser().absolute()
    existing = next((p for p in file.parents if p.exists()), Path("/"))
    try:
        limit = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    long = [part for part in file.parts if len(os.fsencode(part)) > limit]
    if long:
        raise UsageError(f"{key}: {shown(path)}: file name too long ({len(os.fsencode(long[0]))} bytes in one "
                         f"name; the file system takes {limit})")
    if not existing.is_dir():
        raise UsageError(f"{key}: {shown(existing)} is a file, so {shown(path)} cannot be created")


def folder_name(name: str) -> str:
    """``name`` as ONE folder name: separators, control characters and leading dots replaced by
    ``_``; longer than :data:`MAX_FOLDER_NAME` characters, its start and a digest of the whole."""
    safe = "".join("_" if c in "/\\" or not c.isprintable() else c for c in str(name))
    safe = "_" + safe[1:] if safe.startswith(".") else safe
    if len(safe) > MAX_FOLDER_NAME:
        digest = hashlib.sha256(str(name).encode()).hexdigest()[:8]
        safe = f"{safe[:MAX_FOLDER_NAME - 9]}-{digest}"
    return safe or "_"
