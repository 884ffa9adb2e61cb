"""The CSV loader: a header row, a label column, numeric (or one-hot encoded) features, every
oddity of the file named in one line (a binary file, duplicate names, a column that would
explode into one-hot columns)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlops_tune.data import Dataset, check_classes, existing_file
from mlops_tune.runtime.errors import UsageError, first_line


def load_csv(
    path: str,
    target: str,
    features: Sequence[str] | None = None,
    encode_categorical: bool = False,
    max_categories: int = 100,
) -> Dataset:
    """A CSV file with a header row; ``target`` names the label column. With ``encode_categorical``,
    text columns are one-hot encoded, each with at most ``max_categories`` distinct values (a
    column with more, such as an identifier, would add a column per row)."""
    import csv

    import pandas as pd

    file = existing_file(path, "data.path")
    if features is not None and (isinstance(features, str) or not all(isinstance(f, str) for f in features)):
        raise UsageError(f"data.features: must be a list of column names such as [a, b], got {features!r}")
    if isinstance(max_categories, bool) or not isinstance(max_categories, int) or max_categories < 2:
        raise UsageError(f"data.max_categories: must be a whole number >= 2, got {max_categories!r}")
    _check_text(file)
    try:
        frame = pd.read_csv(file)
        with open(file, newline="", encoding="utf-8-sig") as handle:  # pandas renames a second 'a' 'a.1'
            header = next((row for row in csv.reader(handle) if row), [])
    except (ValueError, UnicodeDecodeError, csv.Error, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise UsageError(f"data.path: cannot read {file} as CSV ({_printable(first_line(exc, 200))})") from None
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise UsageError(f"data.path: column name(s) {_names(twice)} appear more than once in the header of "
                         f"{file}; rename them")
    columns = [str(c) for c in frame.columns]
    if target not in frame.columns:
        raise UsageError(f"data.target: column '{target}' not in {file} (columns: {_names(columns, quote=False)})")
    if frame.empty:
        raise UsageError(f"data.path: {file} has a header but no data rows")
    if features and target in features:
        raise UsageError(f"data.features: lists the target column '{target}' (the label would leak into "
                         "the features); leave it out")
    wanted = list(features) if features else [c for c in frame.columns if c != target]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise UsageError(f"data.features: column(s) {_names(missing)} not in {file}")
    if not wanted:
        raise UsageError(f"data.features: {file} has no feature column besides '{target}'")
    x_frame = frame[wanted]
    text_columns = [c for c in wanted if not pd.api.types.is_numeric_dtype(x_frame[c])]
    if text_columns and not encode_categorical:
        raise UsageError(
            f"data.features: column(s) {_names(text_columns)} in {file} are not "
            "numeric (set data.encode_categorical=true to one-hot encode them)"
        )
    too_many = {c: int(x_frame[c].nunique()) for c in text_columns if x_frame[c].nunique() > max_categories}
    if too_many:
        worst = max(too_many, key=lambda c: too_many[c])
        raise UsageError(
            f"data.features: column(s) {_names(list(too_many))} of {file} have too many distinct values to "
            f"one-hot encode ('{_printable(worst)}': {too_many[worst]}, more than data.max_categories="
            f"{max_categories}; an identifier?): leave them out with data.features, or raise the limit")
    if text_columns:
        x_frame = pd.get_dummies(x_frame, columns=text_columns, dtype=np.float32)
    if x_frame.isna().to_numpy().any():
        bad = [str(c) for c in x_frame.columns if x_frame[c].isna().any()]
        raise UsageError(f"data.features: missing values in column(s) {_names(bad)} of {file}")
    labels = frame[target]
    if labels.isna().any():
        raise UsageError(f"data.target: missing labels in column '{target}' of {file}")
    check_classes(labels.to_numpy(), f"data.target: column '{target}' of {file}")
    codes, uniques = pd.factorize(labels, sort=True)
    return Dataset(
        x=x_frame.to_numpy(dtype=np.float32),
        y=codes.astype(np.int64),
        classes=[str(u) for u in uniques],
        feature_names=[str(c) for c in x_frame.columns],
    )


def _printable(text: str) -> str:
    """``text`` with control characters escaped (a file's bytes never reach the terminal raw)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _names(names: Sequence[str], quote: bool = True, limit: int = 12) -> str:
    """Column names for a message: printable, at most ``limit`` of them."""
    shown = [f"'{_printable(n)}'" if quote else _printable(n) for n in names[:limit]]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(shown) + more


def _check_text(file: Path) -> None:
    """A CSV is text: a file with NUL or other control bytes in its first 64 KiB is refused."""
    with open(file, "rb") as handle:
        head = handle.read(65536)
    control = bytes(range(0, 9)) + bytes(range(14, 32)) + b"\x7f"
    if any(b in control for b in head):
        raise UsageError(f"data.path: {file} is not a text CSV file (it holds binary data"
                         f"{', starting ' + repr(head[:8])[2:-1] if head else ''})")
