"""claims: first-writer-wins claims and the trial budget, on SQLite and journal storages."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import optuna
import pytest

from mlops_tune.records.claims import Budget, claim, ticket_id


@pytest.fixture(params=["sqlite", "journal"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'optuna.db'}"
        optuna.storages.RDBStorage(url)  # the tables exist, as when a study runs
        return url
    return f"journal:///{tmp_path / 'journal.log'}"


def test_the_first_claim_wins(storage_url: str) -> None:
    assert claim(storage_url, "s", "parent_run", "a") == "a"
    assert claim(storage_url, "s", "parent_run", "b") == "a"
    assert claim(storage_url, "other", "parent_run", "b") == "b"  # per study


def _storage(url: str):
    from mlops_tune.search.optuna_setup import make_storage

    return make_storage({"storage": url, "heartbeat_interval": 60, "grace_period": 120})


def test_the_budget_hands_out_n_tickets_and_takes_back_unused_ones(storage_url: str) -> None:
    storage = _storage(storage_url)
    one, two = Budget(storage_url, "s", storage), Budget(storage_url, "s", storage)
    assert one.take(2, "w1") and two.take(2, "w2")
    ticket = one.hand_over()
    assert ticket.startswith("tickets:") and " w1/" in ticket and one.hand_over() == ""
    with two.held():  # no trial took two's ticket: it comes back on leaving
        pass
    assert one.take(2, "w1")  # the freed place
    with one.held():
        pass
    three = Budget(storage_url, "s", storage)
    assert three.take(2, "w3")
    assert not Budget(storage_url, "s", storage).take(2, "w4")  # both held: the budget is spent
    three.release_text(three.hand_over())  # a trial that did not train gives its ticket back
    assert Budget(storage_url, "s", storage).take(2, "w5")
    assert not Budget(storage_url, "other", storage).tickets.held()  # per study
    Budget(storage_url, "s", storage).release_text(ticket)  # given back twice: the same as once
    Budget(storage_url, "s", storage).release_text(ticket)
    assert Budget(storage_url, "s", storage).tickets.held() == 1


def test_a_dead_workers_tickets_that_no_trial_holds_come_back(storage_url: str) -> None:
    """A worker that died (or whose storage failed) between taking a ticket and starting its
    trial must not shrink the budget: its tickets that no trial holds are given back, the one
    its trained trial holds stays spent, and other workers' tickets are left alone."""
    storage = _storage(storage_url)
    dead, alive = Budget(storage_url, "s", storage), Budget(storage_url, "s", storage)
    assert dead.take(3, "run-dead-host-1")
    trained = dead.hand_over()  # its trial trained: this ticket stays spent
    assert dead.take(3, "run-dead-host-1")  # taken, then the worker died: no trial holds it
    assert alive.take(3, "run-alive-host-2")
    assert not Budget(storage_url, "s", storage).take(3, "w")  # all three held
    held = {ticket_id(trained)}
    assert dead.tickets.give_back_unused(("run-dead",), held) == 1
    assert dead.tickets.give_back_unused(("run-dead",), held) == 0  # once only
    assert dead.tickets.held() == 2  # the trained trial's and the live worker's
    assert Budget(storage_url, "s", storage).take(3, "w")  # the place came back


def test_a_spent_ticket_counts_and_is_not_read_again(tmp_path: Path) -> None:
    """A charged trial's ticket is spent: a finished trial of the companion study that still counts
    against the budget and cannot be given back. Taking the next ticket reads only the tickets in
    flight, so its cost does not grow with the trials the study already ran."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    read: list[int] = []

    class Counting(optuna.storages.RDBStorage):
        def _get_trials(self, *args, **kwargs):  # what Optuna's trial cache asks the database for
            trials = super()._get_trials(*args, **kwargs)
            read.append(len(trials))
            return trials

    storage = Counting(url)
    budget = Budget(url, "s", storage)
    for _ in range(30):
        assert budget.take(40, "w")
        budget.spend(budget.hand_over())
    read.clear()
    assert budget.take(40, "w")
    assert read and max(read) <= 2, read  # the new ticket (and none of the 30 spent ones)
    last = budget.hand_over()
    budget.spend(last)
    budget.release_text(last)  # spent: giving it back changes nothing
    assert budget.tickets.held() == 31
    assert {t.state for t in budget.tickets.study.get_trials()} == {optuna.trial.TrialState.COMPLETE}
    for _ in range(9):
        assert Budget(url, "s", _storage(url)).take(40, "other")
    assert not Budget(url, "s", _storage(url)).take(40, "other")  # 31 spent + 9 held: the budget


def test_racing_workers_never_hold_more_tickets_than_the_budget(storage_url: str) -> None:
    """Eight threads, each with its own storage object (as separate workers have), take tickets as
    fast as they can and give some back: the good tickets held at any time never exceed the limit,
    and in the end exactly the limit are held."""
    import threading

    limit, held, lock, errors = 5, [], threading.Lock(), []

    def worker(index: int) -> None:
        try:
            budget = Budget(storage_url, "race", _storage(storage_url))
            for round_ in range(6):
                if not budget.take(limit, f"w{index}"):
                    continue
                ticket = budget.hand_over()
                with lock:
                    held.append(ticket)
                    assert len(held) <= limit, held
                if round_ % 2 == 0:  # a trial that did not train
                    with lock:
                        held.remove(ticket)
                    budget.release_text(ticket)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(held) == limit
    assert Budget(storage_url, "race", _storage(storage_url)).tickets.held() == limit


def test_tickets_work_through_the_storage_proxy(tmp_path: Path) -> None:
    """A container reaches the study only through Optuna's gRPC storage proxy: its tickets are the
    same as those the study's own process takes on the database."""
    from mlops_tune.search.optuna_setup import StorageServer, open_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    direct = _storage(url)
    server = StorageServer(url)
    try:
        server.wait_ready()
        remote = Budget(server.url, "s", open_storage(server.url))
        assert remote.take(2, "container")
        assert Budget(url, "s", direct).take(2, "host")
        assert not Budget(url, "s", direct).take(2, "host")  # the container's ticket counts
        Budget(url, "s", direct).release_text(remote.hand_over())  # the host gives the container's back
        assert Budget(server.url, "s", open_storage(server.url)).take(2, "container")
    finally:
        server.stop()


def test_a_storage_proxy_that_cannot_open_its_storage_says_why_in_one_line() -> None:
    """The proxy's process fails to open the storage (here: no server on the port): the study's
    one line names that error, not the interpreter's shutdown (the proxy's thread that watches
    the study's process once turned every such failure into "Fatal Python error ... <no Python
    frame>"), and no password."""
    from mlops_tune.runtime.errors import UsageError
    from mlops_tune.search.optuna_setup import StorageServer

    server = StorageServer("postgresql+psycopg2://optuna:s3cret@127.0.0.1:9/optuna")
    with pytest.raises(UsageError) as caught:
        server.wait_ready(60)
    message = str(caught.value)
    assert message.startswith("study.storage: the Optuna storage proxy did not start (OperationalError")
    assert "Connection refused" in message and "\n" not in message
    assert "s3cret" not in message and "Python frame" not in message


def test_the_storage_proxy_ends_with_the_study_process_even_on_sigkill(tmp_path: Path) -> None:
    """A study killed outright (SIGKILL: no stop() runs) must not leave its storage proxy serving
    forever: the proxy ends once the study's process is gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from mlops_tune.search.optuna_setup import StorageServer\n"
        f"server = StorageServer('sqlite:///{tmp_path / 'optuna.db'}')\n"
        "server.wait_ready()\n"
        "print(server.port, server._process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    study = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        port, proxy = (int(v) for v in study.stdout.readline().split())  # type: ignore[union-attr]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # it serves
        os.kill(study.pid, signal.SIGKILL)
        study.wait()

        def running() -> bool:  # a zombie waiting for init to reap it has ended
            try:
                return Path(f"/proc/{proxy}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
            except OSError:
                return False

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and running():
            time.sleep(0.1)
        assert not running(), "the proxy still runs"
    finally:
        study.kill()


def test_a_storage_proxy_that_fails_is_named_with_grpcs_status_in_one_line() -> None:
    """A gRPC error's text starts "<_InactiveRpcError of RPC that terminated with:": the line a
    worker prints must say what failed (status and details) instead."""
    from optuna.storages import GrpcStorageProxy

    from mlops_tune.runtime.faults import classify

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proxy = GrpcStorageProxy(host="127.0.0.1", port=port)
    with pytest.raises(Exception) as failed:
        proxy.get_all_studies()
    fault = classify(failed.value, storage_url=f"grpc://127.0.0.1:{port}")
    assert fault is not None and fault.component == "storage", fault
    assert "gRPC UNAVAILABLE: " in str(fault) and "_InactiveRpcError" not in str(fault) and "\n" not in str(fault)


def test_a_waiting_trial_on_sqlite_is_taken_under_the_take_lock(tmp_path: Path) -> None:
    """SQLite ignores ``SELECT ... FOR UPDATE``: two workers that read a waiting trial (trial 0, the
    probe, a mutation's child) before either wrote both took it (optuna/optuna#4002): the trial ran
    twice and the second worker's ticket was never spent (a 4-trial study ended after 3). Between
    its read and its write, a take holds the lock file every process of the machine takes for it."""
    import filelock
    import sqlalchemy
    from optuna.trial import TrialState

    from mlops_tune.search.optuna_setup import SQLiteStorage, rdb_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first, second = rdb_storage(url), rdb_storage(url)  # two workers' own connections
    assert isinstance(first, SQLiteStorage) and isinstance(second, SQLiteStorage)
    study = optuna.create_study(storage=first, study_name="s")
    study.enqueue_trial({})
    trial_id = first.get_trial_id_from_study_id_trial_number(first.get_study_id_from_name("s"), 0)
    held: list[bool] = []

    def in_the_window(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE TRIALS"):  # read WAITING, writing RUNNING now
            other = filelock.FileLock(second.take_lock)
            try:
                other.acquire(timeout=0)
            except filelock.Timeout:
                held.append(True)
            else:
                other.release()
                held.append(False)

    sqlalchemy.event.listen(second.engine, "before_cursor_execute", in_the_window)
    assert second.set_trial_state_values(trial_id, TrialState.RUNNING)
    assert held == [True]
    assert not first.set_trial_state_values(trial_id, TrialState.RUNNING)  # taken: nobody else gets it


def test_workers_racing_for_waiting_trials_on_sqlite_take_each_once(tmp_path: Path) -> None:
    """Four workers (each its own connection) race for each of 20 waiting trials: one takes it."""
    import threading

    from optuna.trial import TrialState

    from mlops_tune.search.optuna_setup import rdb_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storages = [rdb_storage(url, engine_kwargs={"connect_args": {"timeout": 60}}) for _ in range(4)]
    study = optuna.create_study(storage=storages[0], study_name="s")
    study_id = storages[0].get_study_id_from_name("s")
    for _ in range(20):
        study.enqueue_trial({})
    ids = [storages[0].get_trial_id_from_study_id_trial_number(study_id, n) for n in range(20)]
    barrier, taken = threading.Barrier(4), [[] for _ in storages]

    def worker(index: int) -> None:
        for trial_id in ids:
            barrier.wait()  # all four ask for the same trial at once
            if storages[index].set_trial_state_values(trial_id, TrialState.RUNNING):
                taken[index].append(trial_id)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(t for mine in taken for t in mine) == ids
