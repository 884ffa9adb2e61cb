"""MLflow writes a finished trial leaves behind, done by one thread while the next trial trains.

A study in this process logs the model of every trial that beats the best (some 80-150 ms
warm on digits, 0.5 s for the first one) and each trial's params, ``config.yaml`` and dataset
input (some 35 ms). None of them decides
anything the study does next, so the in-process runner hands them to a :class:`Backlog`:
its one thread writes them, in order, while the next trial trains.

*While it trains*, not as soon as they are handed over: the writes are Python, and so is
what the study does between two trials (tell Optuna, sample, start the run, build the
model). Two threads that both want Python's lock share it, so a write done then only made
the study's own steps that much slower (measured: no trial was sooner). A Keras model's
epochs after the first run outside that lock: a trial that trained for epochs calls
:meth:`Backlog.pause` once its training returns, and the next trial :meth:`Backlog.resume`
at its epoch 1 (or :data:`PAUSE_LIMIT` seconds later, whichever comes first: another worker
of the study may wait for the model). A family without epochs (scikit-learn) never pauses
it: its writes run as soon as they are handed over (they win nothing there, and lose nothing).

What the study relies on:

- :meth:`Backlog.wait` returns once everything handed over is written (the study calls it
  before it judges the best model on the test split and before it promotes one); a write
  that failed is raised there, or by the next :meth:`Backlog.submit`, as it was raised in
  the thread (a full disk or a dead store stays an environment fault: exit 3).
- A write whose answer the tracking server cut off mid-way (killed or restarted while it
  answered) is sent once more: MLflow retries a refused connection, not a broken answer, and
  every write handed over here is idempotent (params of the same value, files overwritten,
  the pending model finalized).
- After a failed write the writes still queued are dropped (the store that failed one
  would fail the others, each after its retries).
- :meth:`Backlog.close` waits for what was handed over, and raises nothing: it runs when
  the study is already ending, on an error or a signal.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from mlops_tune.records.stores import fail_fast
from mlops_tune.runtime.faults import broken_response, classify
from mlops_tune.runtime.retries import retrying

#: the longest a write waits for the next trial's epoch 1 (a model others wait for: ``models.model_ready``)
PAUSE_LIMIT = 5.0

_Item = tuple[str, Callable[[], None]] | threading.Event | None


T = TypeVar("T")


def take(items: queue.SimpleQueue[T | None]) -> T | None:
    """The next item for a helper thread, or None: its owner put None (closed), or the main
    thread is gone (never closed: the helper must not hold the interpreter's exit)."""
    while True:
        try:
            return items.get(timeout=1.0)
        except queue.Empty:
            if not threading.main_thread().is_alive():
                return None


class Backlog:
    """One writer thread for a trial's leftover MLflow writes (see the module's text)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._failed = False
        self._open = threading.Event()  # set: writes may run now (see the module's text)
        self._paused_at = 0.0
        self._open.set()

    def submit(self, what: str, write: Callable[[], None]) -> None:
        """Hand ``write`` (described by ``what``, e.g. "the model of trial 3") to the thread.

        Raises:
            Exception: an earlier write failed (raised once).
        """
        self.raise_error()
        if self._thread is None:
            # not a daemon: the interpreter must not finalize under a thread inside SQLite or TensorFlow
            self._thread = threading.Thread(target=self._work, name="mlops-tune-backlog")
            self._thread.start()
        self._queue.put((what, write))

    def resume(self) -> None:
        """Writes may run from now on (the caller's thread is busy outside Python's lock)."""
        self._open.set()

    def pause(self) -> None:
        """No write starts from now on until :meth:`resume`, or for :data:`PAUSE_LIMIT` seconds
        at most (a model others wait for: ``models.model_ready``); one under way ends."""
        self._paused_at = time.monotonic()
        self._open.clear()

    def wait(self) -> None:
        """Wait until every write handed over is done; raise the error of one that failed."""
        self._open.set()
        if self._thread is not None:
            done = threading.Event()
            self._queue.put(done)
            while not done.wait(0.5):
                if not self._thread.is_alive():
                    break
        self.raise_error()

    def raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Wait for the writes handed over, then end the thread (errors are not raised here)."""
        self._open.set()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    @property
    def failed(self) -> bool:
        """Whether a write failed (its error may already have been raised)."""
        return self._failed

    def _work(self) -> None:
        while True:
            item = take(self._queue)
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            if self._failed:
                continue  # dropped: see the module's text
            what, write = item
            while not self._open.wait(min(1.0, max(0.0, self._paused_at + PAUSE_LIMIT - time.monotonic()))):
                if not threading.main_thread().is_alive():
                    return
                if time.monotonic() >= self._paused_at + PAUSE_LIMIT:
                    break
            self._write(what, write)

    def _write(self, what: str, write: Callable[[], None]) -> None:
        try:  # the server went away mid-answer: once more (every write here is idempotent)
            for attempt in retrying(broken_response, 2, 0.0):
                with attempt:
                    write()
        except BaseException as exc:  # raised on the study's thread by wait() or submit()
            fault = classify(exc)
            if fault is not None and fault.component == "tracking":
                fail_fast()  # the store is gone: no minutes of retries for what follows
            exc.add_note(f"(while writing {what} in the background)")
            self._failed, self._error = True, exc
