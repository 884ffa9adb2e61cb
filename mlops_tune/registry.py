"""Promotion: the study's best model in the MLflow Model Registry, and the ``champion`` alias.

Every study that meets its gate registers its best model as a new version of
``registry.name``, tagged with its test accuracy, study and trial. The ``champion``
alias moves to it only when it strictly beats the current champion's test accuracy,
compared at the stored precision (a tie keeps the champion).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from mlops_tune.errors import UsageError

CHAMPION_ALIAS = "champion"
#: test accuracies are stored and compared at this many decimals
ACCURACY_DECIMALS = 6


def check_name(name: str) -> None:
    """MLflow's rules for a registered model name, checked before anything runs."""
    if not isinstance(name, str) or not name.strip():
        raise UsageError("registry.name: must be a non-empty name")
    bad = [c for c in ("/", ":") if c in name]
    if bad or name in (".", "..") or name != name.strip():
        raise UsageError(f"registry.name: '{name}' is not a valid MLflow model name "
                         "(no '/', ':' or surrounding spaces; not '.' or '..')")


def beats(candidate: float, current: float | None) -> bool:
    """Whether ``candidate`` strictly beats ``current``, both at the stored precision (a tie does not)."""
    return current is None or round(candidate, ACCURACY_DECIMALS) > round(current, ACCURACY_DECIMALS)


def champion_test_accuracy(name: str) -> float | None:
    """Test accuracy recorded on the current ``champion`` version, or None if there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
            return None
        raise
    value = version.tags.get("test_accuracy")
    return float(value) if value is not None else -math.inf


def register(model_uri: str, name: str, test_accuracy: float, tags: Mapping[str, str]) -> str:
    """Register ``model_uri`` under ``name``; return the new version."""
    import contextlib
    import io

    import mlflow

    # register_model prints "Successfully registered model ..." / "Created version ..." to
    # stderr; promote() prints the one line that matters
    with contextlib.redirect_stderr(io.StringIO()):
        version = mlflow.register_model(
            model_uri, name, tags={"test_accuracy": f"{test_accuracy:.{ACCURACY_DECIMALS}f}", **tags},
        )
    return str(version.version)


def set_champion(name: str, version: str) -> None:
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(name, CHAMPION_ALIAS, version)


def promote(model_uri: str, name: str, test_accuracy: float, tags: Mapping[str, str]) -> tuple[str, bool]:
    """Register the model; make it the champion when it beats the current one. Prints what happened.

    Returns the new version and whether it is now the champion.
    """
    version = register(model_uri, name, test_accuracy, tags)
    current = champion_test_accuracy(name)
    champion = beats(test_accuracy, current)
    if champion:
        set_champion(name, version)
        print(f"registry: {name} version {version} is now '{CHAMPION_ALIAS}' "
              f"(test_accuracy {test_accuracy:.4f}" + (f" > {current:.4f})" if current is not None else ")"),
              flush=True)
    else:
        print(f"registry: {name} version {version} registered; '{CHAMPION_ALIAS}' stays "
              f"(its test_accuracy {current:.4f} >= {test_accuracy:.4f})", flush=True)
    return version, champion
