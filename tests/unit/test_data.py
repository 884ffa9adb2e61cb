"""Loaders and the split, on bundled and made data (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlops_tune.data import check_classes, load_npz, load_sklearn, load_splits, split
from mlops_tune.data.images import load_keras
from mlops_tune.data.tabular import load_csv
from mlops_tune.runtime.errors import UsageError


@pytest.mark.parametrize(("name", "n_classes", "image"), [
    ("digits", 10, (8, 8, 1)), ("breast_cancer", 2, None), ("wine", 3, None), ("iris", 3, None),
])
def test_bundled_datasets(name: str, n_classes: int, image: tuple | None) -> None:
    data = load_sklearn(name, image_shape=image and list(image))
    assert len(data.classes) == n_classes
    assert data.x.dtype == np.float32 and data.x.ndim == 2
    assert data.image_shape == image


def test_split_is_stratified_disjoint_and_seeded() -> None:
    cfg = {"name": "digits", "loader": "sklearn", "dataset": "digits", "val_size": 0.2, "test_size": 0.2}
    a, b, c = load_splits(cfg, 1), load_splits(cfg, 1), load_splits(cfg, 2)
    assert len(a.y_train) + len(a.y_val) + len(a.y_test) == 1797
    assert len(a.y_test) == 360 and len(a.y_val) == 360
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert not np.array_equal(a.x_val, c.x_val)
    for labels in (a.y_train, a.y_val, a.y_test):  # every class in every split
        assert set(labels) == set(range(10))
    # the three splits partition the dataset: every sample exactly once
    together = np.concatenate([a.x_train, a.x_val, a.x_test])
    original = load_sklearn("digits").x
    np.testing.assert_array_equal(np.unique(together, axis=0), np.unique(original, axis=0))
    assert len(together) == len(original)


def test_each_family_gets_its_shape() -> None:
    splits = load_splits({"name": "digits", "loader": "sklearn", "dataset": "digits", "image_shape": [8, 8, 1],
                          "val_size": 0.2, "test_size": 0.2}, 0)
    assert splits.as_input("image").x_train.shape[1:] == (8, 8, 1)
    assert splits.as_input("image").as_input("flat").x_val.shape[1:] == (64,)
    tabular = load_splits({"name": "wine", "loader": "sklearn", "dataset": "wine",
                           "val_size": 0.2, "test_size": 0.2}, 0)
    with pytest.raises(UsageError, match="needs images"):
        tabular.as_input("image")


def test_csv_maps_string_labels_and_keeps_spaced_columns(tmp_path: Path) -> None:
    frame = pd.DataFrame({"petal length": [1.0, 2.0, 3.0], "w": [0.1, 0.2, 0.3], "kind": ["b", "a", "b"]})
    frame.to_csv(tmp_path / "x.csv", index=False)
    data = load_csv(str(tmp_path / "x.csv"), "kind")
    assert data.classes == ["a", "b"]
    assert list(data.y) == [1, 0, 1]
    assert data.feature_names == ["petal length", "w"]
    only = load_csv(str(tmp_path / "x.csv"), "kind", features=["w"])
    assert only.x.shape == (3, 1)


def test_csv_text_features_rejected_or_encoded(tmp_path: Path) -> None:
    frame = pd.DataFrame({"color": ["red", "blue", "red"], "v": [1, 2, 3], "y": [0, 1, 0]})
    frame.to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(UsageError, match=r"'color'.*not numeric"):
        load_csv(str(tmp_path / "x.csv"), "y")
    data = load_csv(str(tmp_path / "x.csv"), "y", encode_categorical=True)
    assert data.feature_names == ["v", "color_blue", "color_red"]
    assert data.x[0].tolist() == [1.0, 0.0, 1.0]


def test_csv_missing_values_are_named(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a,b,y\n1,,0\n2,3,1\n")
    with pytest.raises(UsageError, match=r"missing values in column.*'b'"):
        load_csv(str(tmp_path / "x.csv"), "y")


def test_npz_flat_and_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "flat.npz", x=rng.normal(size=(30, 5)), y=np.array(["u", "v", "w"] * 10))
    flat = load_npz(str(tmp_path / "flat.npz"))
    assert flat.image_shape is None and flat.classes == ["u", "v", "w"]
    np.savez(tmp_path / "img.npz", x=rng.integers(0, 255, size=(30, 6, 6)), y=np.arange(30) % 2)
    images = load_npz(str(tmp_path / "img.npz"))
    assert images.image_shape == (6, 6, 1) and images.x.shape == (30, 6, 6, 1)
    np.savez(tmp_path / "bad.npz", features=np.zeros((3, 2)))
    with pytest.raises(UsageError, match="must hold arrays 'x' and 'y'"):
        load_npz(str(tmp_path / "bad.npz"))


def test_keras_loader_on_made_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real loader code, with Keras' download replaced by made arrays (no network in tests)."""
    import types

    rng = np.random.default_rng(0)
    made = ((rng.integers(0, 255, (40, 28, 28)), rng.integers(0, 10, 40)),
            (rng.integers(0, 255, (10, 28, 28)), rng.integers(0, 10, 10)))
    fake = types.ModuleType("keras.datasets.mnist")
    fake.load_data = lambda: made  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "keras.datasets.mnist", fake)
    data = load_keras("mnist", limit=30)
    assert data.x.shape == (30, 28, 28, 1) and data.image_shape == (28, 28, 1)
    with pytest.raises(UsageError, match="not one of"):
        load_keras("imagenet")


@pytest.mark.slow
def test_images_loader_reads_class_folders(tmp_path: Path) -> None:
    from PIL import Image

    from mlops_tune.data.images import load_images

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(6):
            pixels = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.{'png' if i % 2 else 'jpg'}")
    data = load_images(str(tmp_path), image_size=[8, 8], color_mode="grayscale")
    assert data.x.shape == (12, 8, 8, 1)
    assert data.classes == ["cat", "dog"] and sorted(set(data.y)) == [0, 1]


def test_split_rejects_one_class_and_too_few_samples() -> None:
    from mlops_tune.data import Dataset

    one = Dataset(x=np.zeros((20, 2), np.float32), y=np.zeros(20, np.int64), classes=["only"])
    with pytest.raises(UsageError, match="only one class"):
        split(one, 0.2, 0.2, 0)
    few = Dataset(x=np.zeros((6, 2), np.float32), y=np.array([0, 1] * 3), classes=["a", "b"])
    with pytest.raises(UsageError, match="too few"):
        split(few, 0.2, 0.2, 0)


@pytest.mark.parametrize("name", ["digits", "wine"])
def test_splits_handed_to_a_helper_process_arrive_equal(name: str) -> None:
    """A study's helper processes take the splits its process checked, pickled through a
    multiprocessing queue: every array, label and field alike."""
    import pickle

    splits = load_splits({"name": name, "loader": "sklearn", "dataset": name, "val_size": 0.2, "test_size": 0.2,
                          **({"image_shape": [8, 8, 1]} if name == "digits" else {})}, seed=3)
    back = pickle.loads(pickle.dumps(splits))
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(back, field), getattr(splits, field))
        assert getattr(back, field).dtype == getattr(splits, field).dtype
    assert (back.classes, back.feature_names, back.image_shape, back.dataset_name, back.fingerprint) == (
        splits.classes, splits.feature_names, splits.image_shape, splits.dataset_name, splits.fingerprint)
    assert back.fingerprint  # a loaded dataset has one
    if name == "digits":  # the CNN's view of them too
        np.testing.assert_array_equal(back.as_input("image").x_val, splits.as_input("image").x_val)


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(min_value=3, max_value=40), min_size=2, max_size=60),
       as_float=st.booleans(), offset=st.integers(min_value=-5, max_value=5))
def test_labels_that_are_classes_pass(counts: list[int], as_float: bool, offset: int) -> None:
    """Any number of classes, each with the 3 rows a split needs, as integers or integral floats."""
    labels = np.repeat(np.arange(len(counts)) + offset, counts)
    check_classes(labels.astype(np.float64) if as_float else labels, "y")


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).filter(lambda v: v % 1 != 0),
                       min_size=21, max_size=300, unique=True))
def test_many_distinct_fractional_labels_are_a_regression_target(values: list[float]) -> None:
    with pytest.raises(UsageError, match="regression target"):
        check_classes(np.array(values), "data.target: column 'y'")


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=42, max_value=400))
def test_one_label_per_row_is_not_classes(n: int) -> None:
    with pytest.raises(UsageError, match="not classes"):
        check_classes(np.array([f"id-{i}" for i in range(n)], dtype=object), "data.target: column 'id'")


def test_a_header_with_control_bytes_is_never_printed_raw(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(b"a,b\x1b[2J,label\n1,2,x\n")
    with pytest.raises(UsageError) as info:
        load_csv(str(path), "label")
    assert str(info.value).isprintable() and "binary data" in str(info.value)
