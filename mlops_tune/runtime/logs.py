"""What the libraries may print: their chatter off, so mlops-tune reports each problem once."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

VERBOSE_ENV = "MLOPS_TUNE_VERBOSE"

#: What TensorFlow (2.21 and later) prints while it loads, whatever ``TF_CPP_MIN_LOG_LEVEL`` says:
#: absl's notice that logging is not initialised yet, and the INFO/WARNING lines logged before
#: (oneDNN's "custom operations are on", twice per process). ERROR and FATAL lines pass.
_TF_LOAD_NOISE = re.compile(
    rb"(?:WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} [\d:.]+ +\d+ [\w.-]+:\d+\] .*)\r?\n?")
_filter_lock = threading.Lock()


def verbose() -> bool:
    """``verbose=true`` (or ``MLOPS_TUNE_VERBOSE=1``): leave the libraries' own logging alone."""
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def set_verbose(on: bool) -> None:
    """Record the ``verbose`` config key where trial processes and containers inherit it."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def quiet_libraries() -> None:
    """Keep library chatter (INFO logs, experimental-API warnings, retry noise) out of the output.

    Failures are reported by mlops-tune itself, in one line; the libraries' own error logs
    would add a traceback per failed call (and may quote a URL). With :func:`verbose` only
    the settings that protect secrets stay.
    """
    import warnings

    # MLflow prints a "View run" link per run for HTTP stores: noise per trial, and the URL
    # would show a password given in tracking.uri. Our summary prints the redacted URI.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # a progress bar per model download (registry, test evaluation) from a tracking server
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's usage telemetry calls hosts on the internet from every process that uses MLflow (a
    # CI agent, a container of trials): off unless the user says otherwise (MLFLOW_DISABLE_TELEMETRY
    # or DO_NOT_TRACK set). Where nothing answers, its exit wait cost each process about a second.
    if "DO_NOT_TRACK" not in os.environ:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # the `mlflow run` processes that start warm workers: no INFO line per step
    if verbose():
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # TensorFlow's C++ logs (absl's "All log messages before absl::InitializeLog()", tf.data's
    # "NodeDef mentions attribute use_unbounded_threadpool"): set before TensorFlow loads;
    # a real TensorFlow error still arrives as a Python exception
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):  # unset or empty: TensorFlow's default is everything
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ.setdefault("MPLBACKEND", "Agg")  # plots are files; no GUI backend probing
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # importances from few trials: we compute them only once enough trials exist
    warnings.filterwarnings("ignore", message=r"Some regimes for parameter", category=UserWarning)
    # a study name in a script the plots' font lacks (CJK, emoji): the plot shows boxes, the run goes on
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from", category=UserWarning)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Pickle-format advice on every sklearn model: we log models we just trained ourselves.
    logging.getLogger("mlflow.sklearn").setLevel(logging.ERROR)
    # images without git (the trial containers): the run simply has no git tags
    logging.getLogger("mlflow.utils.git_utils").setLevel(logging.ERROR)
    # a traceback per failed store call, and urllib3's retry lines: we report the fault once
    for name in ("mlflow.store.db.utils", "mlflow.utils.rest_utils", "mlflow.tracking.fluent",
                 "urllib3.connectionpool", "sqlalchemy.pool"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        import optuna

        # Optuna logs every failed trial with its traceback; our trial line says it in one line
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    except ImportError:  # pragma: no cover - optuna is a core dependency
        pass


@contextlib.contextmanager
def tensorflow_load_filtered() -> Iterator[None]:
    """While TensorFlow loads, drop its log lines from standard error (the process's fd 2).

    TensorFlow 2.21's C++ logging goes through absl before absl is initialised, which writes to
    stderr at every level (tensorflow/tensorflow#100442, abseil/abseil-cpp#1718). Everything
    else written to fd 2 meanwhile, by any thread, passes through a pipe and a forwarding thread
    unchanged. With :func:`verbose` nothing is filtered.
    """
    if verbose() or not _filter_lock.acquire(blocking=False):  # another thread filters already
        yield
        return
    try:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no fd 2 to filter
            yield
            return
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        forwarder = threading.Thread(target=_forward, args=(read, saved), name="tensorflow-load-stderr",
                                     daemon=True)
        forwarder.start()
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)  # the pipe's last writer closes: the forwarder reads to its end
            forwarder.join(timeout=10)
            if not forwarder.is_alive():
                os.close(saved)
    finally:
        _filter_lock.release()


def _forward(read: int, out: int) -> None:
    with os.fdopen(read, "rb") as pipe, contextlib.suppress(OSError):
        for line in pipe:
            if not _TF_LOAD_NOISE.fullmatch(line):
                os.write(out, line)
