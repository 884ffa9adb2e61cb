"""First-writer-wins claims shared by all workers of a study, kept next to the Optuna study.

Optuna's study attributes are last-writer-wins, which is not enough when two workers
start (or finish) at the same moment: both would create a parent run, or both would
promote a model. A claim is a row in a small table of our own in the study's database
(``mlops_tune_claims``, primary key = study + claim name): the INSERT of the first worker
succeeds, every later one fails on the key and reads the winner's value instead. For a
journal-file storage the same is done under an exclusive file lock (``locks.exclusive``).
Only a study's coordinator makes these claims. The trial tickets every worker takes
(:class:`Tickets`) are trials of a companion study, so they need nothing but the Optuna storage.

Example::

    parent_run_id = claim(storage_url, "my-study", "parent_run", my_candidate_run_id)
    if parent_run_id != my_candidate_run_id:
        ...  # another worker won: use its run
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlops_tune.runtime import locks

_TABLE = "mlops_tune_claims"


def journal_path(storage_url: str) -> str:
    """The file of a ``journal:///path/to/file`` storage URL."""
    return storage_url.split(":", 1)[1].removeprefix("//")


def release(storage_url: str, study: str, name: str, value: str) -> bool:
    """Give back claim ``name`` if it still holds ``value`` (so a later holder keeps theirs)."""
    if storage_url.startswith("journal:"):
        return _release_file(_claims_file(storage_url), study, name, value)
    engine = _engine(storage_url)
    table = _table(engine)
    with engine.begin() as conn:
        deleted = conn.execute(table.delete().where(
            table.c.study == study, table.c.name == name, table.c.value == value))
    return bool(deleted.rowcount)


def claim(storage_url: str, study: str, name: str, value: str) -> str:
    """Claim ``name`` for ``study`` with ``value``; return the value that holds (the first one)."""
    if storage_url.startswith("journal:"):
        return _claim_file(_claims_file(storage_url), study, name, value)
    return _claim_sql(storage_url, study, name, value)


_engines: dict[str, Any] = {}
_tables: dict[str, Any] = {}


def _engine(url: str) -> Any:
    if url not in _engines:
        import sqlalchemy as sa

        connect_args = ({"timeout": 60} if url.startswith("sqlite") else
                        {"connect_timeout": 5} if url.startswith("postgresql") else {})
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


def _claims_file(storage_url: str) -> Path:
    return Path(journal_path(storage_url) + ".claims")


def _read_file(path: Path) -> dict[str, str]:
    try:
        return dict(json.loads(path.read_text() or "{}"))
    except FileNotFoundError:
        return {}


@contextlib.contextmanager
def _locked_claims(path: Path) -> Iterator[dict[str, str]]:
    """The claims of a journal study under an exclusive lock (a lock file beside them); the caller
    may change them and :func:`_write` them."""
    with locks.exclusive(path.with_name(path.name + ".lock")):
        yield _read_file(path)


def _write(path: Path, claims: dict[str, str]) -> None:
    """Replace the claims file whole (readers without the lock never see it half-written)."""
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(json.dumps(claims), encoding="utf-8")
    os.replace(staging, path)


def _claim_file(path: Path, study: str, name: str, value: str) -> str:
    with _locked_claims(path) as claims:
        key = f"{study}\t{name}"
        if key not in claims:
            claims[key] = value
            _write(path, claims)
        return str(claims[key])


def _release_file(path: Path, study: str, name: str, value: str) -> bool:
    with _locked_claims(path) as claims:
        key = f"{study}\t{name}"
        if claims.get(key) != value:
            return False
        del claims[key]
        _write(path, claims)
        return True


TICKETS = "#tickets"
#: the user attributes of a ticket: the worker that took it, and the ticket's own token
OWNER = "owner"
TOKEN = "token"


def ticket_id(ticket: str) -> int | None:
    """The id of a ticket recorded as ``"tickets:ID OWNER/TOKEN"`` (None for anything else)."""
    name = ticket.partition(" ")[0]
    return int(name[8:]) if name.startswith("tickets:") and name[8:].isdigit() else None


class Tickets:
    """The trial tickets of one study: trials of a companion study ``KEY#tickets`` on the same
    Optuna storage, taken and given back through the storage's public API alone, so a worker
    that reaches the study only through Optuna's gRPC storage proxy (a container) takes them too.

    A ticket is a trial of the companion study: RUNNING while its trial runs, COMPLETE once that
    trial was charged (:meth:`spend`), FAIL when given back. A worker's ticket is good when at
    most ``limit`` tickets that were not given back have its number or a lower one: the highest
    good ticket saw every other good one when it counted, so however the workers interleave, at
    most ``limit`` are good at once. Spent tickets are finished trials, which Optuna's storage
    caches (and its proxy does not send again): taking a ticket reads the ones in flight only,
    however long the study.
    """

    #: the states of the tickets that count against the budget
    COUNTED = ("RUNNING", "COMPLETE")

    def __init__(self, storage: Any, key: str) -> None:
        self.storage, self.name = storage, f"{key}{TICKETS}"

    @functools.cached_property
    def study(self) -> Any:
        """The companion study, created by the first worker that needs it (its reads go through
        Optuna's trial cache)."""
        import optuna

        return optuna.create_study(storage=self.storage, study_name=self.name, direction="maximize",
                                   sampler=optuna.samplers.RandomSampler(), load_if_exists=True)

    @functools.cached_property
    def study_id(self) -> int:
        return int(self.storage.get_study_id_from_name(self.study.study_name))

    def _counted(self) -> list[Any]:
        from optuna.trial import TrialState

        return self.study.get_trials(deepcopy=False, states=tuple(TrialState[s] for s in self.COUNTED))

    def take(self, limit: int, owner: str) -> str | None:
        """A good ticket as ``"tickets:TRIAL_ID OWNER/TOKEN"``; None when ``limit`` are held.
        The ticket records ``owner`` (:meth:`give_back_unused` finds a dead worker's by it)."""
        from optuna.trial import TrialState, create_trial

        token = uuid.uuid4().hex[:12]
        template = create_trial(state=TrialState.RUNNING, user_attrs={OWNER: owner, TOKEN: token})
        trial_id = int(self.storage.create_new_trial(self.study_id, template_trial=template))
        held = self._counted()
        number = next(t.number for t in held if t.user_attrs.get(TOKEN) == token)
        if sum(1 for t in held if t.number <= number) <= limit:
            return f"tickets:{trial_id} {owner}/{token}"
        self.give_back(trial_id)
        return None

    def held(self) -> int:
        return len(self._counted())

    def give_back_unused(self, owners: tuple[str, ...], used: set[int]) -> int:
        """Give back the tickets that workers named by ``owners`` (prefixes) took and no trial
        holds (``used``: the ids that trials hold): a worker that died between taking a ticket
        and starting its trial. Call it only for workers that have ended. Returns how many."""
        from optuna.trial import TrialState

        study_id = self.study_id
        theirs = [self.storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
                  for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                  if str(t.user_attrs.get(OWNER, "")).startswith(owners)]
        lost = [trial_id for trial_id in theirs if trial_id not in used]
        for trial_id in lost:
            self.give_back(trial_id)
        return len(lost)

    def give_back(self, trial_id: int) -> None:
        self._finish(trial_id, "FAIL")

    def spend(self, trial_id: int) -> None:
        """The ticket's trial was charged: the ticket stays counted, as a finished trial."""
        self._finish(trial_id, "COMPLETE")

    def _finish(self, trial_id: int, state: str) -> None:
        import optuna
        from optuna.trial import TrialState

        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # finished already
            self.storage.set_trial_state_values(trial_id, TrialState[state],
                                                values=[0.0] if state == "COMPLETE" else None)


class Budget:
    """A worker's view of its study's claims: the trial tickets (``study.n_trials``, on the Optuna
    ``storage``) and the one-time claims (base trial, parent run, promotion: the coordinator's).

    ``key`` names the study instance (name and storage id: a recreated study starts afresh).
    A ticket is taken before each trial, handed to the trial that starts, and given back when
    no trial took it or the trial did not train.
    """

    def __init__(self, storage_url: str, key: str, storage: Any) -> None:
        self.storage_url = storage_url
        self.key = key
        self.tickets = Tickets(storage, key)
        self._ticket: str | None = None

    def claim(self, name: str, value: str) -> str:
        return claim(self.storage_url, self.key, name, value)

    def take(self, limit: int, owner: str) -> bool:
        """Take a good ticket (see :class:`Tickets`); False when ``limit`` are held (the budget is spent)."""
        self._ticket = self.tickets.take(limit, owner)
        return self._ticket is not None

    def hand_over(self) -> str:
        """The held ticket as ``"tickets:ID OWNER/TOKEN"`` for the trial that starts now ("" when none)."""
        ticket, self._ticket = self._ticket, None
        return ticket or ""

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Give the ticket back on leaving when no trial took it."""
        try:
            yield
        finally:
            if self._ticket is not None:
                self.release_text(self._ticket)
                self._ticket = None

    def take_over(self, name: str, old: str, value: str) -> str:
        """Claim ``name`` with ``value`` in place of ``old`` (a holder that is gone), if ``old`` still
        holds it; return the value that holds (another taker may have won)."""
        self.release(name, old)
        return self.claim(name, value)

    def release(self, name: str, value: str) -> None:
        """Give a claim back (best effort: the storage may be what failed)."""
        with contextlib.suppress(Exception):
            release(self.storage_url, self.key, name, value)

    def spend(self, ticket: str) -> None:
        """A trial charged against the budget ended: its ticket ``"tickets:ID OWNER/TOKEN"`` stays
        counted, as a finished trial (best effort: a ticket left RUNNING counts the same)."""
        trial_id = ticket_id(ticket)
        if trial_id is not None:
            with contextlib.suppress(Exception):
                self.tickets.spend(trial_id)

    def release_text(self, ticket: str) -> None:
        """Give back a ticket recorded as ``"tickets:ID OWNER/TOKEN"`` on a trial (best effort)."""
        trial_id = ticket_id(ticket)
        if trial_id is not None:
            with contextlib.suppress(Exception):
                self.tickets.give_back(trial_id)
