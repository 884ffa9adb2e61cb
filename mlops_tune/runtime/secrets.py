"""Keeping passwords out of everything mlops-tune writes or prints.

A password given inside ``tracking.uri`` or ``study.storage`` (``http://alice:pw@host``,
``postgresql+psycopg2://user:pw@host/db``) is taken out of the URL before Hydra records
the command line, and handed to the libraries the documented way instead:

* an MLflow server: ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``;
* PostgreSQL: a private password file (``PGPASSFILE``, mode 0600, removed at exit) that
  also holds the entries of the user's own ``PGPASSFILE`` / ``~/.pgpass``.

Both reach trial processes (``runner=mlflow``) through the environment, and containers
through the runner's env file. Every text that may quote a URL (errors, tags, attributes,
saved configs) also goes through :func:`redact_text`, and known passwords are replaced in
this process's stdout and stderr (:func:`guard_streams`).
"""

from __future__ import annotations

import atexit
import os
import re
import tempfile
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
#: ``scheme://user:password@`` anywhere in a text
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<user>[^:@/\s'\"]*):(?P<password>[^@\s'\"]*)@")
_known: set[str] = set()
_pgpass: Path | None = None
#: the lines this process put in its private PGPASSFILE (the passwords of its own URLs)
_entries: list[str] = []


def remember(secret: str) -> None:
    """Add ``secret`` to the texts :func:`redact_text` and the guarded streams mask."""
    if secret and len(secret) >= 3:
        _known.add(secret)
        decoded = unquote(secret)
        if decoded != secret:
            _known.add(decoded)


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to print or log)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:{MASK}@{host}" if parts.username else f"{MASK}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def redact_text(text: str) -> str:
    """``text`` with every ``scheme://user:password@`` password and every known secret masked."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}://{m['user']}:{MASK}@", text)
    for secret in sorted(_known, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def redact_config(value: Any) -> Any:
    """A copy of a plain config with every URL password replaced by ``***``."""
    if isinstance(value, dict):
        return {key: redact_config(sub) for key, sub in value.items()}
    if isinstance(value, list):
        return [redact_config(sub) for sub in value]
    return redact_text(value) if isinstance(value, str) else value


def move_credentials(text: str) -> str:
    """``text`` with the password of every URL in it moved to where the libraries read it.

    HTTP(S) URLs lose their whole user part (MLflow's basic auth comes from
    ``MLFLOW_TRACKING_USERNAME/PASSWORD``, and requests would otherwise send the URL's user
    with an empty password); PostgreSQL URLs keep the user name, the password goes to the
    private ``PGPASSFILE``. Other schemes keep their password (it is still masked in output).
    """

    def move(match: re.Match[str]) -> str:
        scheme, user, password = match["scheme"].lower(), match["user"], match["password"]
        remember(password)
        if scheme in ("http", "https"):
            os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
            os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
            return f"{match['scheme']}://"
        if scheme.split("+")[0] in ("postgresql", "postgres"):
            tail = text[match.end():]
            _add_pgpass(tail, unquote(user), unquote(password))
            return f"{match['scheme']}://{user}@"
        return match.group(0)

    return _USERINFO.sub(move, text)


def write_private(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by this user only and appearing whole: written under
    a name of its own beside it, then renamed. Writers of the same file at once (the warm
    workers of a study starting together) neither fail on each other's file nor read one
    half-written."""
    path = Path(path)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _add_pgpass(tail: str, user: str, password: str) -> None:
    """Add ``host:port:db:user:password`` for the URL whose rest (``host:port/db...``) is ``tail``."""
    parts = urlsplit(f"postgresql://{tail}")
    host, port = parts.hostname or "localhost", parts.port or 5432
    database = parts.path.lstrip("/").split("/")[0] or "*"

    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace(":", "\\:")

    add_pgpass_entries([":".join(esc(v) for v in (host, str(port), database, user, password))])


def pgpass_entries() -> list[str]:
    """The ``host:port:db:user:password`` lines this process added to its private ``PGPASSFILE``
    (the user's own file's entries are not among them)."""
    return list(_entries)


def add_pgpass_entries(lines: list[str]) -> None:
    """Put ``lines`` first in this process's private ``PGPASSFILE`` (made on first use, holding
    the user's own entries after ours; removed at exit); their passwords are masked in output."""
    global _pgpass
    if not lines:
        return
    if _pgpass is None:
        fd, name = tempfile.mkstemp(prefix="mlops-tune-pgpass-")  # mode 0600
        os.close(fd)
        _pgpass = Path(name)
        existing = os.environ.get("PGPASSFILE") or str(Path.home() / ".pgpass")
        own = Path(existing).read_text() if Path(existing).is_file() else ""
        _pgpass.write_text(own if own.endswith("\n") or not own else own + "\n")
        os.environ["PGPASSFILE"] = name
        atexit.register(_pgpass.unlink, missing_ok=True)
    for line in lines:
        remember(re.split(r"(?<!\\):", line)[-1].replace("\\:", ":").replace("\\\\", "\\"))
        _entries.append(line)
    # first match wins in libpq: our entries go before the user's own
    _pgpass.write_text("".join(f"{line}\n" for line in lines) + _pgpass.read_text())


class _RedactingStream:
    """Writes through to ``inner`` with known secrets masked; everything else (``fileno``,
    ``isatty``, ``encoding`` ...) is the inner stream's."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        self.inner.write(redact_text(text) if _known else text)
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def guard_streams() -> None:
    """Mask known secrets in what this process prints through ``sys.stdout`` / ``sys.stderr``."""
    import sys

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, _RedactingStream):
            setattr(sys, name, _RedactingStream(stream))


def redact_files(folder: Path, names: tuple[str, ...]) -> None:
    """Mask URL passwords in the files ``names`` of ``folder`` (Hydra's saved configs)."""
    for name in names:
        path = folder / name
        try:
            text = path.read_text()
        except OSError:
            continue
        clean = redact_text(text)
        if clean != text:
            path.write_text(clean)
