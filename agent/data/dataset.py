"""`Dataset`: the one container every loader returns, its validation, and a per-device hold-out.

Meta convention (checked by `validate_dataset`): a value in `meta` that is a NumPy array is a
per-row array (first axis = n rows, e.g. `subject`, `speed`, `timestamp`) and follows the rows
in `subset`; anything else (str, int, tuple of class names, ...) describes the whole set.
`meta["source"]` names the file the rows came from, so errors about a set can name it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.data.errors import DataError


def validate_dataset(
    X: Any, y: Any, n_classes: Any, meta: Mapping[str, Any] | None = None, *, source: str
) -> None:
    """Raise `DataError` (naming `source`) unless X, y, n_classes and meta form a valid set.

    X must be float32 (n, d) with d >= 1 and only finite values, y int64 (n,) with labels in
    0..n_classes-1, n_classes an int >= 2, and every array in meta must have n rows.
    """
    if not isinstance(X, np.ndarray) or X.dtype != np.float32:
        raise DataError(f"{source}: X must be a float32 array, got {_describe(X)}")
    if X.ndim != 2 or X.shape[1] < 1:
        raise DataError(f"{source}: X must have shape (n, d) with d >= 1, got {X.shape}")
    if not isinstance(y, np.ndarray) or y.dtype != np.int64:
        raise DataError(f"{source}: y must be an int64 array, got {_describe(y)}")
    if y.shape != (X.shape[0],):
        raise DataError(f"{source}: y has shape {y.shape}, expected ({X.shape[0]},) to match X")
    # bool is an int subclass: n_classes=True would silently mean 1 class
    if not isinstance(n_classes, int | np.integer) or isinstance(n_classes, bool) or n_classes < 2:
        raise DataError(f"{source}: n_classes must be an int >= 2, got {n_classes!r}")
    check_finite(X, "X", source=source)
    check_labels(y, int(n_classes), source=source)
    for key, value in (meta or {}).items():
        if isinstance(value, np.ndarray) and (value.ndim == 0 or len(value) != len(y)):
            raise DataError(
                f"{source}: meta[{key!r}] has shape {value.shape}; meta arrays are per-row and "
                f"need {len(y)} rows (put whole-set values in meta as tuples or scalars)"
            )


def check_finite(values: np.ndarray, name: str, *, source: str) -> None:
    """Raise `DataError` if `values` holds NaN or inf; the message gives the count and a row."""
    finite = np.isfinite(values)
    if finite.all():
        return
    bad_rows = np.flatnonzero(~finite.reshape(len(values), -1).all(axis=1))
    raise DataError(
        f"{source}: {name} has {int(finite.size - finite.sum())} non-finite values (NaN/inf), "
        f"first in row {int(bad_rows[0])}"
    )


def check_labels(y: np.ndarray, n_classes: int, *, source: str, name: str = "labels") -> None:
    """Raise `DataError` if a label lies outside 0..n_classes-1."""
    check_in_range(y, 0, n_classes - 1, source=source, name=name)


def check_in_range(values: np.ndarray, low: int, high: int, *, source: str, name: str) -> None:
    """Raise `DataError` if an integer value lies outside low..high; names the first bad row."""
    bad_rows = np.flatnonzero((values < low) | (values > high))
    if len(bad_rows):
        row = int(bad_rows[0])
        raise DataError(
            f"{source}: {name} out of range {low}..{high}: {len(bad_rows)} rows, "
            f"first {values[row]} in row {row}"
        )


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array of dtype {value.dtype} and shape {value.shape}"
    return type(value).__name__


# eq=False: arrays make `==` ambiguous, and identity is what a cache keyed on a set needs.
@dataclass(frozen=True, eq=False)
class Dataset:
    """Rows of features with their labels. Validated on construction (see `validate_dataset`).

    X: float32 (n, d) features; y: int64 (n,) labels 0..n_classes-1; meta: per-row arrays
    (NumPy, n rows) and whole-set descriptions (anything else), e.g. `class_names`, `source`.
    """

    X: np.ndarray
    y: np.ndarray
    n_classes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_dataset(self.X, self.y, self.n_classes, self.meta, source=self.source)

    @property
    def source(self) -> str:
        return str(self.meta.get("source", "<in-memory dataset>"))

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def class_counts(self) -> np.ndarray:
        """int64 (n_classes,): how many rows carry each label."""
        return np.bincount(self.y, minlength=self.n_classes)

    def subset(self, rows: np.ndarray) -> Dataset:
        """The rows `rows` (indices or a boolean mask) as a new Dataset; per-row meta follows."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != self.y.shape:
                raise ValueError(f"mask has shape {rows.shape}, expected {self.y.shape}")
            rows = np.flatnonzero(rows)
        meta = {
            key: value[rows] if isinstance(value, np.ndarray) else value
            for key, value in self.meta.items()
        }
        return Dataset(self.X[rows], self.y[rows], self.n_classes, meta)


def holdout_split(
    dataset: Dataset, fraction: float = 0.25, *, seed: int
) -> tuple[Dataset, Dataset]:
    """Split a device's data into (train, holdout), stratified by class.

    From each class, round(fraction * count) rows chosen at random (seeded) go to the hold-out,
    so both parts keep the class mix; a class with a single row stays in train. Rows keep their
    original order inside each part (time order for the fan recordings).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    holdout_mask = np.zeros(len(dataset), dtype=bool)  # (n,)
    for label in range(dataset.n_classes):
        rows = np.flatnonzero(dataset.y == label)  # (count,)
        if len(rows) < 2:
            continue
        n_holdout = min(round(fraction * len(rows)), len(rows) - 1)  # keep one row to train on
        holdout_mask[rng.permutation(rows)[:n_holdout]] = True
    return dataset.subset(~holdout_mask), dataset.subset(holdout_mask)
