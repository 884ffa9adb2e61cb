"""How many trials of a study run at once (``study.n_jobs``) and how many threads each gets.

Measured on the 2-core machines this project runs on (``benchmarks/time_to_target.py``):
TensorFlow's default thread pools (one inter-op and one intra-op thread per core) make a
small dense network on digits train 2.2x slower than one inter-op thread, and two trials
side by side with one thread each train in 1.05x the time of one: two trials at once is
nearly twice the trials per minute. So, for Keras trials in the study's own process,
``study.n_jobs=auto`` runs one trial per core (each in its own process, see
``mlops_tune.workers.local``) and every process gets ``cores / n_jobs`` intra-op threads and one
inter-op thread, unless ``TF_NUM_INTRAOP_THREADS`` / ``TF_NUM_INTEROP_THREADS`` are set.

Example::

    n = resolve_n_jobs("auto", runner="inprocess", family="keras_dense", n_trials=20)  # 2 on 2 cores
    limit_threads(n)  # before TensorFlow is imported
"""

from __future__ import annotations

import os
from pathlib import Path

from mlops_tune.runtime.errors import UsageError

AUTO = "auto"
#: families whose trials are long enough to be worth a process of their own
PARALLEL_FAMILIES = ("keras_dense", "keras_cnn")
TF_THREAD_VARS = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


#: where a CPU quota is: cgroup v2 (``QUOTA PERIOD`` or ``max PERIOD``), cgroup v1 (two files, -1: none)
CPU_MAX = "/sys/fs/cgroup/cpu.max"
CFS_QUOTA, CFS_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"
#: native thread pools (OpenMP: scikit-learn's neighbours and trees; OpenBLAS/MKL: numpy) that
#: start one thread per core they see, quota or not
NATIVE_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_quota() -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``docker run --cpus``), None without one."""
    try:
        quota, period = Path(CPU_MAX).read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = Path(CFS_QUOTA).read_text().strip(), Path(CFS_PERIOD).read_text().strip()
        except OSError:
            return None
    try:
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def cpu_count() -> int:
    """Cores this process may use: its CPU affinity, bounded by its cgroup's CPU quota (rounded
    down, at least 1)."""
    cores, quota = _affinity(), cpu_quota()
    return cores if quota is None else max(1, min(cores, int(quota)))


def parse_n_jobs(value: object) -> int | str:
    """``auto`` or a positive integer (as Hydra may hand it over: ``2`` or ``"2"``)."""
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    if text.isdigit() and int(text) >= 1:
        return int(text)
    # the default comes from the environment: name the variable the user has to fix
    source = "MLOPS_TUNE_N_JOBS (study.n_jobs's default)" if os.environ.get("MLOPS_TUNE_N_JOBS") == str(value) \
        else "study.n_jobs"
    raise UsageError(f"{source}: must be 'auto' or a positive number of trials at once, got {value!r}")


def resolve_n_jobs(value: object, runner: str, family: str, n_trials: int) -> int:
    """Trials at once for this study. ``auto``: one per core for Keras trials in the study's
    process, else 1 (sklearn trials take milliseconds to seconds: a process each would cost
    more than it saves; runner=mlflow|docker run trials at once with ``runner.workers``)."""
    n_jobs = parse_n_jobs(value)
    if n_jobs == AUTO:
        if runner != "inprocess" or family not in PARALLEL_FAMILIES:
            return 1
        return max(1, min(cpu_count(), n_trials))
    if n_jobs > 1 and runner != "inprocess":
        raise UsageError(f"study.n_jobs: {n_jobs} trials at once needs runner=inprocess; runner={runner} runs "
                         "trials at once with runner.workers")
    return min(int(n_jobs), max(1, n_trials))


def thread_env(n_jobs: int) -> dict[str, str]:
    """TensorFlow thread counts for one of ``n_jobs`` processes sharing this machine's cores."""
    return {"TF_NUM_INTRAOP_THREADS": str(max(1, cpu_count() // max(1, n_jobs))), "TF_NUM_INTEROP_THREADS": "1"}


def limit_threads(n_jobs: int) -> dict[str, str]:
    """Set :func:`thread_env` in this process's environment (before TensorFlow starts),
    keeping what the user set; returns what is now in force."""
    for key, value in thread_env(n_jobs).items():
        if not os.environ.get(key):
            os.environ[key] = value
    return {key: os.environ[key] for key in TF_THREAD_VARS}


def limit_to_quota(tensorflow: bool = False) -> dict[str, str]:
    """Under a CPU quota below the cores this process sees (a container of ``runner.cpus=1`` on a
    bigger machine): the native thread pools (OpenMP, OpenBLAS, MKL) sized to the quota
    (:func:`cpu_count`), and with ``tensorflow`` TensorFlow's for one training at a time
    (:func:`thread_env`); unbounded, each starts a thread per core, runs out the quota and waits
    for the next period (figures: docs/containers.md). A study's own process leaves TensorFlow's
    to :func:`limit_threads`, which knows how many trials share the quota. Without such a quota
    nothing changes. What is set already stays. Call before numpy or TensorFlow loads. Returns
    what it set."""
    cores = cpu_count()
    if cores >= _affinity():
        return {}
    wanted = {key: str(cores) for key in NATIVE_THREAD_VARS}
    if tensorflow:
        wanted.update(thread_env(1))
    set_now = {key: value for key, value in wanted.items() if not os.environ.get(key)}
    os.environ.update(set_now)
    return set_now


def tf_threads_text() -> str:
    """TensorFlow's thread counts in force in this process, in words."""
    return (f"{os.environ.get('TF_NUM_INTRAOP_THREADS')} intra-op, "
            f"{os.environ.get('TF_NUM_INTEROP_THREADS')} inter-op")
