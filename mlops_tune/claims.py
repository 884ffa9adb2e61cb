"""First-writer-wins claims shared by all workers of a study, kept next to the Optuna study.

Optuna's study attributes are last-writer-wins, which is not enough when two workers
start (or finish) at the same moment: both would create a parent run, or both would
promote a model. A claim is a row in a small table of our own in the study's database
(``mlops_tune_claims``, primary key = study + claim name): the INSERT of the first worker
succeeds, every later one fails on the key and reads the winner's value instead. For a
journal-file storage the same is done with an exclusive file lock.

Example::

    parent_run_id = claim(storage_url, "my-study", "parent_run", my_candidate_run_id)
    if parent_run_id != my_candidate_run_id:
        ...  # another worker won: use its run
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path
from typing import Any

_TABLE = "mlops_tune_claims"


def journal_path(storage_url: str) -> str:
    """The file of a ``journal:///path/to/file`` storage URL."""
    return storage_url.split(":", 1)[1].removeprefix("//")


def claim_ticket(storage_url: str, study: str, limit: int, owner: str) -> int | None:
    """Claim the next free trial ticket below ``limit``, or None when the budget is spent.

    Every trial a worker starts needs a ticket, so all workers together start at most
    ``limit`` trials (``study.n_trials``), however their asks interleave.
    """
    start = _count_tickets(storage_url, study)
    for index in range(start, limit):
        if claim(storage_url, study, f"ticket-{index}", owner) == owner:
            return index
    return None


def _count_tickets(storage_url: str, study: str) -> int:
    if storage_url.startswith("journal:"):
        return 0  # the file lock makes claiming from 0 cheap enough
    import sqlalchemy as sa

    engine = _engine(storage_url)
    table = _table(engine)
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(
            table.c.study == study, table.c.name.like("ticket-%"))).scalar_one())


def claim(storage_url: str, study: str, name: str, value: str) -> str:
    """Claim ``name`` for ``study`` with ``value``; return the value that holds (the first one)."""
    if storage_url.startswith("journal:"):
        return _claim_file(Path(journal_path(storage_url) + ".claims"), study, name, value)
    return _claim_sql(storage_url, study, name, value)


_engines: dict[str, Any] = {}
_tables: dict[str, Any] = {}


def _engine(url: str) -> Any:
    if url not in _engines:
        import sqlalchemy as sa

        connect_args = {"timeout": 60} if url.startswith("sqlite") else {}
        _engines[url] = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args=connect_args)
    return _engines[url]


def _table(engine: Any) -> Any:
    key = str(engine.url)
    if key not in _tables:
        import sqlalchemy as sa

        table = sa.Table(
            _TABLE, sa.MetaData(),
            sa.Column("study", sa.String(512), primary_key=True),
            sa.Column("name", sa.String(128), primary_key=True),
            sa.Column("value", sa.String(2048), nullable=False),
        )
        with contextlib.suppress(sa.exc.IntegrityError, sa.exc.OperationalError, sa.exc.ProgrammingError):
            table.create(engine, checkfirst=True)  # a concurrent creator may win: fine
        _tables[key] = table
    return _tables[key]


def _claim_sql(url: str, study: str, name: str, value: str) -> str:
    import sqlalchemy as sa

    engine = _engine(url)
    table = _table(engine)
    try:
        with engine.begin() as conn:
            conn.execute(table.insert().values(study=study, name=name, value=value))
        return value
    except sa.exc.IntegrityError:
        with engine.connect() as conn:
            row = conn.execute(
                sa.select(table.c.value).where(table.c.study == study, table.c.name == name)
            ).one()
        return str(row[0])


def _claim_file(path: Path, study: str, name: str, value: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            claims = json.loads(handle.read() or "{}")
            key = f"{study}\t{name}"
            if key not in claims:
                claims[key] = value
                handle.seek(0)
                handle.truncate()
                handle.write(json.dumps(claims))
                handle.flush()
            return str(claims[key])
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
