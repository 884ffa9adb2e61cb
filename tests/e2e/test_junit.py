"""JUnit output: one test case per study, merged into one file across (parallel) jobs."""

from __future__ import annotations

import multiprocessing
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from mlops_tune.runtime.errors import UsageError
from mlops_tune.show import junit


def _suite(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite is not None
    return suite


def test_record_merges_and_replaces_cases(tmp_path: Path) -> None:
    path = tmp_path / "reports" / "junit.xml"
    junit.record(path, "knn-digits", "knn", 1.5)
    junit.record(path, "ann-digits", "ann", 2.0, failure="best val_accuracy 0.91 < threshold 0.95")
    junit.record(path, "knn-digits", "knn", 1.0, error="crashed")  # a rerun replaces its case
    suite = _suite(path)
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "1", "1")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert cases["ann-digits"].find("failure").get("message") == "best val_accuracy 0.91 < threshold 0.95"
    assert cases["knn-digits"].find("error") is not None and cases["knn-digits"].get("time") == "1.000"


def _write(args: tuple[str, int]) -> None:
    path, i = args
    junit.record(path, f"study-{i}", "knn", 0.1)


def test_parallel_jobs_do_not_lose_cases(tmp_path: Path) -> None:
    path = str(tmp_path / "junit.xml")
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_write, [(path, i) for i in range(16)])
    assert _suite(Path(path)).get("tests") == "16"


def test_check_takes_what_record_can_write(tmp_path: Path) -> None:
    junit.check(tmp_path / "new" / "folders" / "junit.xml")  # created by record
    (tmp_path / "empty.xml").touch()
    junit.check(tmp_path / "empty.xml")
    written = tmp_path / "junit.xml"
    junit.record(written, "knn-digits", "knn", 1.0)
    junit.check(written)  # a rerun replaces its case
    junit.record(tmp_path / "new" / "folders" / "junit.xml", "knn-digits", "knn", 1.0)


@pytest.mark.parametrize(("make", "words"), [
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: p.write_text("a,b\n1,2\n"), "not a JUnit XML file"),
    (lambda p: p.write_bytes(bytes(range(256))), "not a JUnit XML file"),
    (lambda p: p.write_text("<project><dependency/></project>"), "its root is <project>"),
    (lambda p: p.parent.rmdir() or p.parent.write_text("a file"), "is a file, so"),
], ids=["folder", "fifo", "csv", "binary", "other xml", "under a file"])
def test_check_refuses_a_path_the_end_of_a_study_could_not_write(tmp_path: Path, make, words: str) -> None:
    path = tmp_path / "reports" / "junit.xml"
    path.parent.mkdir()
    make(path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UsageError, match=r"report\.junit") as raised:
        junit.check(path)
    assert words in str(raised.value) and "\n" not in str(raised.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize(("code", "prefix"), [(0, "SUCCESS"), (1, "UNSTABLE"), (2, "FAILURE"), (3, "FAILURE")])
def test_verdict_maps_exit_codes(tmp_path: Path, code: int, prefix: str) -> None:
    path = tmp_path / "junit.xml"
    junit.record(path, "ann-digits", "ann", 2.0, failure="best 0.91 < threshold 0.95")
    text = junit.verdict(path, code)
    assert text.startswith(prefix)
    if code == 1:
        assert "ann-digits (best 0.91 < threshold 0.95)" in text


@pytest.mark.slow
def test_multirun_writes_one_junit_file_with_a_case_per_study(tune, workdir: Path) -> None:
    result = tune("-m", "model=knn,ann", "data=wine", "gate.threshold=0.9", "study.n_trials=1",
                  "report.junit=out.xml")
    assert result.code in (0, 1), result.stderr
    suite = _suite(workdir / "out.xml")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == {"knn-wine", "ann-wine"} and suite.get("tests") == "2"
    # the file agrees with the exit code: 1 exactly when some study missed its gate
    assert (result.code == 1) == any(c.find("failure") is not None for c in cases.values())
