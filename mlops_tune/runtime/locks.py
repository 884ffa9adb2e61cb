"""An exclusive lock file, for what several processes on one machine must not do at once
(creating a SQLite store's schema, merging into one JUnit file, a journal study's claims).
The one lock implementation of the package: ``filelock``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on the lock file ``path`` (``filelock``; created, with its folder, if needed)."""
    from filelock import FileLock

    lock_path = Path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_path):
        yield


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].partition("?")[0]
    return None if not path or path == ":memory:" else Path(path).expanduser().absolute()


@contextlib.contextmanager
def sqlite_schema(url: str) -> Iterator[None]:
    """Serialize schema creation of a SQLite store between processes: a lock next to the file.

    MLflow and Optuna both create (and migrate) their tables on first use; two processes
    doing it at once on a new file fail with ``duplicate column`` or ``table exists``.
    """
    path = sqlite_path(url)
    with contextlib.ExitStack() as stack:
        if path is not None and os.access(path.parent, os.W_OK):  # read-only: nobody creates there
            stack.enter_context(exclusive(path.with_name(path.name + ".lock")))
        yield
