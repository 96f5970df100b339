"""Reading `.npz` archives defensively: every failure becomes a `DataError` naming file and array.

`np.load` reads an archive lazily and fails in many ways (BadZipFile, zlib.error, EOFError,
ValueError for pickled objects or a truncated member); `read_npz` reads the arrays it is asked
for eagerly, inside one try, so a corrupted file fails here and not later inside training.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from agent.data.errors import DataError

# dtype.kind codes accepted for each kind of array a loader expects
KIND_FLOAT = "f"
KIND_INT = "iu"
KIND_BOOL = "b"
KIND_STR = "U"
_KIND_WORDS = {
    KIND_FLOAT: "floating point",
    KIND_INT: "integer",
    KIND_BOOL: "bool",
    KIND_STR: "str",
}


def read_npz(path: Path, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Load the arrays `names` from the archive at `path` (no pickles allowed)."""
    names = list(names)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError as error:
        raise DataError(f"{path}: file not found") from error
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable .npz archive ({error})") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single .npy array, expected an .npz archive")
    with archive:
        missing = [name for name in names if name not in archive.files]
        if missing:
            raise DataError(
                f"{path}: missing array(s) {', '.join(missing)} "
                f"(the archive has: {', '.join(sorted(archive.files)) or 'nothing'})"
            )
        arrays = {}
        for name in names:
            try:
                arrays[name] = archive[name]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
                # a bad CRC or deflate stream, a truncated member, or an object (pickle) array
                raise DataError(f"{path}: cannot read array {name!r} ({error})") from error
        return arrays


def require_array(
    arrays: dict[str, np.ndarray],
    name: str,
    *,
    kind: str,
    shape: tuple[int | None, ...],
    path: Path,
) -> np.ndarray:
    """`arrays[name]` after checking its dtype kind and shape (None in `shape` = any length)."""
    array = arrays[name]
    if array.dtype.kind not in kind:
        raise DataError(
            f"{path}: array {name!r} has dtype {array.dtype}, expected {_KIND_WORDS[kind]}"
        )
    shape_ok = array.ndim == len(shape) and all(
        want is None or have == want for have, want in zip(array.shape, shape, strict=False)
    )
    if not shape_ok:
        wanted = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ")"
        raise DataError(f"{path}: array {name!r} has shape {array.shape}, expected {wanted}")
    return array


def require_same_length(path: Path, **arrays: np.ndarray) -> int:
    """The common length of `arrays`, or `DataError` listing each array's length."""
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        listed = ", ".join(f"{name}: {n}" for name, n in lengths.items())
        raise DataError(f"{path}: arrays disagree on the number of rows ({listed})")
    return next(iter(lengths.values()))
