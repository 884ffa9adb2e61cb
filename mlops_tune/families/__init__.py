"""Model families: how one kind of model is validated, trained, evaluated and saved.

A family is chosen by ``model.family`` in the model's YAML file. The built-in families
are ``keras_dense`` and ``keras_cnn`` (TensorFlow is imported only when they train) and
``sklearn`` (any estimator named by ``_target_``). A new family is one module with a
:class:`Family` subclass, named as ``model.family=package.module:ClassName``; nothing
else in mlops-tune branches on family names.
"""

from __future__ import annotations

import importlib

from mlops_tune.errors import UsageError
from mlops_tune.families._base import EpochCallback, Family, FitResult

__all__ = ["BUILTIN_FAMILIES", "EpochCallback", "Family", "FitResult", "get_family"]

BUILTIN_FAMILIES = {
    "keras_dense": "mlops_tune.families.keras:DenseFamily",
    "keras_cnn": "mlops_tune.families.keras:ConvFamily",
    "sklearn": "mlops_tune.families.sklearn:SklearnFamily",
}


def get_family(name: str) -> Family:
    """The family registered under ``name`` (or a ``module:Class`` path)."""
    target = BUILTIN_FAMILIES.get(name, name)
    module_name, _, class_name = target.partition(":")
    if not class_name:
        raise UsageError(
            f"model.family: unknown family '{name}' (built in: {', '.join(BUILTIN_FAMILIES)}; "
            "or give 'package.module:ClassName')"
        )
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"model.family: cannot load '{target}' ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, Family)):
        raise UsageError(f"model.family: '{target}' is not a mlops_tune Family subclass")
    return cls()
