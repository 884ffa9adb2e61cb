"""Model families: how one kind of model is validated, trained, evaluated and saved.

A family is chosen by ``model.family`` in the model's YAML file. The built-in families
are ``keras_dense`` and ``keras_cnn`` (TensorFlow is imported only when they train) and
``sklearn`` (any estimator named by ``_target_``). A new family is one module with a
:class:`Family` subclass, named as ``model.family=package.module:ClassName``; nothing
else in mlops-tune branches on family names.
"""

from __future__ import annotations

from mlops_tune.families._base import EpochCallback, Family, FitResult
from mlops_tune.runtime import heap
from mlops_tune.runtime.errors import UsageError, first_line

__all__ = ["BUILTIN_FAMILIES", "EpochCallback", "Family", "FitResult", "get_family", "load_class", "settle_imports"]

BUILTIN_FAMILIES = {
    "keras_dense": "mlops_tune.families.keras:DenseFamily",
    "keras_cnn": "mlops_tune.families.keras:ConvFamily",
    "sklearn": "mlops_tune.families.sklearn:SklearnFamily",
}


def load_class(path: str, key: str) -> type:
    """The class named ``package.module.Class`` (or ``package.module:Class``), imported the one
    way mlops-tune imports classes by name (``hydra.utils.get_class``).

    Raises:
        UsageError: naming ``key``: the module or class cannot be imported, or it is not a class.
    """
    import logging

    from hydra.utils import get_class

    if not isinstance(path, str) or "." not in path:
        raise UsageError(f"{key}: must name a class such as package.module.Class, got {path!r}")
    hydra_log = logging.getLogger("hydra.utils")  # logs each failure with its text: we report it once
    was_disabled, hydra_log.disabled = hydra_log.disabled, True
    try:
        return get_class(path.replace(":", "."))
    except ValueError as exc:
        if "non-class" in str(exc):
            raise UsageError(f"{key}: '{path}' is not a class") from None
        raise UsageError(f"{key}: cannot import '{path}' ({first_line(exc, 160)})") from None
    except Exception as exc:
        raise UsageError(f"{key}: cannot import '{path}' ({first_line(exc.__cause__ or exc, 160)})") from None
    finally:
        hydra_log.disabled = was_disabled


def get_family(name: str) -> Family:
    """The family registered under ``name`` (or a ``module:Class`` path)."""
    target = BUILTIN_FAMILIES.get(name, name)
    module_name, _, class_name = target.partition(":")
    if not class_name:
        raise UsageError(
            f"model.family: unknown family '{name}' (built in: {', '.join(BUILTIN_FAMILIES)}; "
            "or give 'package.module:ClassName')"
        )
    cls = load_class(f"{module_name}.{class_name}", "model.family")
    if not issubclass(cls, Family):
        raise UsageError(f"model.family: '{target}' is not a mlops_tune Family subclass")
    return cls()


_settled: set[str] = set()


def settle_imports(family: str) -> None:
    """Import the framework of ``family`` once in this process, then :func:`mlops_tune.runtime.heap.settle`
    (in a process mlops-tune started: its imports leave the garbage collector's sweeps, so
    Keras' ``clear_session`` before each model takes 12-19 ms instead of 0.37-0.44 s). Called
    before the first trial by the processes that run trials (the study's process, its helpers, Project workers)."""
    if family in _settled:
        return
    try:
        get_family(family).preload()
    finally:  # a framework that failed to import leaves the collector on all the same
        heap.settle()
    _settled.add(family)
