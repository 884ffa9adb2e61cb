"""What reaches standard error while TensorFlow loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

#: as TensorFlow 2.21 prints them at import, TF_CPP_MIN_LOG_LEVEL=3 or not
NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796247903.492567   27369 port.cc:153] oneDNN custom operations are on. You may see "
    "slightly different numerical results due to floating-point round-off errors.",
    "W0000 00:00:1796247903.512000   27369 cpu_feature_guard.cc:227] This TensorFlow binary is optimized",
]
KEPT = [
    "E0000 00:00:1796247903.600000   27369 some_kernel.cc:12] a real TensorFlow error",
    "a line of the program's own, from Python",
    "I0000 is not a log line without its time and source",
]
SCRIPT = f"""
import os, sys, threading
from mlops_tune.runtime.logs import tensorflow_load_filtered
noise, kept = {NOISE!r}, {KEPT!r}
print("before", file=sys.stderr, flush=True)
with tensorflow_load_filtered():
    for line in noise[:2]:
        os.write(2, (line + "\\n").encode())  # as C++ writes: on fd 2, not through sys.stderr
    os.write(2, (kept[0] + "\\n").encode())
    t = threading.Thread(target=lambda: print(kept[1], file=sys.stderr, flush=True))
    t.start(); t.join()
    os.write(2, (noise[2] + "\\r\\n" + kept[2] + "\\n").encode())
    os.write(2, b"no newline at the end")
print(file=sys.stderr)
print("after", threading.active_count(), file=sys.stderr)
"""


@pytest.mark.parametrize("verbose", ["", "1"])
def test_tensorflows_load_lines_are_dropped_and_every_other_line_passes_in_order(verbose: str) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MLOPS_TUNE_VERBOSE": verbose})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.replace("\r", "").splitlines()
    if verbose:  # verbose=true: the libraries' own output is left alone
        assert lines == ["before", *NOISE[:2], KEPT[0], KEPT[1], NOISE[2], KEPT[2],
                         "no newline at the end", "after 1"]
    else:
        assert lines == ["before", *KEPT, "no newline at the end", "after 1"]  # the forwarder has ended


@pytest.mark.parametrize(("given", "expected"), [
    ({}, "true"),  # MLflow's telemetry off in mlops-tune's processes by default
    ({"MLFLOW_DISABLE_TELEMETRY": "false"}, "false"),  # the user's word holds
    ({"DO_NOT_TRACK": "false"}, None),  # the other switch MLflow reads: left to it
])
def test_mlflow_telemetry_is_off_unless_the_user_says_otherwise(given: dict[str, str], expected: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "CI")}
    # MLflow reads the variable when it would send (mlflow.telemetry.utils.is_telemetry_disabled)
    probe = ("import os; from mlops_tune.runtime.logs import quiet_libraries; quiet_libraries(); "
             "print(os.environ.get('MLFLOW_DISABLE_TELEMETRY'))")
    out = subprocess.run([sys.executable, "-c", probe], env={**env, **given}, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(expected)]
