"""The Jenkinsfile, checked without a Jenkins controller.

* it parses as Groovy (Debian's ``groovy``) and ``npm-groovy-lint`` (CodeNarc) finds no error;
* its ``sh`` steps, taken in stage order with the parameters substituted, run against
  the real project: a reachable threshold ends SUCCESS with a passing JUnit report, an
  unreachable one ends UNSTABLE (the Gate stage's verdict) with the failures in JUnit.

Under CI (``CI=true``) a missing ``groovy`` or ``npm-groovy-lint`` fails the test; on a
laptop without them the two static checks skip and say why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import IN_CI, ROOT, command_env

JENKINSFILE = ROOT / "Jenkinsfile"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI (.ci/run installs it)")
        pytest.skip(f"{name} is not installed (apt-get install groovy / npm install -g npm-groovy-lint@16)")
    return path


def test_jenkinsfile_parses_as_groovy(tmp_path: Path) -> None:
    groovy = _tool("groovy")
    checker = tmp_path / "parse.groovy"
    checker.write_text(
        "import org.codehaus.groovy.control.*\n"
        "def unit = new CompilationUnit()\n"
        "unit.addSource(new File(args[0]))\n"
        "unit.compile(Phases.CONVERSION)\n"
        "println 'parsed'\n"
    )
    env = dict(os.environ)
    env.setdefault("JAVA_HOME", _java_home())
    proc = subprocess.run([groovy, str(checker), str(JENKINSFILE)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0 and "parsed" in proc.stdout, proc.stderr


def test_jenkinsfile_passes_codenarc(tmp_path: Path) -> None:
    lint = _tool("npm-groovy-lint")
    shutil.copy(JENKINSFILE, tmp_path / "Jenkinsfile")
    env = dict(os.environ)
    env.setdefault("JAVA_HOME", _java_home())
    proc = subprocess.run([lint, "--failon", "error", "--noserver", "--output", "txt", "Jenkinsfile"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _java_home() -> str:
    java = shutil.which("java")
    return str(Path(java).resolve().parent.parent) if java else ""


# ----------------------------------------------------------------------------- the step runner


def groovy_string(text: str) -> str:
    """The value of a Groovy ''' string: ``\\\\`` is a backslash, backslash-newline joins lines."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"\\": "\\", "\n": "", "'": "'", "n": "\n", "t": "\t"}.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


SH = re.compile(r"\bsh\s*\(?\s*(?:returnStatus:\s*true,\s*|returnStdout:\s*true,\s*)?(?:script:\s*)?"
                r"(?:'''(?P<long>.*?)'''|'(?P<short>[^'\n]*)')", re.S)


def pipeline_steps(text: str) -> list[tuple[str, str, str]]:
    """``(stage, kind, script)`` for every ``sh`` step, in order; ``kind`` tells how its result is used."""
    stages = [(m.start(), m.group(1)) for m in re.finditer(r"stage\('([^']+)'\)", text)]
    post = text.index("post {")
    steps = []
    for m in SH.finditer(text):
        where = "post" if m.start() > post else [name for pos, name in stages if pos < m.start()][-1]
        kind = "status" if "returnStatus" in m.group(0) else "stdout" if "returnStdout" in m.group(0) else "plain"
        steps.append((where, kind, groovy_string(m.group("long") or m.group("short"))))
    return steps


def run_pipeline(workspace: Path, params: dict[str, str]) -> dict[str, str]:
    """Run the pipeline's sh steps like the agent would; return the stage outcomes."""
    text = JENKINSFILE.read_text()
    env = command_env(**params, REPORTS="reports", PYTHONUNBUFFERED="1")
    outcome = {"result": "SUCCESS"}
    for stage, kind, script in pipeline_steps(text):
        if stage == "Build images" and params["RUNNER"] != "docker":  # the stage's `when`
            continue
        proc = subprocess.run(["bash", "-c", script], cwd=workspace, env=env, capture_output=True,
                              text=True, timeout=900)
        if kind == "status":  # the Tune stage keeps the exit code for the Gate stage
            env["TUNE_EXIT"] = str(proc.returncode)
            outcome["tune_exit"] = str(proc.returncode)
            outcome["tune_output"] = proc.stdout + proc.stderr
            continue
        assert proc.returncode == 0, f"stage {stage}: {script}\n{proc.stdout}\n{proc.stderr}"
        if kind == "stdout":  # the Gate stage: the Groovy code dispatches on the verdict's prefix
            verdict = proc.stdout.strip()
            outcome["verdict"] = verdict
            if verdict.startswith("UNSTABLE"):
                outcome["result"] = "UNSTABLE"
            elif not verdict.startswith("SUCCESS"):
                outcome["result"] = "FAILURE"
    return outcome


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A Jenkins workspace: the project's files, with the already installed .venv reused."""
    ws = tmp_path / "workspace"
    shutil.copytree(ROOT, ws, ignore=shutil.ignore_patterns(
        ".venv", ".git", "outputs", "multirun", "mlflow.db", "optuna.db", "mlruns", ".pytest_cache", "reports"))
    (ws / ".venv").symlink_to(ROOT / ".venv")
    installed = ROOT / ".venv" / ".installed"
    if installed.exists():  # `make install` is then a no-op, as on an agent that built it before
        os.utime(installed)
    return ws


def test_step_names_are_all_found() -> None:
    stages = [stage for stage, _, _ in pipeline_steps(JENKINSFILE.read_text())]
    assert stages == ["Setup", "Build images", "Tune", "Gate"]  # `post` runs no shell step


def test_pipeline_with_a_reachable_threshold_succeeds(workspace: Path) -> None:
    outcome = run_pipeline(workspace, {"MODELS": "knn,logreg", "DATA": "iris", "THRESHOLD": "0.9",
                                       "N_TRIALS": "2", "RUNNER": "inprocess",
                                       "TRACKING_URI": "sqlite:///mlflow.db"})
    assert outcome["tune_exit"] == "0", outcome["tune_output"]
    assert outcome["result"] == "SUCCESS", outcome
    suite = ET.parse(workspace / "reports" / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "0", "0")
    assert {c.get("name") for c in suite.findall("testcase")} == {"knn-iris", "logreg-iris"}
    for model in ("knn", "logreg"):  # what the post stage archives
        job = workspace / "reports" / "multirun" / f"{model}-iris" / "worker-0"
        assert (job / "best_config.yaml").exists() and (job / "trials.csv").exists()
        assert (job / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_pipeline_with_an_unreachable_threshold_is_unstable(workspace: Path) -> None:
    outcome = run_pipeline(workspace, {"MODELS": "knn,logreg", "DATA": "digits", "THRESHOLD": "1.0",
                                       "N_TRIALS": "2", "RUNNER": "inprocess",
                                       "TRACKING_URI": "sqlite:///mlflow.db"})
    assert outcome["tune_exit"] == "1", outcome["tune_output"]
    assert outcome["result"] == "UNSTABLE"
    assert "knn-digits" in outcome["verdict"] and "logreg-digits" in outcome["verdict"]
    suite = ET.parse(workspace / "reports" / "junit.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "2")
    messages = [c.find("failure").get("message") for c in suite.findall("testcase")]
    assert all("< threshold 1.0" in m for m in messages)


def test_pipeline_with_bad_config_fails(workspace: Path) -> None:
    outcome = run_pipeline(workspace, {"MODELS": "knn", "DATA": "nosuch", "THRESHOLD": "0.9",
                                       "N_TRIALS": "2", "RUNNER": "inprocess",
                                       "TRACKING_URI": "sqlite:///mlflow.db"})
    assert outcome["tune_exit"] == "2"
    assert outcome["result"] == "FAILURE"
