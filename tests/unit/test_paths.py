"""Paths the study creates are checked before anything is written; a study name becomes ONE folder
name; a multirun's swept keys make its jobs distinct studies (mlops_tune.runtime.paths,
mlops_tune.config.names)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlops_tune.config import names
from mlops_tune.runtime import paths
from mlops_tune.runtime.errors import UsageError


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=400))
def test_any_study_name_becomes_one_folder_name_inside_its_parent(name: str) -> None:
    folder = paths.folder_name(name)
    assert folder and "/" not in folder and "\\\\" not in folder and not folder.startswith(".")
    assert folder.isprintable() and len(folder) <= paths.MAX_FOLDER_NAME
    base = Path("/sweep")
    assert (base / folder).parent == base  # never climbs out, never nests


def test_long_names_keep_their_start_and_stay_distinct() -> None:
    a, b = paths.folder_name("s" * 150 + "a"), paths.folder_name("s" * 150 + "b")
    assert a != b and a.startswith("s" * 50)


def test_a_name_the_file_system_cannot_take_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"study.storage: .*file name too long \(300 bytes"):
        paths.check_creatable(tmp_path / ("x" * 297 + ".db"), "study.storage")
    (tmp_path / "afile").write_text("")
    with pytest.raises(UsageError, match="afile is a file, so"):
        paths.check_creatable(tmp_path / "afile" / "sub" / "x.db", "tracking.uri")
    paths.check_creatable(tmp_path / "new" / "folder" / "x.db", "report.junit")  # creatable: no error
    assert not (tmp_path / "new").exists()  # and nothing created by the check


@pytest.mark.parametrize(("argv", "swept"), [
    (["-m", "model=knn,ann", "data=iris,wine"], []),  # in the default name already
    (["-m", "worker=0,1", "study.name=x"], []),  # workers of one study
    (["-m", "model=knn", "model.n_neighbors=1,3", "gate.threshold=0.9"], ["model.n_neighbors"]),
    (["--multirun", "+model.extra=range(1,3)", "gate.threshold=0.9,0.95"], ["model.extra", "gate.threshold"]),
    (["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2,3"], []),
])
def test_the_keys_a_multirun_sweeps(argv: list[str], swept: list[str]) -> None:
    assert names.swept_keys(argv) == swept


def test_outside_a_multirun_the_study_name_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(names.SWEPT_ENV, "model.n_neighbors")
    assert names.study_name("knn-digits") == "knn-digits"  # no Hydra run: nothing to append
    monkeypatch.delenv(names.SWEPT_ENV)
    assert os.environ.get(names.SWEPT_ENV) is None and names.study_name("knn-digits") == "knn-digits"
