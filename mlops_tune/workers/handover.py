"""How a container worker gets its :class:`~mlops_tune.workers.loop.Assignment`: it asks the study.

A ``runner=docker`` worker starts before the study has checked its data, opened its stores and
created its parent run, so that the container's start and its imports (seconds) overlap the
study's own start-up; it learns which study to join only once the study knows. The study
listens on 127.0.0.1 (:class:`Desk`, :mod:`multiprocessing.connection`); a worker that has
imported its libraries connects, names itself and is sent its assignment as soon as there is
one (:func:`ask`). The connection is authenticated with a key that only the study and its
workers hold (``multiprocessing.connection``'s ``authkey``: an HMAC challenge before anything is
read), and what goes over it is JSON, never a pickle. The address and the key reach a worker in
its environment (:data:`ADDRESS_ENV`, :data:`KEY_ENV`; for a container, in an env file only the
invoking user can read), never on a command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Listener
from typing import Any

#: ``HOST:PORT`` of the study's desk, and its key (hex), in a worker's environment
ADDRESS_ENV, KEY_ENV = "MLOPS_TUNE_STUDY_DESK", "MLOPS_TUNE_STUDY_KEY"


class Desk:
    """The study's side: answers every worker that asks with ``assign(its name)`` (a JSON-able
    dict), once :meth:`open` was called; a worker that asks earlier waits."""

    def __init__(self) -> None:
        self.key = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=self.key)
        host, port = self._listener.address
        self.address = f"{host}:{port}"
        self._assign: Callable[[str], dict[str, Any]] | None = None
        self._opened = threading.Event()
        self._closed = False
        threading.Thread(target=self._serve, name="mlops-tune-desk", daemon=True).start()

    def environment(self) -> dict[str, str]:
        """What a worker needs in its environment to ask."""
        return {ADDRESS_ENV: self.address, KEY_ENV: self.key.hex()}

    def open(self, assign: Callable[[str], dict[str, Any]]) -> None:
        """From now on a worker that asks gets ``assign(its name)``."""
        self._assign = assign
        self._opened.set()

    def close(self) -> None:
        """No more answers: a worker still waiting, or asking later, gets none (it is being stopped)."""
        self._closed = True
        self._opened.set()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _serve(self) -> None:
        while not self._closed:
            try:
                connection = self._listener.accept()
            except OSError:  # closed
                return
            except Exception:  # a caller without the key (AuthenticationError), or one that hung up
                continue
            threading.Thread(target=self._answer, args=(connection,), name="mlops-tune-desk-answer",
                             daemon=True).start()

    def _answer(self, connection: Any) -> None:
        # a failure to assign (the tracking server gone) closes the connection: the worker fails
        with connection, contextlib.suppress(Exception):
            name = connection.recv_bytes(256).decode()
            self._opened.wait()
            if self._closed or self._assign is None:
                return
            connection.send_bytes(json.dumps(self._assign(name)).encode())


def ask(name: str) -> dict[str, Any]:
    """The worker's side: what the study named in this process's environment assigns worker
    ``name`` (waits until it has something). Raises ``OSError``/``EOFError`` when the study is gone
    or stopped without assigning it."""
    host, _, port = os.environ[ADDRESS_ENV].rpartition(":")
    key = bytes.fromhex(os.environ.pop(KEY_ENV, ""))  # asked once; not left for the trials' code to see
    with Client((host, int(port)), authkey=key) as connection:
        connection.send_bytes(name.encode())
        return dict(json.loads(connection.recv_bytes()))
