"""JUnit XML for the gate: one test case per study, so any CI can show it.

``report.junit=reports/junit.xml`` makes every study write its test case into that ONE
file: a multirun's jobs (also parallel ones) merge into it under a file lock, and a
rerun of the same study replaces its earlier case. A study that met the gate passes;
one that missed it fails with the best accuracy and the threshold in the message; one
that crashed or was stopped by failures is an error.

``python -m mlops_tune.show.junit verdict reports/junit.xml --exit-code N`` prints the CI
verdict for an exit code (``SUCCESS``, ``UNSTABLE: ...`` naming the studies that missed,
``FAILURE: ...``); the Jenkinsfile's Gate stage uses it.
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from mlops_tune.runtime import paths
from mlops_tune.runtime.errors import UsageError
from mlops_tune.runtime.locks import exclusive

SUITE = "mlops-tune gate"


def check(path: str | os.PathLike[str]) -> None:
    """Refuse, before the study starts, a ``report.junit`` path its end could not write
    (:class:`UsageError`, exit 2): a folder, something that is not a regular file, a file that
    is not JUnit XML (it would be overwritten), a path under a file, or no write permission."""
    file = Path(path)
    paths.check_creatable(file, "report.junit")  # a name too long: before is_dir() raises on it
    if file.is_dir():
        raise UsageError(f"report.junit: {path} is a folder; name a file in it, e.g. {file / 'junit.xml'}")
    if file.exists():
        if not file.is_file():
            raise UsageError(f"report.junit: {path} exists and is not a regular file")
        try:
            root = ET.parse(file).getroot() if file.stat().st_size else ET.Element("testsuites")
        except (ET.ParseError, OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"report.junit: {path} exists and is not a JUnit XML file ({exc}); "
                             "remove it or name another file") from None
        if root.tag not in ("testsuites", "testsuite"):
            raise UsageError(f"report.junit: {path} is XML but not JUnit (its root is <{root.tag}>); "
                             "remove it or name another file")
        if not os.access(file, os.W_OK):
            raise UsageError(f"report.junit: {path} is not writable")
        return
    folder = next(p for p in file.absolute().parents if p.exists())  # a folder: check_creatable saw to it
    if not os.access(folder, os.W_OK):
        raise UsageError(f"report.junit: {folder} is not writable")


def record(path: str | os.PathLike[str], study: str, model: str, seconds: float, *,
           failure: str | None = None, error: str | None = None) -> None:
    """Add (or replace) the test case of ``study`` in the JUnit file at ``path``."""
    file = Path(path)
    with exclusive(f"{file}.lock"):
        suite = _read(file)
        for old in suite.findall(f"testcase[@name='{study}']"):
            suite.remove(old)
        case = ET.SubElement(suite, "testcase", name=study, classname=f"mlops-tune.{model}",
                             time=f"{seconds:.3f}")
        if failure is not None:
            ET.SubElement(case, "failure", message=failure, type="GateMissed").text = failure
        if error is not None:
            ET.SubElement(case, "error", message=error, type="StudyError").text = error
        cases = suite.findall("testcase")
        suite.set("tests", str(len(cases)))
        suite.set("failures", str(sum(c.find("failure") is not None for c in cases)))
        suite.set("errors", str(sum(c.find("error") is not None for c in cases)))
        suite.set("time", f"{sum(float(c.get('time', 0)) for c in cases):.3f}")
        root = ET.Element("testsuites")
        root.append(suite)
        ET.indent(root)
        tmp = file.with_suffix(file.suffix + ".tmp")
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
        tmp.replace(file)


def _read(file: Path) -> ET.Element:
    if file.exists() and file.stat().st_size:
        root = ET.parse(file).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is not None:
            return suite
    return ET.Element("testsuite", name=SUITE)


def verdict(path: str | os.PathLike[str], exit_code: int) -> str:
    """The CI verdict for a run's exit code, naming the studies that missed or broke."""
    missed, broken = [], []
    file = Path(path)
    if file.exists():
        for case in _read(file).findall("testcase"):
            if case.find("failure") is not None:
                missed.append(f"{case.get('name')} ({case.find('failure').get('message')})")  # type: ignore[union-attr]
            if case.find("error") is not None:
                broken.append(f"{case.get('name')} ({case.find('error').get('message')})")  # type: ignore[union-attr]
    if exit_code == 0:
        return "SUCCESS: every study met its gate"
    if exit_code == 1:
        return "UNSTABLE: gate missed by " + ("; ".join(missed) or "a study (no JUnit report found)")
    detail = "; ".join(broken) or "see the log"
    meaning = {2: "bad config, data or set-up", 3: "the environment failed or a crash, not the model",
               130: "stopped by SIGINT", 143: "stopped by SIGTERM (e.g. the build was aborted)",
               129: "stopped by SIGHUP (the terminal or the ssh session closed)"}
    return f"FAILURE: mlops-tune exited {exit_code} ({meaning.get(exit_code, 'a crash')}): {detail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlops_tune.show.junit")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verdict", help="print the CI verdict for an mlops-tune exit code")
    v.add_argument("report")
    v.add_argument("--exit-code", type=int, required=True)
    args = parser.parse_args(argv)
    print(verdict(args.report, args.exit_code))
    return 0


if __name__ == "__main__":
    sys.exit(main())
