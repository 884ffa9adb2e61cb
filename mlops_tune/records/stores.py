"""Where the MLflow store is and whether it can be used: URI helpers, up-front checks, HTTP
retries, how SQLite files are written.

Checked before anything is written (exit 2 when unusable): a server answers ``/health``,
a SQLite file or file store can be written. Used by the study's and the trial's process.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from mlops_tune.runtime import locks, paths
from mlops_tune.runtime.errors import UsageError
from mlops_tune.runtime.secrets import redact, redact_text


def absolute_sqlite(uri: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/cwd/rel.db``; other URIs unchanged.

    Trials run in other processes (and folders) must open the same file.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri.startswith(prefix + "/") or uri == prefix + ":memory:":
        return uri
    path, _, query = uri[len(prefix):].partition("?")
    absolute = str(Path(path).expanduser().absolute())
    return f"{prefix}{absolute}" + (f"?{query}" if query else "")


def check_reachable(uri: str) -> None:
    """Raise :class:`UsageError` when ``uri`` is a server that does not answer or a store that
    cannot be written (a read-only SQLite file or folder)."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        _check_server(uri)
    elif parts.scheme == "sqlite":
        path = locks.sqlite_path(uri)
        if path is None:
            return
        paths.check_creatable(path, "tracking.uri")
        if not path.parent.is_dir():
            raise UsageError(f"tracking.uri: folder of the SQLite file does not exist: {redact(uri)}")
        writable = os.access(path, os.W_OK) if path.exists() else os.access(path.parent, os.W_OK)
        if not writable:
            raise UsageError(f"tracking.uri: the SQLite file {path} is read-only (read-only file system "
                             "or no write permission); point tracking.uri at a writable file")
    elif parts.scheme in ("", "file"):
        _check_file_store(Path(parts.path if parts.scheme else uri).expanduser().absolute(), uri)
    elif parts.scheme not in ("postgresql", "mysql", "mssql", "databricks") and "+" not in parts.scheme:
        raise UsageError(f"tracking.uri: unsupported scheme '{parts.scheme}' in {redact(uri)}")


def _check_file_store(folder: Path, uri: str) -> None:
    """A file store (``file:///path`` or a plain folder) must be a folder we can create and write."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise UsageError(f"tracking.uri: {folder} is not a folder an MLflow file store can live in")
    if not os.access(existing, os.W_OK) or str(existing).startswith(("/proc", "/sys")):
        raise UsageError(f"tracking.uri: cannot create or write the MLflow file store {folder} "
                         f"({existing} is not writable); use e.g. sqlite:///mlflow.db")


def _check_server(uri: str) -> None:
    parts = urlsplit(uri)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    request = urllib.request.Request(f"{urlunsplit(parts._replace(netloc=netloc)).rstrip('/')}/health")
    # basic auth as MLflow sends it: from the environment (where a password in the URI is moved)
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if parts.username is not None:
        user, password = parts.username, parts.password or ""
    if user is not None and password is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5):
            pass
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UsageError(f"tracking.uri: cannot reach the MLflow server at {redact(uri)} "
                         f"({redact_text(str(reason))})") from None


#: seconds an HTTP request to the tracking server may wait for a byte (MLflow's default: 120)
HTTP_TIMEOUT = "20"


def configure_http() -> None:
    """MLflow's HTTP retries and deadline: ride out a server restart of ~15 s, give up on a dead
    server after about half a minute, and on a server that accepts connections but never
    answers (a stopped process, a full queue) after ``6 x 20 s`` plus the backoff, ~2.5 minutes.

    MLflow's own defaults (7 retries, backoff up to 2 minutes, 120 s per request) keep a study
    waiting for minutes on a dead server and ~15 minutes on a silent one. Every variable keeps
    the user's value when set (``MLFLOW_HTTP_REQUEST_TIMEOUT``, ``..._MAX_RETRIES``, ``..._BACKOFF_FACTOR``).
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT)


def fail_fast(timeout: float | None = None) -> None:
    """No more HTTP retries in this process: the tracking server is known to be gone (and with
    ``timeout``, no request waits longer for it: it did not answer)."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    if timeout is not None:
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout)


#: ``0`` keeps SQLite files in their own journal mode, synchronous=FULL (see :func:`write_ahead_sqlite`)
WAL_SWITCH = "MLOPS_TUNE_SQLITE_WAL"
#: file systems where SQLite's write-ahead log must not be used (its index is shared memory)
_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "afs", "gpfs", "fuse")
_wal_installed = False


def write_ahead_sqlite(url: str) -> None:
    """With ``url`` a SQLite URL: the SQLite files this process opens through SQLAlchemy
    (MLflow's store, Optuna's storage, the budget claims) use a write-ahead log with
    ``synchronous=NORMAL``.

    A trial makes some 40 small transactions (run, params, attributes, the Optuna trial); in
    SQLite's default rollback journal each one waits for two fsyncs, and readers wait for
    writers. With WAL a commit is an append, readers and one writer go on together, and the file
    is never corrupted by a crash; a power cut may lose the last commits (not a process kill).
    Files on network file systems keep their mode (WAL needs one host); ``MLOPS_TUNE_SQLITE_WAL=0``
    turns this off. Idempotent."""
    global _wal_installed
    if _wal_installed or not url.startswith("sqlite:") or os.environ.get(WAL_SWITCH, "1") == "0":
        return
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def on_connect(dbapi_connection: object, _record: object) -> None:
        if not isinstance(dbapi_connection, sqlite3.Connection):
            return
        try:
            row = dbapi_connection.execute("PRAGMA database_list").fetchone()
            path = row[2] if row else ""
            if not path or _on_network_fs(path):
                return
            mode = dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                dbapi_connection.execute("PRAGMA journal_mode=WAL")
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error:
            pass  # read-only, busy or unusual: the file works as it is, only slower

    event.listen(Engine, "connect", on_connect)
    _wal_installed = True


@functools.lru_cache(maxsize=64)
def _on_network_fs(path: str) -> bool:
    """Whether ``path`` lies on a network (or FUSE) file system, by /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo") as mounts:
            return filesystem_of(path, mounts.read()).startswith(_NETWORK_FS)
    except OSError:
        return False


def filesystem_of(path: str, mountinfo: str) -> str:
    """The file system type of the mount holding ``path``, from the text of a ``mountinfo``."""
    target, best, fstype = os.path.realpath(path), "", ""
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields = head.split()
        if not sep or len(fields) < 5 or not tail.split():
            continue
        point = fields[4].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, tail.split()[0]
    return fstype


def template_folder() -> Path:
    """Where migrated, empty MLflow SQLite stores are kept (one per MLflow version)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlops-tune"


def seed_new_sqlite_store(uri: str) -> bool:
    """A new local SQLite tracking store starts as a copy of a migrated, empty one.

    MLflow creates a new store by running its ~60 schema migrations (3.3 s here, every first
    run in a fresh CI workspace). The first such store on a machine is kept, without its
    Default experiment (MLflow creates that on first use, with this store's artifact root),
    in :func:`template_folder` and copied from then on. Anything unusual (another URI, an
    existing file, an unwritable cache, a failed copy) leaves the store to MLflow.
    Returns whether the store was seeded.
    """
    path = locks.sqlite_path(uri)
    if path is None or path.exists() or not os.access(path.parent, os.W_OK):
        return False
    staging = path.with_name(f".{path.name}.{os.getpid()}.seed")
    try:
        import shutil

        shutil.copyfile(_template(), staging)
        os.replace(staging, path)
        return True
    except Exception:
        with contextlib.suppress(OSError):
            staging.unlink()
        return False


def _template() -> Path:
    """The migrated, empty store for this MLflow version, made once per machine."""
    import sqlite3

    import mlflow
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = template_folder()
    template = folder / f"mlflow-{mlflow.__version__}.db"
    if template.exists():
        try:  # a migrated store: a schema version and no experiment
            with contextlib.closing(sqlite3.connect(f"file:{template}?mode=ro", uri=True)) as conn:
                version = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                experiments = conn.execute("SELECT COUNT(*) FROM experiments").fetchone()[0]
            if version and experiments == 0:
                return template
        except sqlite3.Error:
            pass
        template.unlink()  # damaged: made again below
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".mlflow-{mlflow.__version__}.{os.getpid()}.db"
    try:
        store = SqlAlchemyStore(f"sqlite:///{staging}", str(folder / "mlruns"))
        store.engine.dispose()
        with contextlib.closing(sqlite3.connect(staging)) as conn:
            with conn:
                conn.execute("DELETE FROM experiment_tags WHERE experiment_id = 0")
                conn.execute("DELETE FROM experiments WHERE experiment_id = 0")
            conn.execute("PRAGMA journal_mode=DELETE")  # the file alone holds it all: safe to copy
        os.replace(staging, template)
    finally:
        with contextlib.suppress(OSError):
            staging.unlink()
    return template
