"""Telling a failure of the environment from a failure of the model.

A trial whose model fails (bad hyperparameters, divergence, an exception in ``fit``)
fails that trial and the study goes on. A failure of what the study stands on (the
MLflow tracking store or server, the Optuna storage, the disk, permissions) stops the
study at once with exit code 3 and ONE line naming the component; the trial in flight
is given back to the budget and runs again on the next start. This module decides which
is which, from the exception's type (each library wraps its own store's errors: MLflow
in ``MlflowException``, Optuna in ``StorageInternalError``) and, for the disk, its errno.

Example::

    fault = classify(exc, tracking_uri="sqlite:////w/mlflow.db", storage_url="sqlite:////w/optuna.db")
    if fault is not None:
        raise fault from exc       # exit 3, one line
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from mlops_tune.runtime.errors import EnvironmentFault, first_line
from mlops_tune.runtime.secrets import redact, redact_text

#: errnos that say the disk or its permissions failed, not the model
DISK_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file size limit",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "I/O error",
}
#: what SQLite says, and the same in the words of :data:`DISK_ERRNOS`
_SQLITE_TEXTS = {
    "database or disk is full": "no space left on device",
    "attempt to write a readonly database": "the database file is read-only",
    "unable to open database file":
        "the database cannot be written (read-only file system, no permission, or its folder is gone)",
    "disk i/o error": "I/O error",
    "readonly database": "the database file is read-only",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_type(exc: BaseException, module_prefix: str, *names: str) -> bool:
    return any(cls.__module__.startswith(module_prefix) and (not names or cls.__name__ in names)
               for cls in type(exc).__mro__)


def broken_response(exc: BaseException) -> bool:
    """Whether ``exc`` is a tracking server's answer cut off mid-way (the server was killed or
    restarted while it answered: ``Connection broken: IncompleteRead``). MLflow's HTTP retries
    cover a server that refuses connections, not an answer that stops: such a request, if
    idempotent, is worth sending once more (MLflow's retries then wait for the server)."""
    return any(_is_type(link, "requests", "ChunkedEncodingError") or _is_type(link, "urllib3", "ProtocolError")
               or _is_type(link, "http.client", "IncompleteRead") for link in _chain(exc))


def _sqlite_words(text: str) -> str | None:
    lowered = text.lower()
    return next((words for key, words in _SQLITE_TEXTS.items() if key in lowered), None)


def _store_label(url: str, kind: str) -> str:
    if url.startswith("sqlite:"):
        return f"{kind} {url.split(':///', 1)[-1]}"
    if url.startswith("journal:"):
        return f"{kind} {url.split(':', 1)[1].removeprefix('//')}"
    if urlsplit(url).scheme in ("http", "https"):
        return f"MLflow server at {redact(url)}"
    return f"{kind} at {redact(url)}"


def _first_line(exc: BaseException) -> str:
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if _is_type(exc, "grpc") and callable(code) and callable(details):  # its str() starts "<_InactiveRpcError of"
        with contextlib.suppress(Exception):
            return redact_text(f"gRPC {code().name}: {first_line(str(details()), 200)}")
    return redact_text(first_line(exc, 240))


def not_found(exc: BaseException) -> bool:
    """Whether an MLflow error says that what was asked for is not in the store (a run, a model,
    a registered model or alias), rather than that the store failed."""
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower()


def classify(exc: BaseException, *, tracking_uri: str = "", storage_url: str = "") -> EnvironmentFault | None:
    """The :class:`EnvironmentFault` that ``exc`` stands for, or None when it is not one."""
    if isinstance(exc, EnvironmentFault):
        return exc
    chain = list(_chain(exc))
    # the disk, whoever was writing
    for link in chain:
        if isinstance(link, OSError) and link.errno in DISK_ERRNOS:
            where = f" writing {link.filename}" if link.filename else ""
            return EnvironmentFault("disk", f"{DISK_ERRNOS[link.errno]}{where}")
    tracking = _store_label(tracking_uri, "MLflow tracking store")
    storage = _store_label(storage_url, "Optuna storage")
    for link in chain:
        if _is_type(link, "requests", "ConnectionError", "Timeout", "RetryError", "ChunkedEncodingError") \
                or _is_type(link, "urllib3", "MaxRetryError", "NewConnectionError", "ProtocolError"):
            return EnvironmentFault("tracking", f"{tracking} stopped answering ({_first_line(link)})")
    if any(_is_type(link, "mlflow", "MlflowException") for link in chain):
        text = " ".join(str(link) for link in chain)
        words = _sqlite_words(text)
        if "API request to" in text or "Max retries exceeded" in text or "Connection refused" in text:
            return EnvironmentFault("tracking", f"{tracking} stopped answering")
        if words:
            return EnvironmentFault("tracking", f"{tracking}: {words}")
        return EnvironmentFault("tracking", f"{tracking} failed: {_first_line(chain[0])}")
    if any(_is_type(link, "optuna.exceptions", "StorageInternalError") or _is_type(link, "sqlalchemy.exc")
           or _is_type(link, "sqlite3") or _is_type(link, "psycopg2") or _is_type(link, "grpc")
           for link in chain):
        words = _sqlite_words(" ".join(str(link) for link in chain))
        detail = words or _first_line(next(
            (link for link in reversed(chain) if not _is_type(link, "optuna.exceptions")), chain[0]))
        return EnvironmentFault("storage", f"{storage}: {detail}")
    return None


@contextlib.contextmanager
def classified(*, tracking_uri: str = "", storage_url: str = "") -> Iterator[None]:
    """Re-raise failures of the environment inside the block as :class:`EnvironmentFault`."""
    try:
        yield
    except Exception as exc:
        fault = classify(exc, tracking_uri=tracking_uri, storage_url=storage_url)
        if fault is None or fault is exc:
            raise
        raise fault from exc


#: the signals that stop a job like Ctrl-C: SIGINT (a terminal), SIGTERM (Jenkins' abort, ``kill``),
#: SIGHUP (the terminal or the ssh session closed); the exit code is 128 + the signal's number
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal (:data:`STOP_SIGNALS`): unwinds like Ctrl-C so that runs are closed as KILLED."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C / SIGINT, 143 for SIGTERM, 129 for SIGHUP."""
    return exc.exit_code if isinstance(exc, Stopped) else 128 + signal.SIGINT


#: modules whose code a signal must not cut in two: a store call interrupted half-way leaves its
#: SQLite transaction open in this process, and every later write (closing the runs as KILLED)
#: waits on it for ever. A signal arriving there is delivered again a moment later.
#: (An HTTP call to a tracking server is not one of them: it holds no transaction here, and a
#: server that does not answer must not put a stop off.)
ATOMIC_MODULES = ("sqlalchemy", "sqlite3", "alembic", "psycopg2", "mlflow.store.tracking.sqlalchemy",
                  "mlflow.store.model_registry.sqlalchemy", "mlflow.store.db", "optuna.storages",
                  "mlops_tune.records.claims", "mlops_tune.runtime.locks")
#: how often (every 20 ms) a signal is put off before it is raised wherever the code is (2 s)
MAX_DEFERRALS = 100
#: seconds from a stop signal to the process's end: what is not closed by then (a store that does
#: not answer, a call blocked in C) is left to the next start, which closes it as KILLED
STOP_DEADLINE = 4.0
#: a stop's HTTP calls (closing the runs): one try each, waiting at most this many seconds
STOP_HTTP_TIMEOUT = "1"


#: where Python prints an exception and goes on ("Exception ignored in ..."): a finalizer, and
#: the weak-reference callbacks the garbage collector runs wherever the code happens to be
SWALLOWING = ("__del__",)
SWALLOWING_FILES = ("weakref.py", "_weakrefset.py")


def in_atomic_code(frame: Any) -> bool:
    """Whether ``frame`` or a caller of it runs in one of :data:`ATOMIC_MODULES`, or in code
    whose exceptions Python ignores (:data:`SWALLOWING`: a signal raised there would be lost,
    and the process would go on with SIGTERM ignored)."""
    while frame is not None:
        code = frame.f_code
        if (str(frame.f_globals.get("__name__", "")).startswith(ATOMIC_MODULES) or code.co_name in SWALLOWING
                or code.co_filename.endswith(SWALLOWING_FILES)):
            return True
        frame = frame.f_back
    return False


#: the signal of a stop already raised (see :func:`check_stopped`)
_stopped: list[int] = []
#: when the process ends at the latest after a stop (time.monotonic(); see :func:`_stop_deadline`)
_deadline: list[float] = []


#: a store that did not answer a closing call (its runs are left for the next start to close)
_unanswered: list[str] = []


def closing_unanswered(why: str) -> None:
    """A closing call got no answer from its store: no more closing calls to it, and the stop's
    line says the runs are left for the next start (see ``records.tracking.run``)."""
    _unanswered.append(why)


def closing_failed() -> bool:
    return bool(_unanswered)


def extend_stop(seconds: float) -> None:
    """A stop that waits for workers to close (their own grace): the process's deadline moves
    to ``seconds`` from now. No stop: nothing."""
    if _deadline:
        _deadline[0] = max(_deadline[0], time.monotonic() + seconds)


_deadline_lock = threading.Lock()


def _stop_deadline(signum: int, prog: str) -> None:
    """The first stop signal: closing calls to a tracking server get one short try each, and
    the process ends :data:`STOP_DEADLINE` seconds later whatever still blocks it (a store that
    does not answer; a thread inside a call), saying so in one line."""
    with _deadline_lock:
        if _deadline:
            return
        _deadline.append(time.monotonic() + STOP_DEADLINE)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = STOP_HTTP_TIMEOUT

    def watch() -> None:
        while True:
            if not _deadline:  # the stop was forgotten (reset_stop)
                return
            left = _deadline[0] - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.1))
        name = signal.Signals(signum).name
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(OSError):
            os.write(2, f"{prog}: stopped by {name}: not everything was closed within {STOP_DEADLINE:g} s (a store "
                        "that does not answer?); the next start closes the runs left RUNNING as KILLED\n".encode())
        os._exit(128 + signum)

    threading.Thread(target=watch, name="mlops-tune-stop-deadline", daemon=True).start()


def check_stopped() -> None:
    """Raise :class:`Stopped` again where work would go on after a stop signal (an epoch's end,
    a worker's next trial). Its first raise was lost: some code dropped it (a bare ``except``,
    a callback whose errors Python ignores), and SIGTERM is ignored since, so the process
    would train on until it is killed, its runs left RUNNING. Call it only on forward paths,
    never where a study unwinds."""
    if _stopped:
        raise Stopped(_stopped[0])


def reset_stop() -> None:
    """Forget a stop (a process that installs the handlers anew, tests)."""
    _stopped.clear()
    _deadline.clear()
    _unanswered.clear()


def install_signal_handlers(prog: str = "mlops-tune") -> None:
    """The :data:`STOP_SIGNALS` raise :class:`Stopped` in the main thread, never inside a store
    call (see :data:`ATOMIC_MODULES`); :func:`check_stopped` raises it again if that raise was
    lost. The process ends within :data:`STOP_DEADLINE` seconds of the first one (see
    :func:`_stop_deadline`). On SIGHUP from a terminal that is gone, the output goes to
    /dev/null (writing to it would fail and cut the closing of the runs short)."""
    deferred = [0]
    reset_stop()

    def stop(signum: int, frame: Any) -> None:
        _stop_deadline(signum, prog)
        if deferred[0] < MAX_DEFERRALS and in_atomic_code(frame):
            deferred[0] += 1
            timer = threading.Timer(0.02, os.kill, (os.getpid(), signum))
            timer.daemon = True
            timer.start()
            return
        # a second signal while we close runs must not cut the closing short
        for each in STOP_SIGNALS:
            signal.signal(each, signal.SIG_IGN)
        if signum == signal.SIGHUP:
            _silence_hung_up_terminal()
        _stopped.append(signum)
        raise Stopped(signum)

    for each in STOP_SIGNALS:
        signal.signal(each, stop)
    _listen_for_stops(prog)


def _listen_for_stops(prog: str) -> None:
    """Start the stop's deadline even while the main thread is blocked inside C code (a SQLite
    lock wait, a PostgreSQL read), where the Python handler only runs once the call returns:
    Python's C-level handler writes every signal's number to a wake-up pipe, which a thread reads."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    try:
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: the Python handler alone
        os.close(read)
        os.close(write)
        return

    def listen() -> None:
        while data := os.read(read, 64):
            stops = [signum for signum in data if signum in STOP_SIGNALS]
            if stops:
                _stop_deadline(stops[0], prog)

    threading.Thread(target=listen, name="mlops-tune-signals", daemon=True).start()


def _silence_hung_up_terminal() -> None:
    """Point stdout and stderr at /dev/null where they are a terminal (after a hang-up every
    write to it fails with EIO, and ``isatty`` already says no: a character device is enough);
    pipes and files (a CI log) keep the closing lines."""
    import stat

    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if stat.S_ISCHR(os.fstat(fd).st_mode):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)


def quiet_background_faults() -> None:
    """A store failing under a background thread (Optuna's heartbeat) prints no traceback:
    the main thread meets the same fault at its next write and reports it in one line."""
    import threading

    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, Exception) and classify(args.exc_value) is not None:
            return
        default(args)

    threading.excepthook = hook
