"""The interface every model family implements."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from mlops_tune.data import InputKind, Splits

#: Called after every epoch with ``(epoch, {"loss": .., "train_accuracy": .., "val_accuracy": ..})``.
#: It may raise (``optuna.TrialPruned`` to prune) to stop training.
EpochCallback = Callable[[int, Mapping[str, float]], None]


@dataclass
class FitResult:
    """A trained model and its per-epoch metrics (one entry per epoch, in order)."""

    model: Any
    history: list[dict[str, float]] = field(default_factory=list)


class Family(abc.ABC):
    """One kind of model. Subclasses must not import heavy frameworks at import time."""

    #: registry name, e.g. ``keras_dense``
    name: ClassVar[str]
    #: the input shape the family takes (flat vectors or images with a channel axis)
    input_kind: ClassVar[InputKind]
    #: the trial image that has this family's framework (key of ``runner.images``, runner=docker)
    image: ClassVar[str]

    @abc.abstractmethod
    def validate(self, model_cfg: Mapping[str, Any]) -> None:
        """Raise :class:`~mlops_tune.runtime.errors.UsageError` naming the bad ``model.*`` key."""

    def check_data(self, model_cfg: Mapping[str, Any], splits: Splits) -> None:  # noqa: B027 - optional hook
        """Raise :class:`~mlops_tune.runtime.errors.UsageError` when the model cannot work on this data
        (too many parameters for ``model.max_params``, more neighbours than samples ...)."""

    @abc.abstractmethod
    def fit(self, model_cfg: Mapping[str, Any], splits: Splits, seed: int,
            on_epoch: EpochCallback) -> FitResult:
        """Build the model from its config and train it on ``splits`` (train; val for early stopping)."""

    @abc.abstractmethod
    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Class indices predicted for ``x``."""

    @abc.abstractmethod
    def n_params(self, model: Any) -> int:
        """Number of trained numbers the model holds."""

    @abc.abstractmethod
    def log_model(self, model: Any, splits: Splits, name: str, model_id: str | None = None) -> str:
        """Log the model with its MLflow flavor to the active run, or write the pending logged
        model ``model_id`` (``models.start_model``: from any thread); return its model URI."""

    @abc.abstractmethod
    def load_model(self, model_uri: str) -> Any:
        """Load a model logged by :meth:`log_model`."""

    def preload(self) -> None:
        """Import the framework now: a study's helper process does while the study checks its config and data
        (not the study's own process: an import in a thread beside the stores' set-up slowed both)."""
        return None

    def accuracy(self, model: Any, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(model, x) == y))


def pinned_requirements(*distributions: str) -> list[str]:
    """``name==version`` for each installed distribution (the first found of ``a|b`` choices).

    Logged models get explicit requirements: letting MLflow infer them costs 3 to 6 s.
    """
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for choice in distributions:
        for dist in choice.split("|"):
            try:
                pins.append(f"{dist}=={version(dist)}")
                break
            except PackageNotFoundError:
                continue
    return pins


def tensor_signature(splits: Splits) -> Any:
    """MLflow signature from the data's shapes: float32 samples in, class probabilities out.

    Built from shapes, so logging a model needs no prediction (a Keras predict traces a
    new function: 0.1 to 0.2 s per trial).
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *splits.x_train.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, splits.n_classes))]),
    )
