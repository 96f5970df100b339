"""Finding the data directory and the files in it.

Entry points (CLI commands, the bench, test fixtures) call `resolve_data_dir` once, with the
`--data-dir` option and `os.environ`; loaders then take the resolved directory as an argument and
never read the environment themselves, so a loader's result depends only on its arguments.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from agent.data.errors import DataError

DATA_DIR_ENV = "SKIPFLEET_DATA_DIR"
DATA_DIR_OPTION = "--data-dir"

# Every file the loaders read, relative to the data directory, and what it holds.
DATA_FILES: dict[str, str] = {
    "fan_damage1.npz": "cooling-fan Damage1 task (pretrain/finetune/test spectra)",
    "fan_damage2.npz": "cooling-fan Damage2 task (pretrain/finetune/test spectra)",
    "fan_fleet.npz": "cooling-fan fleet: one group per (fan size, room, fan condition)",
    "hapt_windows.npz": "HAR raw windows (n, 128, 6) with subject and experiment",
    "fashion-mnist/train-images-idx3-ubyte.gz": "Fashion-MNIST training images",
    "fashion-mnist/train-labels-idx1-ubyte.gz": "Fashion-MNIST training labels",
    "fashion-mnist/t10k-images-idx3-ubyte.gz": "Fashion-MNIST test images",
    "fashion-mnist/t10k-labels-idx1-ubyte.gz": "Fashion-MNIST test labels",
}


def expected_files_text() -> str:
    """The list of files a data directory should contain, one per line, for error messages."""
    lines = [f"  {name:44s} {what}" for name, what in DATA_FILES.items()]
    return "a data directory should contain:\n" + "\n".join(lines)


def _how_to_set() -> str:
    return f"pass {DATA_DIR_OPTION} DIR or set the environment variable {DATA_DIR_ENV}=DIR"


def resolve_data_dir(
    explicit: str | os.PathLike[str] | None,
    environ: Mapping[str, str],
    needs: Iterable[str] = (),
) -> Path:
    """The data directory: `explicit` if given, else `environ[SKIPFLEET_DATA_DIR]`.

    `needs` lists files (relative names as in `DATA_FILES`) the caller is about to read; raising
    here, once, gives one clear message instead of a failure halfway through a run.
    Raises `DataError` if neither is set, the directory does not exist, or a needed file is missing.
    """
    if explicit is not None and str(explicit) != "":
        path, origin = Path(explicit).expanduser(), DATA_DIR_OPTION
    elif environ.get(DATA_DIR_ENV):
        path, origin = Path(environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"
    else:
        raise DataError(f"no data directory given: {_how_to_set()}\n{expected_files_text()}")
    if not path.exists():
        raise DataError(
            f"data directory {path} (from {origin}) does not exist: {_how_to_set()}\n"
            f"{expected_files_text()}"
        )
    if not path.is_dir():
        raise DataError(f"data directory {path} (from {origin}) is not a directory")
    for name in needs:
        data_file(path, name)
    return path.resolve()


def data_file(data_dir: str | os.PathLike[str], name: str) -> Path:
    """`data_dir / name`, or `DataError` naming the file and listing what the directory needs."""
    path = Path(data_dir) / name
    if not path.is_file():
        raise DataError(
            f"{path}: file not found in the data directory {data_dir} "
            f"({_how_to_set()})\n{expected_files_text()}"
        )
    return path
