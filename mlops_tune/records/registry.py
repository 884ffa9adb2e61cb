"""Promotion: the study's best model in the MLflow Model Registry, and the ``champion`` alias.

Every study that meets its gate registers its best model as a new version of
``registry.name``, tagged with its test accuracy, study and trial. The ``champion``
alias moves to it only when it strictly beats the current champion's test accuracy,
compared at the stored precision (a tie keeps the champion).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from mlops_tune.runtime.errors import EnvironmentFault, UsageError, first_line
from mlops_tune.runtime.faults import not_found

CHAMPION_ALIAS = "champion"
#: the version tag naming the study instance (``claims.Budget.key``) that registered it
STUDY_KEY = "study_key"
#: the version tag written once the alias decision is applied: ``champion`` or ``stays``
DECISION = "decision"
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
        if not_found(exc):
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


def champion_version(name: str) -> Any:
    """The ``champion`` model version of ``name`` (None when there is none)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as exc:
        if not_found(exc):
            return None
        raise


def champion_config(name: str) -> tuple[dict[str, Any], str] | None:
    """The trial config (``config.yaml`` of its source run) of the champion, and where it came
    from (``models:/<name>/<version> (run <id>)``); None when there is no champion."""
    import mlflow
    import yaml

    version = champion_version(name)
    if version is None or not version.run_id:
        return None
    text = mlflow.artifacts.load_text(f"runs:/{version.run_id}/config.yaml")
    return yaml.safe_load(text), f"models:/{name}/{version.version} (run {version.run_id})"


#: evaluates a model (by URI) on today's test split; raises when it cannot (other features ...)
Judge = Callable[[Any], float]


def study_version(name: str, study_key: str) -> Any:
    """The version of ``name`` a study registered (tag ``study_key``), or None: a promotion that
    a killed process began is finished from it, never registered twice."""
    import mlflow
    from mlflow.exceptions import MlflowException

    quote = '"' if "'" in name else "'"
    try:
        versions = mlflow.MlflowClient().search_model_versions(f"name={quote}{name}{quote}")
    except MlflowException as exc:
        if not_found(exc):
            return None
        raise
    mine = [v for v in versions if v.tags.get(STUDY_KEY) == study_key]
    return min(mine, key=lambda v: int(v.version), default=None)


def decided(version: Any) -> bool:
    """Whether the alias decision about ``version`` was applied (it is the champion, or its tag says so)."""
    if version is None:
        return False
    if DECISION in version.tags:
        return True
    champion = champion_version(version.name)
    return champion is not None and str(champion.version) == str(version.version)


def record_decision(name: str, version: str, champion: bool) -> None:
    import mlflow

    mlflow.MlflowClient().set_model_version_tag(name, version, DECISION, CHAMPION_ALIAS if champion else "stays")


def promote(model_uri: str, name: str, test_accuracy: float, tags: Mapping[str, str],
            judge: Judge | None = None, existing: Any = None) -> tuple[str, bool, float | None]:
    """Register the model; make it the champion when it beats the current one. Prints what happened.

    With ``judge``, the current champion is evaluated on the same test split as the new model
    (the test accuracy it was registered with came from ITS data); without, its recorded one
    is used. A champion that cannot be evaluated on this data is replaced. ``existing``: the
    version registered by an earlier attempt that was stopped before the decision: it is
    decided, not registered again. The decision is recorded on the version (tag ``decision``)
    last, so every step before it can be redone.

    Returns the new version, whether it is now the champion, and the champion's figure compared.
    """
    current_version = champion_version(name)
    if existing is not None and current_version is not None and current_version.version == existing.version:
        record_decision(name, str(existing.version), True)
        print(f"registry: {name} version {existing.version} is '{CHAMPION_ALIAS}'", flush=True)
        return str(existing.version), True, None
    current: float | None = None
    if current_version is not None:
        if judge is None:
            current = champion_test_accuracy(name)
        else:
            try:
                current = judge(current_version)
            except EnvironmentFault:  # the store failed, not the champion: nothing moves (exit 3)
                raise
            except Exception as exc:
                print(f"registry: the champion ({name} version {current_version.version}) cannot be evaluated on "
                      f"this data ({first_line(exc)}): it is replaced", flush=True)
    version = str(existing.version) if existing is not None else register(model_uri, name, test_accuracy, tags)
    champion = beats(test_accuracy, current)
    where = " on this study's test split" if judge is not None and current is not None else ""
    if champion:
        set_champion(name, version)
        print(f"registry: {name} version {version} is now '{CHAMPION_ALIAS}' "
              f"(test_accuracy {test_accuracy:.4f}" + (f" > {current:.4f}, the previous champion"
                                                        f"{where})" if current is not None else ")"),
              flush=True)
    else:
        print(f"registry: {name} version {version} registered; '{CHAMPION_ALIAS}' stays "
              f"(its test_accuracy {current:.4f}{where} >= {test_accuracy:.4f})", flush=True)
    record_decision(name, version, champion)
    return version, champion, current
