"""What a user sees while a study runs: start-up lines, the live status on a terminal, no library
noise, a multirun's summary table."""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path

import pytest

from mlops_tune.config.cli import multirun_table
from mlops_tune.runtime import threads
from mlops_tune.show.progress import Progress
from tests.conftest import BIN, command_env, run_command

#: lines the libraries print on their own (TensorFlow's C++ logs, absl, matplotlib, Optuna,
#: MLflow's registry prints); none may reach the default output
NOISE = re.compile(r"absl|^[IWEF]\d{4} |node_def_util|cpu_feature_guard|tensorflow|matplotlib|UserWarning|"
                   r"optuna_warn|Successfully registered|Created version|^WARNING|^INFO", re.M | re.I)


@pytest.mark.slow
def test_the_main_job_prints_progress_and_no_library_noise(workdir: Path) -> None:
    """`make run`'s job (mlops-tune on the embedded defaults), with TensorFlow's log level not preset."""
    env = command_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL")
    env.pop("MLOPS_TUNE_N_JOBS")  # the real default: study.n_jobs=auto (its helper process prints no noise either)
    for key in threads.TF_THREAD_VARS:  # set in this process by in-process studies of other tests
        env.pop(key, None)
    proc = subprocess.run([str(BIN / "mlops-tune")], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode in (0, 1), proc.stderr
    output = proc.stdout + proc.stderr
    assert NOISE.findall(output) == [], output
    lines = proc.stdout.splitlines()
    # nothing silent at start-up: the data, the stores, the header, the processes, then the first trial
    assert lines[0] == "study 'ann-digits': checking the config ..."  # before the heavy imports
    del lines[0]
    assert lines[0] == "study 'ann-digits': loading data 'digits' ..."
    assert lines[1].startswith("study 'ann-digits': opening the stores (Optuna sqlite:///")
    n_jobs = threads.resolve_n_jobs("auto", "inprocess", "keras_dense", 20)
    if n_jobs > 1:  # the base model (trial 0) and the probe (trial 1) start at once, either first
        assert lines[3].startswith(f"study 'ann-digits': {n_jobs} trials at once"), lines[3]
        assert sorted(lines[4:6]) == ["starting trial 0 ...", "starting trial 1 ..."], lines[4:6]
    else:
        assert lines[3] == "starting trial 0 ..."
    assert any(re.match(r"\[trial +[01]\] COMPLETE", line) for line in lines), lines
    assert "study report: " in proc.stdout and "gate " in proc.stdout


@pytest.mark.slow
def test_verbose_brings_the_library_logs_back(workdir: Path) -> None:
    env = command_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL")
    proc = subprocess.run([str(BIN / "mlops-train"), "verbose=true", "model.epochs=1"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^[IWE]\d{4} ", proc.stderr, re.M), "TensorFlow's C++ log lines with verbose=true"


def test_a_terminal_gets_a_live_status_line(workdir: Path) -> None:
    """Under a pseudo-terminal the study shows 'trial k/N | ... | best ... (gate ...) | elapsed'."""
    code, text = _in_a_terminal(workdir, "model=knn", "data=wine", "study.n_trials=4", "gate.threshold=0.999",
                                columns=200)
    assert code in (0, 1), text[-2000:]
    # whether a KNN trial is still running when the line is redrawn depends on this machine's pace:
    # the running trial's part is optional here (test_the_live_line_shows_the_running_trial drives it)
    trial_state = r"( \| #\d+ (running \d+:\d\d|epoch \d+(/\d+)? val_accuracy [0-9.]+))*"
    assert re.search(r"trial [1-4]/4" + trial_state + r" \| best [-0-9.]+ \(gate 0\.9990\) \| elapsed \d+:\d\d",
                     text), text[-2000:]
    assert "[trial   0] COMPLETE" in text  # the per-trial lines still print above the status


def _in_a_terminal(workdir: Path, *args: str, columns: int = 100) -> tuple[int, str]:
    """Run ``mlops-tune`` under a pseudo-terminal of ``columns`` columns; its exit code and raw output."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    proc = subprocess.Popen([str(BIN / "mlops-tune"), *args], cwd=workdir, env=command_env(TERM="xterm"),
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=600)
    os.close(leader)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def _screen_lines(text: str, columns: int) -> list[str]:
    """Every line a person saw, scrolled away or not: the output played on a terminal emulator."""
    import pyte

    screen = pyte.HistoryScreen(columns, 40, history=100000)
    pyte.Stream(screen).feed(text.replace("\n", "\r\n"))
    history = ["".join(line[x].data for x in range(columns)) for line in screen.history.top]
    return [line.rstrip() for line in [*history, *screen.display]]


@pytest.mark.slow
def test_two_keras_workers_share_one_terminal_without_garbling_it(workdir: Path) -> None:
    """A study with a helper process (study.n_jobs=2) on a terminal: every line of both processes is
    printed whole by one writer, above the live status line (never glued to it or to each other),
    wrapped to the terminal's width; a resumed study's status line starts from the study's best."""
    columns = 90
    args = ("model=ann", "model.epochs=3", "study.n_jobs=2", "gate.threshold=0.999", "registry.promote=false",
            "study.name=two-lanes")
    code, text = _in_a_terminal(workdir, *args, "study.n_trials=4", columns=columns)
    assert code == 1, text[-3000:]
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    segments = [s for s in re.split(r"[\r\n]", plain) if s.strip()]
    status = re.compile(r"trial \d+/\d+ \|.*\| elapsed")
    trial_lines = [s for s in segments if "[trial" in s]
    assert {int(n) for n in re.findall(r"\[trial +(\d+)\]", plain)} == {0, 1, 2, 3}  # both processes' lines
    assert any(status.search(s) for s in segments), "the live status line was drawn"
    for segment in segments:  # no line is both status and trial text
        assert not (status.search(segment) and re.search(r"\[trial|starting trial|study '", segment)), segment
    assert all(len(s) <= columns for s in trial_lines), [s for s in trial_lines if len(s) > columns]
    for line in _screen_lines(text, columns):  # what a person saw, scrolled or not
        assert not ("| elapsed" in line and "[trial" in line), line
    best = max(float(v) for v in re.findall(r"COMPLETE val_accuracy=([0-9.]+)", plain))
    code, text = _in_a_terminal(workdir, *args, "study.n_trials=6", columns=columns)
    assert code == 1, text[-3000:]
    first = re.search(r"best (\S+) \(gate", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text))  # the first drawn
    assert first and first.group(1) != "-" and float(first.group(1)) >= best - 5e-5, (best, text[-3000:])


def test_the_live_line_shows_the_running_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    """The live line drawn on a terminal names the running trial, its epoch and its value (the
    redraw is driven here, so nothing depends on how fast a trial trains)."""
    monkeypatch.setenv("COLUMNS", "200")  # one line, not wrapped at 80
    stream = io.StringIO()
    with Progress(n_trials=4, threshold=0.99, metric="val_accuracy", epochs=30, stream=stream, live=True) as progress:
        progress.trial_started(2)
        progress.epoch(2, 3, 0.9012)
        progress.refresh()
        drawn = stream.getvalue()
        progress.trial_finished(2, 0.93, judged=True)
        progress.refresh()
        after = stream.getvalue()[len(drawn):]
    assert "trial 1/4 | #2 epoch 4/30 val_accuracy 0.9012 | best - (gate 0.9900) | elapsed 0:00" in drawn
    assert "trial 2/4 | best 0.9300 (gate 0.9900)" in after and "#2" not in after


def test_the_status_line_shows_the_epoch_and_the_eta() -> None:
    progress = Progress(n_trials=10, threshold=0.95, metric="val_accuracy", epochs=30, done=2, live=False,
                        stream=open(os.devnull, "w"))  # noqa: SIM115 - closed with the test
    progress.trial_started(2)
    progress.epoch(2, 11, 0.9012)
    assert "trial 3/10 | #2 epoch 12/30 val_accuracy 0.9012 | best - (gate 0.9500)" in progress.status()
    progress.trial_finished(2, 0.93, judged=True)
    status = progress.status()
    assert "best 0.9300" in status and "ETA " in status  # one duration known: 7 trials left
    progress.stream.close()


def test_a_multirun_ends_with_a_table_of_its_studies(workdir: Path) -> None:
    result = run_command("mlops-tune", "-m", "model=knn,logreg", "data=wine", "study.n_trials=2",
                         "gate.threshold=0.999", "study.name=s-${model.name}", "registry.promote=false", cwd=workdir)
    table = result.stdout[result.stdout.index("multirun: 2 job(s)"):].splitlines()
    assert table[1].split() == ["job", "exit", "outcome"]
    rows = {line.split()[0]: line for line in table[2:4]}
    assert set(rows) == {"model=knn", "model=logreg"}  # the shared overrides are left out
    for model, line in rows.items():
        code = int(line.split()[1])
        assert f"study 's-{model.split('=')[1]}': gate {'PASSED' if code == 0 else 'MISSED'}" in line
    assert table[4] == f"exit code {result.code} (the worst of the jobs)"


@pytest.mark.slow
def test_a_mixed_multirun_gives_a_family_key_to_the_models_that_have_it(workdir: Path) -> None:
    """``-m model=knn,ann model.epochs=1``: the Keras job trains 1 epoch, the KNN job (no ``epochs``)
    runs without it and says so in one line; a key no swept model has is still an error."""
    from tests.conftest import mlflow_runs

    result = run_command("mlops-tune", "-m", "model=knn,ann", "model.epochs=1", "study.n_trials=1",
                         "gate.threshold=0.1", "registry.promote=false", "study.n_jobs=1", cwd=workdir)
    assert result.code == 0, result.stdout + result.stderr
    assert ("model.epochs does not apply to model=knn (its config has no 'epochs'): left out of this job"
            in result.stdout)
    runs = mlflow_runs(workdir)
    parents = {r.data.tags["mlops_tune.study"]: r.info.run_id for r in runs if "mlops_tune.gate" in r.data.tags}
    assert set(parents) == {"knn-digits", "ann-digits"}  # the knn study is the plain one: no epochs in it
    trials = {study: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id]
              for study, run_id in parents.items()}
    assert [r.data.params["model.epochs"] for r in trials["ann-digits"]] == ["1"]
    assert [r for r in trials["knn-digits"] if "model.epochs" in r.data.params] == []
    assert len(trials["knn-digits"]) == 1
    typo = run_command("mlops-tune", "-m", "model=knn,ann", "model.epoch=1", cwd=workdir)
    assert typo.code == 2 and "model.epoch" in typo.stderr


def test_the_multirun_table_names_errors_and_the_worst_code() -> None:
    table = multirun_table([(0, "model=knn data=wine", "study 'knn-wine': gate PASSED"),
                            (2, "model=cnn data=wine", "error: model=cnn needs image data")])
    assert "model=cnn     2  error: model=cnn needs image data" in table
    assert table.endswith("exit code 2 (the worst of the jobs)")


@pytest.mark.parametrize("command", ["mlops-tune", "mlops-train"])
def test_help_says_what_the_command_does_its_keys_exit_codes_and_examples(command: str, workdir: Path) -> None:
    result = run_command(command, "--help", cwd=workdir)
    assert result.code == 0
    text = result.stdout
    assert text.startswith(f"{command}: ")
    for part in ("Main keys", "Exit codes:", "Examples:", "model=ann|cnn|knn", "130 / 143",
                 "model: ann, cnn, knn, logreg, random_forest"):
        assert part in text, part
    if command == "mlops-tune":
        assert "tpe | random | mutation" in text and "1 gate missed" in text
    assert not list(workdir.glob("outputs"))  # help writes nothing
