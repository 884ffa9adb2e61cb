"""claims: first-writer-wins claims and the trial budget, on SQLite and journal storages."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from mlops_tune.claims import Budget, claim


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


def test_the_budget_hands_out_n_tickets_and_takes_back_unused_ones(storage_url: str) -> None:
    one, two = Budget(storage_url, "s"), Budget(storage_url, "s")
    assert one.take(2, "w1") and two.take(2, "w2")
    ticket = one.hand_over()
    assert ticket.startswith("ticket-") and one.hand_over() == ""
    with two.held():  # no trial took two's ticket: it comes back on leaving
        pass
    assert one.take(2, "w1")  # the freed ticket
    with one.held():
        pass
    three = Budget(storage_url, "s")
    assert three.take(2, "w3")
    assert not Budget(storage_url, "s").take(2, "w4")  # both held: the budget is spent
    three.release_text(three.hand_over())  # a trial that did not train gives its ticket back
    assert Budget(storage_url, "s").take(2, "w5")
    Budget(storage_url, "s").release_text(ticket.split()[0] + " not-the-holder")  # never frees another's
    assert not Budget(storage_url, "s").take(2, "w6")
