"""A user's own task as a table: feature columns, a label column and a device column.

`skipfleet prepare --from FILE` reads it here. Two formats:
- CSV: a header row of column names, then one row per sample. Features must be numbers.
- NPZ (`np.load(allow_pickle=False)`): every array is a column of n rows; a 2-D (n, k) array is
  k feature columns (named `NAME[0]` .. `NAME[k-1]`), e.g. `X` beside `label` and `device`.

Rows are in time order within each device (the agent's drift scores read the newest rows).
Labels may be any values (names or numbers): the classes are their distinct values, sorted
(numerically when every label is a number). Device names become device ids (`[a-z0-9-]`,
lower-cased, other characters turned into `-`). Every problem is a `DataError` naming the file,
and the row and column where it can.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.data.dataset import check_finite
from agent.data.errors import DataError
from agent.data.npz import read_npz

DEVICE_ID_MAX = 64  # shared/topics.py: a device id is one topic level of [a-z0-9-]{1,64}


# eq=False: arrays make `==` ambiguous.
@dataclass(frozen=True, eq=False)
class DeviceTable:
    X: np.ndarray  # float32 (n, d): the feature columns
    y: np.ndarray  # int64 (n,): index into class_names
    class_names: tuple[str, ...]
    device_ids: np.ndarray  # str (n,): each row's device id
    device_names: dict[str, str]  # device id -> the name in the file
    feature_names: tuple[str, ...]
    source: str

    def devices(self) -> list[str]:
        """Device ids in the order they first appear."""
        _, first = np.unique(self.device_ids, return_index=True)
        return [str(self.device_ids[i]) for i in sorted(first)]


def read_device_table(
    path: Path, label_column: str, device_column: str, feature_columns: list[str] | None = None
) -> DeviceTable:
    """The table at `path` (.csv or .npz); `feature_columns` None: every other column."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        columns = _csv_columns(path)
    elif suffix == ".npz":
        columns = _npz_columns(path)
    else:
        raise DataError(f"{path}: expected a .csv or .npz file, not {suffix or 'no extension'}")
    if label_column == device_column:
        raise DataError(f"{path}: the label and the device column are both {label_column!r}")
    for role, name in (("label", label_column), ("device", device_column)):
        if name not in columns:
            raise DataError(f"{path}: no {role} column {name!r} (columns: {_listed(columns)})")
    if feature_columns is None:
        feature_columns = [c for c in columns if c not in (label_column, device_column)]
    if not feature_columns:
        raise DataError(f"{path}: no feature columns beside {label_column!r} and {device_column!r}")
    for name in feature_columns:
        if name not in columns:
            raise DataError(f"{path}: no feature column {name!r} (columns: {_listed(columns)})")
        if name in (label_column, device_column):
            raise DataError(f"{path}: {name!r} cannot be both a feature and the label or device")
    X = np.stack([_numbers(path, name, columns[name]) for name in feature_columns], axis=1)
    check_finite(X, "features", source=str(path))
    beyond = np.argwhere(np.abs(X) > np.finfo(np.float32).max)  # the model computes in float32
    if len(beyond):
        row, col = beyond[0]
        raise DataError(f"{path}: data row {row + 1}, column {feature_columns[col]!r}: "
                        f"{X[row, col]:g} is beyond float32's range")  # fmt: skip
    class_names, y = _classes(path, label_column, columns[label_column])
    device_ids, device_names = _device_ids(path, device_column, columns[device_column])
    return DeviceTable(
        X.astype(np.float32),
        y,
        class_names,
        device_ids,
        device_names,
        tuple(feature_columns),
        str(path),
    )


def _csv_columns(path: Path) -> dict[str, np.ndarray]:
    """Column name -> its cells (str) in row order."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot read it as CSV ({error})") from error
    rows = [row for row in rows if any(cell.strip() for cell in row)]  # blank lines
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header row and at least one data row")
    header = [name.strip() for name in rows[0]]
    duplicated = sorted({n for n in header if header.count(n) > 1})
    if duplicated or "" in header:
        raise DataError(f"{path}: column names must be unique and non-empty (header: {header})")
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(
                f"{path}: data row {line - 1} has {len(row)} cells, the header {len(header)}"
            )
    cells = np.array([[cell.strip() for cell in row] for row in rows[1:]], dtype=str)
    return {name: cells[:, k] for k, name in enumerate(header)}


def _npz_columns(path: Path) -> dict[str, np.ndarray]:
    read_npz(path, [])  # a clear DataError for an unreadable archive
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
    arrays = read_npz(path, names)
    columns: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if array.ndim == 1:
            columns[name] = array
        elif array.ndim == 2:
            columns.update({f"{name}[{k}]": array[:, k] for k in range(array.shape[1])})
        else:
            raise DataError(
                f"{path}: array {name!r} has shape {array.shape}: a column is "
                "(n,) and a block of feature columns (n, k)"
            )
    lengths = {len(column) for column in columns.values()}
    if len(lengths) > 1:
        raise DataError(
            f"{path}: the arrays disagree on the number of rows "
            f"({', '.join(f'{n}: {len(c)}' for n, c in arrays.items())})"
        )
    if not columns or not lengths.pop():
        raise DataError(f"{path}: holds no rows")
    return columns


def _numbers(path: Path, name: str, column: np.ndarray) -> np.ndarray:
    if column.dtype.kind in "fiub":
        return column.astype(np.float64)
    values = np.empty(len(column))
    for row, cell in enumerate(column):
        try:
            values[row] = float(cell)
        except ValueError:
            raise DataError(
                f"{path}: data row {row + 1}, column {name!r}: {str(cell)!r} is not a number "
                "(name the numeric columns with --feature-columns)"
            ) from None
    return values


def _classes(path: Path, name: str, column: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    labels = np.array([str(v).strip() for v in column], dtype=str)
    empty = np.flatnonzero(labels == "")
    if len(empty):
        raise DataError(f"{path}: data row {empty[0] + 1} has no label in column {name!r}")
    distinct = sorted(set(labels.tolist()), key=_label_order(labels))
    if len(distinct) < 2:
        raise DataError(
            f"{path}: column {name!r} holds one class ({distinct[0]!r}); a "
            "classifier needs at least 2"
        )
    index = {label: k for k, label in enumerate(distinct)}
    return tuple(distinct), np.array([index[v] for v in labels.tolist()], dtype=np.int64)


def _label_order(labels: np.ndarray):
    """Numeric order when every label is a number (so 10 sorts after 9), else text order."""
    try:
        for label in set(labels.tolist()):
            float(label)
    except ValueError:
        return str
    return float


def _device_ids(path: Path, name: str, column: np.ndarray) -> tuple[np.ndarray, dict[str, str]]:
    names = [str(v).strip() for v in column]
    ids: dict[str, str] = {}  # name in the file -> device id
    owner: dict[str, str] = {}  # device id -> name in the file
    for row, original in enumerate(names):
        if original in ids:
            continue
        device_id = re.sub(r"[^a-z0-9-]+", "-", original.lower()).strip("-")[:DEVICE_ID_MAX]
        if not device_id:
            raise DataError(
                f"{path}: data row {row + 1}, column {name!r}: {original!r} "
                "makes no device id (letters, digits and - are kept)"
            )
        if device_id in owner:
            raise DataError(
                f"{path}: devices {owner[device_id]!r} and {original!r} both "
                f"become device id {device_id!r}: rename one"
            )
        ids[original], owner[device_id] = device_id, original
    return np.array([ids[n] for n in names], dtype=str), owner


def _listed(columns) -> str:
    names = list(columns)
    return ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
