"""Dataset loaders and the stratified train / validation / test split.

Every loader returns a :class:`Dataset` of raw features (no scaling: scaling belongs to
the model, so that a logged model takes the same inputs as the data file). The split
then hands each model family the shape it asks for (flat vectors or images with a
channel axis) through :meth:`Splits.as_input`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mlops_tune.runtime.errors import UsageError, first_line

InputKind = Literal["flat", "image"]

#: Keys every ``data`` config has; the rest are the loader's keyword arguments.
COMMON_KEYS = frozenset({"name", "loader", "val_size", "test_size"})


@dataclass(frozen=True)
class Dataset:
    """Raw samples with integer labels ``0..k-1``.

    Attributes:
        x: float32 features, samples first; ``(n, features)`` or ``(n, h, w, c)``.
        y: int64 labels.
        classes: the original label of each class index (kept with the model).
        feature_names: column names of flat tabular data, else ``None``.
        image_shape: ``(h, w, c)`` when the samples can be viewed as images.
    """

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    feature_names: list[str] | None = None
    image_shape: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class Splits:
    """Train / validation / test arrays of one dataset, in one input shape."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    feature_names: list[str] | None
    image_shape: tuple[int, int, int] | None
    dataset_name: str
    #: identity of the loaded dataset (:func:`fingerprint`); empty for splits made by hand
    fingerprint: str = ""

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def as_input(self, kind: InputKind) -> Splits:
        """The same splits reshaped for a family that takes ``kind`` inputs."""
        if kind == "flat":
            shape: tuple[int, ...] = (int(np.prod(self.x_train.shape[1:])),)
        elif self.image_shape is None:
            raise UsageError(
                f"data={self.dataset_name}: this model needs images, but the data has no "
                "image shape (use data=digits, npz with 3-D/4-D x, images or keras)"
            )
        else:
            shape = self.image_shape
        if self.x_train.shape[1:] == shape:
            return self

        def reshape(x: np.ndarray) -> np.ndarray:
            return x.reshape((x.shape[0], *shape))

        return replace(
            self,
            x_train=reshape(self.x_train),
            x_val=reshape(self.x_val),
            x_test=reshape(self.x_test),
        )


# --------------------------------------------------------------------------- loaders


def load_sklearn(dataset: str, image_shape: Sequence[int] | None = None) -> Dataset:
    """A dataset bundled with scikit-learn (``dataset``: digits, breast_cancer, wine, iris ...);
    ``image_shape`` ``[h, w, c]`` when its samples are images (digits: ``[8, 8, 1]``)."""
    from sklearn import datasets

    loader = getattr(datasets, f"load_{dataset}", None) if isinstance(dataset, str) else None
    if loader is None or dataset in ("files", "sample_image", "sample_images", "svmlight_file", "svmlight_files"):
        raise UsageError(f"data.dataset: '{dataset}' is not a scikit-learn bundled dataset")
    bunch = loader()
    if "target_names" not in bunch:
        raise UsageError(f"data.dataset: '{dataset}' is a regression dataset (its target has no classes); "
                         "mlops-tune tunes classifiers")
    if image_shape is not None:
        image_shape = _image_shape(image_shape, int(np.prod(np.shape(bunch.data)[1:])))
    names = [str(c) for c in bunch.target_names]
    return Dataset(
        x=np.asarray(bunch.data, dtype=np.float32),
        y=np.asarray(bunch.target, dtype=np.int64),
        classes=names,
        feature_names=None if image_shape else [str(f) for f in bunch.feature_names],
        image_shape=image_shape,
    )


#: more distinct labels than this, continuous or one per sample, is not a classification target
MAX_CLASSES_UNCHECKED = 20


def check_classes(labels: np.ndarray, what: str) -> None:
    """Refuse labels that are not classes: a continuous value (many distinct non-integral
    numbers) or mostly one or two rows per label (an identifier, a count), which would otherwise
    be reported as too few samples per class."""
    values = np.asarray(labels).reshape(-1)
    distinct, counts = np.unique(values.astype(str) if values.dtype == object else values, return_counts=True)
    if len(distinct) <= MAX_CLASSES_UNCHECKED:
        return
    numeric = np.issubdtype(values.dtype, np.number)
    continuous = numeric and np.issubdtype(values.dtype, np.floating) and not np.all(np.mod(distinct, 1) == 0)
    if continuous:
        raise UsageError(f"{what} looks like a regression target ({len(distinct)} distinct values in "
                         f"{len(values)} rows, e.g. {distinct[len(distinct) // 2]:g}); mlops-tune tunes classifiers: "
                         "bin it into classes first")
    if np.median(counts) < 3:  # most "classes" too small to split: not classes
        raise UsageError(f"{what} has {len(distinct)} distinct values in {len(values)} rows, most of them in fewer "
                         "than 3 rows: a continuous value or an identifier, not classes")


def load_npz(path: str) -> Dataset:
    """A ``.npz`` archive with arrays ``x`` (samples first) and ``y``."""
    file = existing_file(path, "data.path")
    with open(file, "rb") as handle:
        magic = handle.read(6)
    if not magic.startswith((b"PK", b"\x93NUMPY")):
        kind = "a text file (use data=csv for a CSV)" if _is_text(magic) else "neither a zip nor a NumPy file"
        raise UsageError(f"data.path: {file} is not a .npz archive: it is {kind}")
    try:
        with np.load(file, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise UsageError(f"data.path: {file} is a single .npy array, not a .npz archive with 'x' and 'y'")
            if "x" not in archive or "y" not in archive:
                held = ", ".join(archive.files) or "no arrays at all"
                raise UsageError(f"data.path: {file} must hold arrays 'x' and 'y' (it holds {held})")
            x, y = archive["x"], archive["y"]
    except UsageError:
        raise
    except Exception as exc:  # a text file ("pickled data"), a broken zip, a truncated array ...
        raise UsageError(f"data.path: {file} is not a readable .npz archive ({first_line(exc, 200)}); "
                         "write one with numpy.savez(path, x=..., y=...)") from None
    if x.ndim < 2 or y.ndim < 1:
        raise UsageError(f"data.path: array 'x' in {file} must have samples first, shape (n, features...) "
                         f"(x has shape {x.shape}, y has shape {y.shape})")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise UsageError(f"data.path: array 'x' in {file} is not real-valued ({x.dtype})")
    if x.ndim == 3:
        x = x[..., np.newaxis]
    image_shape = tuple(int(d) for d in x.shape[1:]) if x.ndim == 4 else None
    return with_encoded_labels(x.astype(np.float32), y, image_shape)  # type: ignore[arg-type]



#: the loaders by ``data.loader``; image loaders are named (``module:function``) and imported when chosen
LOADERS: Mapping[str, Callable[..., Dataset] | str] = {
    "sklearn": load_sklearn,
    "csv": "mlops_tune.data.tabular:load_csv",
    "npz": load_npz,
    "images": "mlops_tune.data.images:load_images",
    "keras": "mlops_tune.data.images:load_keras",
}


def _image_shape(shape: Sequence[int], n_features: int) -> tuple[int, int, int]:
    """``data.image_shape`` checked against the number of features per sample."""
    if (not isinstance(shape, (list, tuple)) or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise UsageError(f"data.image_shape: must be [height, width, channels], got {shape!r}")
    if int(np.prod(shape)) != n_features:
        raise UsageError(f"data.image_shape: {list(shape)} holds {int(np.prod(shape))} values, "
                         f"but each sample has {n_features} features")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


# --------------------------------------------------------------------------- entry points


def loader_arguments(data_cfg: Mapping[str, Any]) -> tuple[Callable[..., Dataset], dict[str, Any]]:
    """The loader a ``data`` config names and the keyword arguments it passes to it.

    Raises:
        UsageError: unknown loader, unknown key or missing required value.
    """
    loader_name = data_cfg.get("loader")
    if loader_name not in LOADERS:
        raise UsageError(f"data.loader: '{loader_name}' is not one of {', '.join(LOADERS)}")
    loader = LOADERS[loader_name]
    if isinstance(loader, str):
        import importlib

        module, _, function = loader.partition(":")
        loader = getattr(importlib.import_module(module), function)
    params = inspect.signature(loader).parameters
    kwargs = {k: v for k, v in data_cfg.items() if k not in COMMON_KEYS}
    for key in kwargs:
        if key not in params:
            raise UsageError(f"data.{key}: unknown key for the {loader_name} loader (known: {', '.join(params)})")
    for key, param in params.items():
        if param.default is inspect.Parameter.empty and kwargs.get(key) is None:
            raise UsageError(f"data.{key}: required for data={data_cfg.get('name')}, e.g. data.{key}=...")
    for key in ("val_size", "test_size"):
        value = data_cfg.get(key)
        if not isinstance(value, (int, float)) or not 0 < value < 1:
            raise UsageError(f"data.{key}: must be a fraction between 0 and 1, got {value!r}")
    if data_cfg["val_size"] + data_cfg["test_size"] >= 1:
        raise UsageError("data.val_size + data.test_size: must leave samples to train on (sum < 1)")
    return loader, kwargs


def load_splits(data_cfg: Mapping[str, Any], seed: int) -> Splits:
    """Load the dataset a ``data`` config describes and split it (stratified, seeded)."""
    loader, kwargs = loader_arguments(data_cfg)
    dataset = loader(**kwargs)
    check_finite(dataset, str(data_cfg.get("path") or data_cfg.get("name")))
    splits = split(dataset, float(data_cfg["val_size"]), float(data_cfg["test_size"]), seed,
                   name=str(data_cfg.get("name")))
    return replace(splits, fingerprint=fingerprint(dataset))


def fingerprint(dataset: Dataset) -> str:
    """A digest of the loaded samples, labels and class names (not of the file: a CSV saved
    again with the same rows is the same data; one row changed is other data)."""
    import hashlib

    digest = hashlib.sha256()
    for array in (dataset.x, dataset.y):
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
        digest.update(contiguous.tobytes())
    digest.update("\x1f".join(map(str, dataset.classes)).encode())
    return digest.hexdigest()[:16]


def split(dataset: Dataset, val_size: float, test_size: float, seed: int, name: str = "data") -> Splits:
    """Stratified train / validation / test split.

    Raises:
        UsageError: one class only, or too few samples for every split to hold each class.
    """
    from sklearn.model_selection import train_test_split

    n = len(dataset.y)
    n_classes = len(dataset.classes)
    if n_classes < 2:
        only = dataset.classes[0] if dataset.classes else "none"
        raise UsageError(f"data={name}: the target has only one class ('{only}'); a classifier needs two or more")
    counts = np.bincount(dataset.y, minlength=n_classes)
    n_test = math.ceil(n * test_size)
    n_val = math.ceil((n - n_test) * val_size / (1 - test_size))
    n_train = n - n_test - n_val
    if min(n_test, n_val, n_train) < n_classes or counts.min() < 3:
        raise UsageError(
            f"data={name}: {n} samples are too few for val_size={val_size} and test_size={test_size} "
            f"with {n_classes} classes (every split needs each class; smallest class has {counts.min()})"
        )
    x_rest, x_test, y_rest, y_test = train_test_split(
        dataset.x, dataset.y, test_size=n_test, stratify=dataset.y, random_state=seed
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=n_val, stratify=y_rest, random_state=seed
    )
    return Splits(
        x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test,
        classes=dataset.classes, feature_names=dataset.feature_names,
        image_shape=dataset.image_shape, dataset_name=name,
    )


def check_finite(dataset: Dataset, source: str) -> None:
    """Refuse NaN or infinite features, naming the columns of tabular data."""
    finite = np.isfinite(dataset.x)
    if finite.all():
        return
    if dataset.feature_names is not None and dataset.x.ndim == 2:
        bad = [name for name, ok in zip(dataset.feature_names, finite.all(axis=0), strict=True) if not ok]
        raise UsageError(f"data.features: NaN or infinite values in column(s) {', '.join(map(repr, bad[:5]))} "
                         f"of {source}")
    raise UsageError(f"data.path: {int((~finite).sum())} NaN or infinite value(s) in the features of {source}")


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(head) and all(32 <= b < 127 or b in (9, 10, 13) for b in head)


def existing_file(path: str, key: str) -> Path:
    """``path`` as a regular, readable file, or a one-line error saying what it is instead."""
    import os
    import stat

    file = Path(path).expanduser()
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"{key}: file not found: {file}") from None
    except OSError as exc:  # too long a name, a path through a file ...
        raise UsageError(f"{key}: {file}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{key}: {file} is a folder, not a file")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or
                stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise UsageError(f"{key}: {file} is {kind}, not a regular file")
    if not os.access(file, os.R_OK):
        raise UsageError(f"{key}: {file} cannot be read (permission denied)")
    return file


def with_encoded_labels(x: np.ndarray, y: np.ndarray, image_shape: tuple[int, int, int] | None) -> Dataset:
    y = np.asarray(y).reshape(-1)
    if len(y) != len(x):
        raise UsageError(f"data: x has {len(x)} samples but y has {len(y)} labels")
    check_classes(y, "data: array 'y'")
    uniques, codes = np.unique(y, return_inverse=True)
    return Dataset(x=x, y=codes.astype(np.int64), classes=[str(u) for u in uniques], image_shape=image_shape)
