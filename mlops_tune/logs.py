"""What the libraries may print: their chatter off, so mlops-tune reports each problem once."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """Keep library chatter (INFO logs, experimental-API warnings, retry noise) out of the output.

    Failures are reported by mlops-tune itself, in one line; the libraries' own error logs
    would add a traceback per failed call (and may quote a URL).
    """
    import warnings

    # MLflow prints a "View run" link per run for HTTP stores: noise per trial, and the URL
    # would show a password given in tracking.uri. Our summary prints the redacted URI.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # a progress bar per model download (registry, test evaluation) from a tracking server
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # the `mlflow run` processes that start warm workers: no INFO line per step
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
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
