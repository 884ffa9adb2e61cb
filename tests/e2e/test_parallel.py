"""study.n_jobs: trials of one study at once, each helper process a process of its own.

Real processes, a real SQLite Optuna storage and MLflow store; Keras trials (the helper processes are
for Keras: ``auto`` gives sklearn trials one process). Short trainings (``model.epochs``) keep
the tests quick; the figures (time to target, trials per minute) are in benchmarks/.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from mlops_tune.runtime import keys, threads
from mlops_tune.search.gate import judged
from tests.conftest import BIN, ROOT, command_env, mlflow_runs

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    """The defaults: no n_jobs pinned, no TensorFlow thread counts (an in-process study earlier
    in the test session set them in this process's environment; a user's are kept)."""
    env = command_env()
    for key in ("MLOPS_TUNE_N_JOBS", *threads.TF_THREAD_VARS):
        env.pop(key, None)
    return env


def _trials(workdir: Path, study: str = "ann-digits") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{workdir / 'optuna.db'}").get_trials()


def _helpers_left() -> str:
    """The study's helper processes still alive (multiprocessing's spawned children; not those of an
    MLflow server another test runs, whose uvicorn workers are spawned the same way)."""
    found = subprocess.run(["pgrep", "-f", "--", "--multiprocessing-fork"], capture_output=True, text=True)

    def of_a_server(pid: str) -> bool:
        try:
            parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            return b"uvicorn" in Path(f"/proc/{parent}/cmdline").read_bytes()
        except (OSError, IndexError):
            return False  # gone meanwhile, or unreadable: counted

    return "\n".join(pid for pid in found.stdout.split() if not of_a_server(pid))


def test_two_processes_train_at_once_under_one_parent_run_within_the_budget(workdir: Path) -> None:
    proc = subprocess.run([str(BIN / "mlops-tune"), "study.n_jobs=2", "study.n_trials=4", "gate.threshold=0.999",
                           "model.epochs=4", "study.pruner=none"], cwd=workdir, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    intra = max(1, threads.cpu_count() // 2)
    assert re.search(rf"2 trials at once \(1 more process, pid \d+; TF threads per process: {intra} intra-op, "
                     r"1 inter-op\)", proc.stdout), proc.stdout[:3000]
    trials = _trials(workdir)
    assert sum(judged(t) for t in trials) == 4  # the budget holds across the two processes
    for number in range(4):  # every trial's line, whichever process ran it
        assert f"[trial   {number}] COMPLETE" in proc.stdout
    spans = [(t.datetime_start, t.datetime_complete) for t in trials]
    assert any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1:]), spans
    # the probe (study.probe=widest) is trial 1: the first process ready runs it, the other trial 0 beside it
    assert trials[1].user_attrs[keys.MUTATIONS] == "model.hidden_units:widest"
    assert trials[1].params["hidden_units_0"] == 256 and trials[0].params["hidden_units_0"] == 8
    assert spans[1][0] <= spans[0][0] < spans[1][1], spans
    runs = mlflow_runs(workdir)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert {r.info.status for r in children} == {"FINISHED"}
    assert _helpers_left() == ""


def test_a_gate_met_in_one_process_stops_the_others_trial(workdir: Path) -> None:
    """The base model passes 0.5 after a few epochs; the other process's trial (30 epochs) stops
    at its next epoch instead of training on, and the study ends with nothing running."""
    proc = subprocess.run([str(BIN / "mlops-tune"), "study.n_jobs=2", "study.n_trials=10", "gate.threshold=0.5",
                           "study.pruner=none", "registry.promote=false"], cwd=workdir, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = _trials(workdir)
    states = [t.state for t in trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert len(trials) <= 4, states  # not the 10 of the budget
    stopped = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    # a trial still training when the gate was met was stopped (PRUNED), and says why; at which epoch depends
    # on where it was then (its last epoch, at worst): test_a_met_gate_stops_the_trials_still_running drives that
    for trial in stopped:
        assert trial.user_attrs[keys.GATE_STOP] is True
    assert proc.stdout.count("(stopped: another trial met the gate)") == len(stopped)
    assert all(r.info.status == "FINISHED" for r in mlflow_runs(workdir))
    assert _helpers_left() == ""


def test_a_check_that_fails_ends_the_helpers_started_before_it(workdir: Path) -> None:
    """The processes start before the config and data are checked (they import meanwhile): a bad
    input is still one line and exit 2 from the study alone, with no process left and nothing written."""
    (workdir / "bad.csv").write_text("a,b,label\n1,2,x\n3,nan,y\n4,5,x\n6,7,y\n")
    proc = subprocess.run([str(BIN / "mlops-tune"), "study.n_jobs=2", "data=csv", f"data.path={workdir / 'bad.csv'}",
                           "data.target=label"], cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing values in column(s) 'b'" in lines[0], lines
    assert _helpers_left() == ""
    assert not (workdir / "optuna.db").exists() and mlflow_runs(workdir) == []


def test_sigterm_stops_every_helper_and_closes_their_runs(workdir: Path) -> None:
    proc = subprocess.Popen([str(BIN / "mlops-tune"), "study.n_jobs=2", "study.n_trials=10", "gate.threshold=0.999",
                             "study.pruner=none"], cwd=workdir, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        running = [r for r in mlflow_runs(workdir)
                   if r.info.status == "RUNNING" and "mlflow.parentRunId" in r.data.tags]
        if len(running) >= 2:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    else:
        pytest.fail("two trials never ran at once")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err
    statuses = {r.info.status for r in mlflow_runs(workdir)}
    assert "RUNNING" not in statuses and "KILLED" in statuses, statuses
    assert _helpers_left() == ""
    # the trials in flight were given back: a rerun trains them (nothing stays RUNNING in Optuna)
    assert optuna.trial.TrialState.RUNNING not in {t.state for t in _trials(workdir)}


def test_helpers_under_mlflow_run_log_into_the_project_runs_experiment(workdir: Path) -> None:
    """`mlflow run -e tune` makes the Project run the study's parent run, in the experiment it
    was given: the process's trials go there too (not tracking.experiment) and none resumes it."""
    overrides = (f"study.n_jobs=2 study.n_trials=2 model.epochs=2 gate.threshold=0.999 "
                 f"study.storage=sqlite:///{workdir / 'optuna.db'} hydra.run.dir={workdir / 'outputs'}")
    env = command_env(MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}")
    proc = subprocess.run([str(BIN / "mlflow"), "run", str(ROOT), "-e", "tune", "-P", f"overrides={overrides}",
                           "--env-manager", "local", "--experiment-name", "builds"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 trials at once" in proc.stdout
    runs = mlflow_runs(workdir, experiment="builds")
    [project_run] = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "tune"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == project_run.info.run_id]
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}
    assert mlflow_runs(workdir, experiment="mlops-tune") == []
    # whether the helper is ready before a 2-epoch trial ends depends on this machine's pace: that the
    # helper process trains beside the study's is asserted where the test waits for it (the killed-helper tests)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start(workdir: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    out = workdir / "out.txt"
    with open(out, "w") as sink:
        proc = subprocess.Popen([str(BIN / "mlops-tune"), "study.n_jobs=2", "study.n_trials=4", "gate.threshold=0.999",
                                 "model.epochs=200", "registry.promote=false", *overrides],
                                cwd=workdir, env=_env(), stdout=sink, stderr=subprocess.STDOUT)
    return proc, out


def _helper_in_training(workdir: Path, proc: subprocess.Popen, out: Path) -> tuple[int, int]:
    """The helper process's pid (the study prints it) and its trial, once that trial has reported
    an epoch to Optuna (the median pruner's warm-up over: it is training, not starting; of 200)."""
    owner = f"{socket.gethostname()}-{{pid}}-"
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, out.read_text()[-3000:]
        found = re.search(r"more process, pid (\d+);", out.read_text())
        if found and (workdir / "optuna.db").exists():
            pid = int(found.group(1))
            for trial in _trials(workdir):
                ticket = str(trial.user_attrs.get(keys.TICKET, "")).partition(" ")[2]
                if (trial.state == optuna.trial.TrialState.RUNNING and ticket.startswith(owner.format(pid=pid))
                        and trial.intermediate_values):
                    return pid, trial.number
        time.sleep(0.3)
    pytest.fail("the helper process never trained a trial: " + out.read_text()[-3000:])


def test_a_killed_worker_process_costs_its_trial_nothing(workdir: Path) -> None:
    """SIGKILL (the OOM killer) on the helper process mid-trial: its trial is given back and runs
    again in the study's process, the budget is exact, nothing is left RUNNING."""
    proc, out = _start(workdir)
    pid, number = _helper_in_training(workdir, proc, out)
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=900)
    text = out.read_text()
    assert proc.returncode == 1, text[-3000:]
    assert f"a worker process was killed; trial(s) [{number}] run again here" in text
    trials = _trials(workdir)
    assert sum(judged(t) for t in trials) == 4  # the killed trial was not charged
    assert trials[number].state == optuna.trial.TrialState.FAIL and keys.NOT_CHARGED in trials[number].user_attrs
    assert [judged(t) for t in trials if t.user_attrs.get(keys.RETRY_OF) == number] == [True]
    assert optuna.trial.TrialState.RUNNING not in {t.state for t in trials}
    runs = mlflow_runs(workdir)
    assert "RUNNING" not in {r.info.status for r in runs}
    assert next(r for r in runs if r.info.run_id == trials[number].user_attrs[keys.RUN]).info.status == "KILLED"
    assert _helpers_left() == ""


def test_worker_processes_stop_when_their_study_is_killed(workdir: Path) -> None:
    """SIGKILL on the study's process: its helper sees its parent's sentinel close, stops as on
    SIGTERM (its trial's run KILLED, the trial given back) and exits."""
    proc, out = _start(workdir)
    pid, number = _helper_in_training(workdir, proc, out)
    proc.kill()
    proc.wait(timeout=60)
    deadline = time.time() + 120
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.5)
    assert not _alive(pid) and _helpers_left() == "", "the helper process outlived its study"
    trial = _trials(workdir)[number]
    assert trial.state == optuna.trial.TrialState.FAIL and keys.NOT_CHARGED in trial.user_attrs
    run = next(r for r in mlflow_runs(workdir) if r.info.run_id == trial.user_attrs[keys.RUN])
    assert run.info.status == "KILLED"
