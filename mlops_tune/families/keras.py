"""Keras families: a dense network (``keras_dense``) and a CNN (``keras_cnn``).

TensorFlow is imported only inside :meth:`fit`/:meth:`load_model`, never at import time,
so validating a Keras config or running a scikit-learn trial stays light.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from mlops_tune.data import Splits
from mlops_tune.families._base import EpochCallback, Family, FitResult, pinned_requirements, tensor_signature
from mlops_tune.runtime.errors import UsageError, check_int
from mlops_tune.runtime.logs import tensorflow_load_filtered, verbose

ACTIVATIONS = ("relu", "tanh", "elu", "selu", "gelu", "sigmoid", "swish")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "nadam")
#: ``model.max_params`` when not set: 5 million parameters (about 20 MB of float32 weights,
#: some 60 MB while Adam trains); far above the study's search spaces, far below a blow-up
DEFAULT_MAX_PARAMS = 5_000_000


#: the largest learning rate a config may give (beyond, every optimizer diverges at once)
MAX_LEARNING_RATE = 10.0


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def _keras() -> Any:
    if not verbose() and not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"  # TensorFlow's C++ log lines (see logs.py)
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if "keras" not in sys.modules:
        # Keras imports scikit-learn at start for its scikit-learn wrappers (keras.wrappers),
        # which mlops-tune does not use: 0.5-1.2 s of CPU (with SciPy) in a process whose trials
        # never touch it (a study's helper process, a Project worker), while the others import
        # too. Keras takes it as not installed; later imports of scikit-learn work as usual.
        without_sklearn = "sklearn" not in sys.modules and threading.active_count() == 1
        with tensorflow_load_filtered():
            if without_sklearn:
                sys.modules["sklearn"] = None  # type: ignore[assignment]
            try:
                import keras
            finally:
                if without_sklearn:
                    del sys.modules["sklearn"]
    import keras

    # Every trial builds a new model, so "retracing" warnings are expected noise.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    return keras


_determinism_enabled = False


def _seed_keras(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and make TF ops deterministic on CPU."""
    global _determinism_enabled
    keras = _keras()
    keras.utils.set_random_seed(seed)
    if not _determinism_enabled:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        _determinism_enabled = True


class _KerasFamily(Family):
    image = "keras"

    def preload(self) -> None:
        """Import TensorFlow and Keras now (the slowest import of a study), and MLflow's Keras flavour (the
        first logged model's import)."""
        _keras()
        import mlflow.keras  # noqa: F401

    keys: ClassVar[frozenset[str]] = frozenset({
        "name", "family", "hidden_units", "activation", "dropout", "optimizer",
        "learning_rate", "batch_size", "epochs", "early_stopping_patience",
    })
    #: keys a config may leave out
    optional_keys: ClassVar[frozenset[str]] = frozenset({"max_params"})
    min_hidden_layers: ClassVar[int] = 1

    # ------------------------------------------------------------------ validation
    def validate(self, model_cfg: Mapping[str, Any]) -> None:
        known = self.keys | self.optional_keys
        for key in model_cfg:
            if key not in known:
                raise UsageError(f"model.{key}: unknown key for model family {self.name} "
                                 f"(known: {', '.join(sorted(known))})")
        missing = sorted(self.keys - set(model_cfg))
        if missing:
            raise UsageError(f"model.{missing[0]}: missing for model family {self.name}")
        _positive_ints(model_cfg["hidden_units"], "model.hidden_units", self.min_hidden_layers)
        _choice(model_cfg["activation"], ACTIVATIONS, "model.activation")
        _choice(model_cfg["optimizer"], OPTIMIZERS, "model.optimizer")
        dropout = model_cfg["dropout"]
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise UsageError(f"model.dropout: must be in [0, 1), got {dropout!r}")
        lr = model_cfg["learning_rate"]
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= MAX_LEARNING_RATE:
            raise UsageError(f"model.learning_rate: must be in (0, {MAX_LEARNING_RATE:g}], got {lr!r}")
        for key in ("batch_size", "epochs"):
            check_int(model_cfg[key], f"model.{key}")
        check_int(model_cfg["early_stopping_patience"], "model.early_stopping_patience", low=0)
        check_int(model_cfg.get("max_params", DEFAULT_MAX_PARAMS), "model.max_params")

    def check_data(self, model_cfg: Mapping[str, Any], splits: Splits) -> None:
        """Refuse a model larger than ``model.max_params`` before it is built (memory)."""
        limit = int(model_cfg.get("max_params", DEFAULT_MAX_PARAMS))
        size = self.estimate_params(model_cfg, splits)
        if size > limit:
            raise UsageError(f"model.hidden_units: this architecture has {size:,} parameters on this data, "
                             f"more than model.max_params={limit:,} (raise model.max_params to allow it)")

    def estimate_params(self, model_cfg: Mapping[str, Any], splits: Splits) -> int:
        """The parameter count of the model :meth:`build` makes, from its config and the data's shape."""
        shape = splits.as_input(self.input_kind).x_train.shape[1:]
        width, total = self.feature_params(model_cfg, tuple(int(d) for d in shape))
        for units in [*model_cfg["hidden_units"], splits.n_classes]:
            total += width * int(units) + int(units)
            width = int(units)
        return total

    def feature_params(self, model_cfg: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[int, int]:
        """(features entering the Dense stack, parameters of the feature layers)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def build(self, model_cfg: Mapping[str, Any], splits: Splits) -> Any:
        keras = _keras()
        inputs = keras.Input(shape=splits.x_train.shape[1:], name="x")
        x = self.feature_layers(keras, model_cfg, splits, inputs)
        for units in model_cfg["hidden_units"]:
            x = keras.layers.Dense(int(units), activation=model_cfg["activation"])(x)
            if model_cfg["dropout"] > 0:
                x = keras.layers.Dropout(float(model_cfg["dropout"]))(x)
        outputs = keras.layers.Dense(splits.n_classes, activation="softmax", name="probabilities")(x)
        return keras.Model(inputs, outputs, name=str(model_cfg["name"]))

    def feature_layers(self, keras: Any, model_cfg: Mapping[str, Any], splits: Splits, inputs: Any) -> Any:
        raise NotImplementedError

    def fit(self, model_cfg: Mapping[str, Any], splits: Splits, seed: int,
            on_epoch: EpochCallback) -> FitResult:
        keras = _keras()
        keras.backend.clear_session()  # drop earlier trials' graphs: a study trains many models
        _seed_keras(seed)
        model = self.build(model_cfg, splits)
        optimizer = keras.optimizers.get(
            {"class_name": model_cfg["optimizer"], "config": {"learning_rate": float(model_cfg["learning_rate"])}}
        )
        batch_size = int(model_cfg["batch_size"])
        steps_per_epoch = max(1, math.ceil(len(splits.x_train) / batch_size))
        # One tf.function call per epoch: per-step Python overhead dominates small models.
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                      steps_per_execution=steps_per_epoch)
        history: list[dict[str, float]] = []
        callbacks = [_epoch_reporter(keras, history, on_epoch)]
        if model_cfg["early_stopping_patience"] > 0:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_accuracy", mode="max", patience=int(model_cfg["early_stopping_patience"]),
                restore_best_weights=True,
            ))
        train_data, val_data = _datasets(splits, batch_size, seed)
        model.fit(train_data, validation_data=val_data, epochs=int(model_cfg["epochs"]),
                  callbacks=callbacks, verbose=0, shuffle=False)  # the dataset shuffles, seeded
        return FitResult(model=model, history=history)

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        # The model called on the arrays, not model.predict: predict traces a tf.function for
        # every new model (0.2 s a trial on digits, more than the forward pass itself)
        keras = _keras()
        x = np.asarray(x, dtype="float32")
        chunks = [keras.ops.convert_to_numpy(model(x[i:i + 4096], training=False)) for i in range(0, len(x), 4096)]
        return np.argmax(np.concatenate(chunks), axis=1) if chunks else np.empty(0, dtype=int)

    def n_params(self, model: Any) -> int:
        return int(model.count_params())

    # ------------------------------------------------------------------ MLflow
    def log_model(self, model: Any, splits: Splits, name: str, model_id: str | None = None) -> str:
        import mlflow.keras

        info = mlflow.keras.log_model(
            model, name=name, model_id=model_id, signature=tensor_signature(splits),
            metadata={"classes": splits.classes},
            pip_requirements=pinned_requirements("keras", "tensorflow|tensorflow-cpu", "numpy"),
        )
        return str(info.model_uri)

    def load_model(self, model_uri: str) -> Any:
        _keras()
        import mlflow.keras

        return mlflow.keras.load_model(model_uri)


class DenseFamily(_KerasFamily):
    """A stack of Dense layers on standardized flat features (the original loop's ANN)."""

    name = "keras_dense"
    input_kind = "flat"

    def feature_params(self, model_cfg: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[int, int]:
        return math.prod(shape), 0  # Normalization with a given mean and variance holds no weights

    def feature_layers(self, keras: Any, model_cfg: Mapping[str, Any], splits: Splits, inputs: Any) -> Any:
        # Standardize inside the model so the logged model takes raw features.
        mean = splits.x_train.mean(axis=0)
        variance = splits.x_train.var(axis=0)
        # A feature constant in training (digits' corner pixels) keeps its scale, as sklearn's
        # StandardScaler does: Keras divides by max(std, 1e-7), so a validation value of 1 there
        # became 1e7 and the softmax saturated (val_loss in the thousands).
        variance = np.where(variance > 0, variance, 1.0)
        return keras.layers.Normalization(mean=mean, variance=variance, name="standardize")(inputs)


class ConvFamily(_KerasFamily):
    """Conv2D + MaxPool blocks, Flatten, a Dense head (the original loop's CNN)."""

    name = "keras_cnn"
    input_kind = "image"
    keys = _KerasFamily.keys | {"conv_filters", "kernel_size"}
    min_hidden_layers = 0

    def validate(self, model_cfg: Mapping[str, Any]) -> None:
        super().validate(model_cfg)
        _positive_ints(model_cfg["conv_filters"], "model.conv_filters", 1)
        check_int(model_cfg["kernel_size"], "model.kernel_size")

    def feature_params(self, model_cfg: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[int, int]:
        height, width, channels = shape
        kernel, total = int(model_cfg["kernel_size"]), 0
        for filters in model_cfg["conv_filters"]:
            total += kernel * kernel * channels * int(filters) + int(filters)
            channels = int(filters)
            if min(height, width) >= 2:  # as feature_layers: pool while larger than 1x1
                height, width = height // 2, width // 2
        return height * width * channels, total

    def feature_layers(self, keras: Any, model_cfg: Mapping[str, Any], splits: Splits, inputs: Any) -> Any:
        scale = float(np.abs(splits.x_train).max()) or 1.0
        x = keras.layers.Rescaling(1.0 / scale, name="rescale")(inputs)
        size = min(splits.x_train.shape[1:3])
        for filters in model_cfg["conv_filters"]:
            x = keras.layers.Conv2D(int(filters), int(model_cfg["kernel_size"]), padding="same",
                                    activation=model_cfg["activation"])(x)
            if size >= 2:  # pool while the feature map is still larger than 1x1
                x = keras.layers.MaxPooling2D(2)(x)
                size = math.floor(size / 2)
        return keras.layers.Flatten()(x)


def _datasets(splits: Splits, batch_size: int, seed: int) -> tuple[Any, Any]:
    """Seeded, reshuffled training batches and cached validation batches (tf.data)."""
    import tensorflow as tf

    train = (tf.data.Dataset.from_tensor_slices((splits.x_train, splits.y_train))
             .shuffle(len(splits.x_train), seed=seed, reshuffle_each_iteration=True)
             .batch(batch_size).prefetch(tf.data.AUTOTUNE))
    val = tf.data.Dataset.from_tensor_slices((splits.x_val, splits.y_val)).batch(4096).cache()
    return train, val


def _epoch_reporter(keras: Any, history: list[dict[str, float]], on_epoch: EpochCallback) -> Any:
    class EpochReporter(keras.callbacks.Callback):  # type: ignore[misc, name-defined]
        def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
            logs = logs or {}
            metrics = {
                "loss": float(logs.get("loss", math.nan)),
                "train_accuracy": float(logs.get("accuracy", math.nan)),
                "val_accuracy": float(logs.get("val_accuracy", math.nan)),
                "val_loss": float(logs.get("val_loss", math.nan)),
            }
            history.append(metrics)
            if not math.isfinite(metrics["loss"]):
                raise TrainingDiverged(f"loss became {metrics['loss']} at epoch {epoch}")
            on_epoch(epoch, metrics)

    return EpochReporter()


def _positive_ints(values: Any, key: str, min_len: int) -> None:
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise UsageError(f"{key}: must be a list of positive integers, got {values!r}")
    if len(values) < min_len:
        raise UsageError(f"{key}: needs at least {min_len} entr{'y' if min_len == 1 else 'ies'}, got {list(values)}")
    if not all(isinstance(value, int) and not isinstance(value, bool) and value >= 1 for value in values):
        raise UsageError(f"{key}: sizes must be positive integers, got {list(values)}")


def _choice(value: Any, choices: Sequence[str], key: str) -> None:
    if value not in choices:
        raise UsageError(f"{key}: '{value}' is not one of {', '.join(choices)}")
