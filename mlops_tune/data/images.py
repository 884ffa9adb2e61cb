"""Image loaders: a folder of images per class (Keras' directory reader), and Keras' own datasets.

Both import TensorFlow, so they are imported only when ``data.loader`` names them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlops_tune.data import Dataset, with_encoded_labels
from mlops_tune.runtime.errors import UsageError, first_line
from mlops_tune.runtime.logs import tensorflow_load_filtered


def load_images(path: str, image_size: Sequence[int] = (32, 32), color_mode: str = "grayscale") -> Dataset:
    """One sub-folder per class of PNG/JPEG images (Keras' directory reader)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UsageError(f"data.path: folder not found: {folder}")
    if color_mode not in ("grayscale", "rgb"):
        raise UsageError(f"data.color_mode: '{color_mode}' is not grayscale or rgb")
    _check_images(folder)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no TensorFlow log lines before our messages
    with tensorflow_load_filtered():
        from keras.utils import image_dataset_from_directory

    try:
        ds = image_dataset_from_directory(
            str(folder),
            labels="inferred",
            label_mode="int",
            color_mode=color_mode,
            image_size=tuple(image_size),
            batch_size=None,
            shuffle=False,
            verbose=False,
        )
    except ValueError as exc:
        raise UsageError(f"data.path: no images read from {folder} ({exc})") from None
    xs, ys = [], []
    for image, label in ds.as_numpy_iterator():
        xs.append(image)
        ys.append(label)
    if not xs:
        raise UsageError(f"data.path: no PNG/JPEG images under {folder}")
    x = np.stack(xs).astype(np.float32)
    return Dataset(
        x=x,
        y=np.asarray(ys, dtype=np.int64),
        classes=list(ds.class_names),
        image_shape=tuple(int(d) for d in x.shape[1:]),  # type: ignore[arg-type]
    )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def _check_images(folder: Path) -> None:
    """Name the first image file that cannot be decoded (TensorFlow would fail mid-read)."""
    from PIL import Image

    for file in sorted(folder.rglob("*")):
        if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
            try:
                with Image.open(file) as image:
                    image.load()
            except Exception as exc:
                raise UsageError(f"data.path: {file} is not a readable image ({first_line(exc, 200)})") from None


KERAS_DATASETS = ("mnist", "fashion_mnist", "cifar10")


def load_keras(dataset: str = "mnist", limit: int | None = None) -> Dataset:
    """A Keras dataset by name, downloaded into the Keras cache on first use."""
    if dataset not in KERAS_DATASETS:
        raise UsageError(f"data.dataset: '{dataset}' is not one of {', '.join(KERAS_DATASETS)}")
    import importlib

    module = importlib.import_module(f"keras.datasets.{dataset}")
    (x_a, y_a), (x_b, y_b) = module.load_data()
    x = np.concatenate([x_a, x_b])
    y = np.concatenate([y_a, y_b]).reshape(-1)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    if x.ndim == 3:
        x = x[..., np.newaxis]
    return with_encoded_labels(x.astype(np.float32), y, tuple(int(d) for d in x.shape[1:]))  # type: ignore[arg-type]
