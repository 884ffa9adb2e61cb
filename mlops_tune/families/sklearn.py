"""The scikit-learn family: any classifier named by ``_target_``.

``conf/model/knn.yaml`` is the pattern: ``_target_`` plus the estimator's constructor
arguments as ``model.*`` keys, so a new estimator is a YAML file, not code. An optional
``scaler`` (``standard`` | ``minmax``) is put in front of the estimator inside one
pipeline, so feature scaling is part of the model (and of the search space).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from mlops_tune.data import Splits
from mlops_tune.families import load_class
from mlops_tune.families._base import EpochCallback, Family, FitResult, pinned_requirements
from mlops_tune.runtime.errors import UsageError

#: model keys that are not constructor arguments of the estimator
RESERVED_KEYS = frozenset({"name", "family", "_target_", "scaler"})
SCALERS = {
    "standard": "sklearn.preprocessing.StandardScaler",
    "minmax": "sklearn.preprocessing.MinMaxScaler",
}


class SklearnFamily(Family):
    """A scikit-learn classifier in a pipeline with an optional scaler."""

    name = "sklearn"
    input_kind = "flat"
    image = "sklearn"

    def validate(self, model_cfg: Mapping[str, Any]) -> None:
        estimator_cls = load_class(model_cfg.get("_target_"), "model._target_")
        _check_classifier_class(estimator_cls, model_cfg["_target_"])  # before anything is instantiated
        params = inspect.signature(estimator_cls).parameters
        for key in model_cfg:
            if key not in RESERVED_KEYS and key not in params:
                raise UsageError(f"model.{key}: unknown key for {model_cfg['_target_']} "
                                 f"(known: {', '.join(params)})")
        scaler = model_cfg.get("scaler")
        if scaler is not None and scaler not in SCALERS:
            raise UsageError(f"model.scaler: '{scaler}' is not null, {' or '.join(SCALERS)}")
        estimator = estimator_cls(**_estimator_kwargs(model_cfg))
        validate_params = getattr(estimator, "_validate_params", None)
        if validate_params is not None:
            try:
                validate_params()
            except ValueError as exc:
                key = next((k for k in model_cfg if f"'{k}'" in str(exc)), None)
                prefix = f"model.{key}" if key else "model"
                raise UsageError(f"{prefix}: {exc}") from None

    def check_data(self, model_cfg: Mapping[str, Any], splits: Splits) -> None:
        neighbours = model_cfg.get("n_neighbors")
        if isinstance(neighbours, int) and neighbours > len(splits.y_train):
            raise UsageError(f"model.n_neighbors: {neighbours} is more than the {len(splits.y_train)} "
                             "training samples of the split")

    def build(self, model_cfg: Mapping[str, Any], seed: int) -> Any:
        from sklearn.pipeline import Pipeline

        estimator_cls = load_class(model_cfg["_target_"], "model._target_")
        kwargs = _estimator_kwargs(model_cfg)
        if "random_state" in inspect.signature(estimator_cls).parameters and kwargs.get("random_state") is None:
            kwargs["random_state"] = seed
        steps = []
        if model_cfg.get("scaler"):
            steps.append(("scaler", load_class(SCALERS[model_cfg["scaler"]], "model.scaler")()))
        steps.append(("estimator", estimator_cls(**kwargs)))
        return Pipeline(steps)

    def fit(self, model_cfg: Mapping[str, Any], splits: Splits, seed: int,
            on_epoch: EpochCallback) -> FitResult:
        model = self.build(model_cfg, seed)
        model.fit(splits.x_train, splits.y_train)
        metrics = {
            "train_accuracy": self.accuracy(model, splits.x_train, splits.y_train),
            "val_accuracy": self.accuracy(model, splits.x_val, splits.y_val),
        }
        on_epoch(0, metrics)
        return FitResult(model=model, history=[metrics])

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(x))

    def n_params(self, model: Any) -> int:
        return sum(_stored_numbers(step) for _, step in model.steps)

    def log_model(self, model: Any, splits: Splits, name: str, model_id: str | None = None) -> str:
        import mlflow.sklearn
        from mlflow.models import infer_signature

        sample = splits.x_val[:5]
        signature = infer_signature(sample, model.predict(sample))
        info = mlflow.sklearn.log_model(
            model, name=name, model_id=model_id, signature=signature, metadata={"classes": splits.classes},
            serialization_format="cloudpickle",
            pip_requirements=pinned_requirements("scikit-learn", "numpy", "cloudpickle"),
        )
        return str(info.model_uri)

    def load_model(self, model_uri: str) -> Any:
        import mlflow.sklearn

        return mlflow.sklearn.load_model(model_uri)


def _estimator_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model_cfg.items() if k not in RESERVED_KEYS}


def _check_classifier_class(cls: type, target: str) -> None:
    """``model._target_`` may only name a scikit-learn compatible classifier class: a subclass
    of ``sklearn.base.ClassifierMixin`` and ``BaseEstimator`` with ``fit`` and ``predict``.
    Anything else (``subprocess.Popen``, ``os.system`` ...) is refused before it is called."""
    from sklearn.base import BaseEstimator, ClassifierMixin

    if not (issubclass(cls, ClassifierMixin) and issubclass(cls, BaseEstimator)
            and callable(getattr(cls, "fit", None)) and callable(getattr(cls, "predict", None))):
        raise UsageError(f"model._target_: '{target}' is not a scikit-learn classifier class (a subclass of "
                         "sklearn.base.ClassifierMixin with fit/predict, e.g. sklearn.svm.SVC); nothing else "
                         "may be named")

def _stored_numbers(obj: Any, depth: int = 0) -> int:
    """Numbers a fitted estimator stores: its arrays, sub-estimators and tree nodes."""
    total = 0
    for value in vars(obj).values():
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            total += value.size
        elif depth < 2 and isinstance(value, (list, tuple)) and value and hasattr(value[0], "get_params"):
            total += sum(_stored_numbers(sub, depth + 1) for sub in value)
    tree = getattr(obj, "tree_", None)
    if tree is not None:
        total += int(tree.node_count)
    return total
