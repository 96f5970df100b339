"""The JSON header of a base model file (an `.npz`), read with one clear error for any failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from agent.trainer.errors import ModelFileError


def read_header(path: Path) -> dict:
    if not path.is_file():
        raise ModelFileError(f"base model file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(str(npz["header"]))
    except Exception as error:  # zip, JSON or missing-header errors: one clear message
        raise ModelFileError(f"{path} is not a skipfleet base model: {error}") from error
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: the header is not a JSON object")
    return header
