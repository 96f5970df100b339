"""The paper's base model: FC1 → BN1 → ReLU → FC2 → BN2 → ReLU → FC3, softmax cross-entropy.

Both hidden layers have H units: the paper's 96 by default, any width a model was pre-trained
with (`pretrain(hidden=...)`, `skipfleet prepare --hidden`); the file's header says which.

Inputs are standardised with the pre-training statistics stored in the model, so a device
and the coordinator always agree on what `x1` (the first layer's input) is. A saved model is
an `.npz` of float32 arrays plus a JSON header; its `weights_hash` pins adapters to it. It may
carry a drift calibration (agent/trainer/calibration.py) beside the weights, outside the hash;
a file without one loads with `calibration = None`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from agent.trainer import layers
from agent.trainer.calibration import ARRAY_NAMES as CALIBRATION_ARRAYS
from agent.trainer.calibration import HEADER_KEY as CALIBRATION_KEY
from agent.trainer.calibration import CalibrationError, DriftCalibration
from agent.trainer.errors import ModelFileError
from agent.trainer.model_file import read_header

HIDDEN = 96
FORMAT_VERSION = 1
PARAM_NAMES = (
    "in_mean", "in_std",
    "W1", "b1", "gamma1", "beta1", "mean1", "var1",
    "W2", "b2", "gamma2", "beta2", "mean2", "var2",
    "W3", "b3",
)  # fmt: skip


class FrozenFeatureModel:
    """What a base model derives from its `frozen_features(X) -> (xs, z)`: logits with or
    without a Skip adapter, predictions, accuracy. The MLP and the CNNs share it."""

    def logits(self, X: np.ndarray, adapter=None) -> np.ndarray:
        xs, z = self.frozen_features(X)
        return z if adapter is None else z + adapter.delta_logits(xs)  # (B, C)

    def predict(self, X: np.ndarray, adapter=None) -> np.ndarray:
        return self.logits(X, adapter).argmax(axis=1)

    def accuracy(self, X: np.ndarray, y: np.ndarray, adapter=None) -> float:
        return float((self.predict(X, adapter) == y).mean())

    def with_calibration(self, calibration: DriftCalibration):
        """The same weights (and hash) carrying `calibration`; it must describe the last
        layer's input (the MLP's x3, a CNN's last tap)."""
        width = self.layer_input_dims[-1]
        if calibration.width != width:
            raise ValueError(
                f"calibration of width {calibration.width} for a last layer input of {width} units"
            )
        return replace(self, calibration=calibration)


@dataclass
class BaseModel(FrozenFeatureModel):
    """Parameters of the pre-trained model (float32) and what it was trained for."""

    params: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)  # task, feature spec, class names: JSON-safe
    calibration: DriftCalibration | None = None  # in-distribution reference of the drift scores

    @property
    def n_inputs(self) -> int:
        return int(self.params["W1"].shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.params["W3"].shape[1])

    @property
    def layer_input_dims(self) -> tuple[int, int, int]:
        return (self.n_inputs, self.params["W2"].shape[0], self.params["W3"].shape[0])

    @property
    def weights_hash(self) -> str:
        return weights_hash(self.params)

    @property
    def hidden_width(self) -> int:
        """H: the width of the last hidden layer (x3, the last layer's input)."""
        return int(self.params["W3"].shape[0])

    # -------------------------------------------------------------- inference
    def standardize(self, X: np.ndarray) -> np.ndarray:
        check_inputs(X, self.n_inputs)
        return ((X - self.params["in_mean"]) / self.params["in_std"]).astype(np.float32)

    def frozen_features(self, X: np.ndarray, standardized: bool = False):
        """Every layer's input and the frozen head output, BN in inference mode.

        Returns `xs = [x1, x2, x3]` and `z = x3 W3 + b3` (all float32), i.e. exactly what
        Skip-Cache stores: nothing here changes while Skip-LoRA adapters train.
        """
        p = self.params
        x1 = X if standardized else self.standardize(X)  # (B, N)
        x2 = self._hidden(x1, 1)  # (B, H)
        x3 = self._hidden(x2, 2)  # (B, H)
        z, _ = layers.fc_forward(x3, p["W3"], p["b3"])  # (B, C)
        return [x1, x2, x3], z

    def _hidden(self, x, k: int):
        p = self.params
        h, _ = layers.fc_forward(x, p[f"W{k}"], p[f"b{k}"])  # (B, H)
        h, _ = layers.bn_infer_forward(
            h, p[f"gamma{k}"], p[f"beta{k}"], p[f"mean{k}"], p[f"var{k}"]
        )
        h, _ = layers.relu_forward(h)  # (B, H)
        return h

    def bn1_pre_activations(self, X: np.ndarray):
        """(FC1's output before BN1 for raw inputs X (n, hidden), BN1's running mean, var)."""
        p = self.params
        h, _ = layers.fc_forward(self.standardize(X), p["W1"], p["b1"])  # (n, hidden)
        return h, p["mean1"], p["var1"]

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> str:
        header = {"format": FORMAT_VERSION, "weights_hash": self.weights_hash, "info": self.info,
                  "hidden": int(self.params["W1"].shape[1])}  # fmt: skip
        return write_model_file(path, self, header, {n: self.params[n] for n in PARAM_NAMES})

    @classmethod
    def load(cls, path: str | Path) -> BaseModel:
        return load_model(Path(path))


def weights_hash(params: dict[str, np.ndarray], names=PARAM_NAMES, prefix: bytes = b"") -> str:
    """sha256 over `prefix` (e.g. an architecture) and every parameter's name, dtype, shape and
    bytes, in the fixed order of `names`."""
    digest = hashlib.sha256(prefix)
    for name in names:
        array = np.ascontiguousarray(params[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def load_model(path: Path) -> BaseModel:
    header = read_header(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            params = {name: np.asarray(npz[name], dtype=np.float32) for name in PARAM_NAMES}
            extra = {name: npz[name] for name in CALIBRATION_ARRAYS if name in npz.files}
    except Exception as error:  # missing-array errors: one clear message
        raise ModelFileError(f"{path} is not a skipfleet base model: {error}") from error
    if header.get("format") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: unsupported model format {header.get('format')!r}")
    check_param_shapes(params, path)
    check_hidden_width(header, params, path)
    model = BaseModel(params=params, info=header.get("info", {}))
    if model.weights_hash != header.get("weights_hash"):
        raise ModelFileError(f"{path}: weights do not match the stored hash (corrupted file?)")
    return with_stored_calibration(model, header, extra, path)


def with_stored_calibration(model, header: dict, extra: dict, path: Path):
    """`model` with the calibration its file holds (`extra`: the file's calibration arrays);
    a file without one (made before calibrations existed) is still a usable model."""
    if CALIBRATION_KEY not in header:
        return model
    try:
        return model.with_calibration(DriftCalibration.from_file(header[CALIBRATION_KEY], extra))
    except (CalibrationError, ValueError) as error:
        raise ModelFileError(f"{path}: drift calibration unusable: {error}") from None


def write_model_file(path: str | Path, model, header: dict, arrays: dict) -> str:
    """Writes a base model's file (MLP or CNN): its `header` as JSON beside its float32
    `arrays`, with the model's calibration, if any; returns its weights hash."""
    if model.calibration is not None:
        header = {**header, CALIBRATION_KEY: model.calibration.header()}
        arrays = {**arrays, **model.calibration.arrays()}
    with open(path, "wb") as out:
        np.savez(out, header=np.array(json.dumps(header)), **arrays)
    return model.weights_hash


def check_param_shapes(params: dict[str, np.ndarray], where) -> None:
    n_in, hidden = params["W1"].shape
    n_classes = params["W3"].shape[1]
    expected = {
        "in_mean": (n_in,), "in_std": (n_in,), "W1": (n_in, hidden), "b1": (hidden,),
        "W2": (hidden, hidden), "b2": (hidden,), "W3": (hidden, n_classes), "b3": (n_classes,),
    }  # fmt: skip
    for k in (1, 2):
        for name in ("gamma", "beta", "mean", "var"):
            expected[f"{name}{k}"] = (hidden,)
    for name, shape in expected.items():
        if params[name].shape != shape:
            raise ModelFileError(
                f"{where}: {name} has shape {params[name].shape}, expected {shape}"
            )
        if not np.isfinite(params[name]).all():
            raise ModelFileError(f"{where}: {name} holds NaN or infinity")


def check_hidden_width(header: dict, params: dict[str, np.ndarray], where) -> None:
    """The header's `hidden` (written since widths other than 96 exist; absent in older
    files, whose widths the arrays alone give) must be the width the arrays have."""
    if "hidden" not in header:
        return
    width = header["hidden"]
    if isinstance(width, bool) or not isinstance(width, int) or width != params["W1"].shape[1]:
        raise ModelFileError(
            f"{where}: header says hidden width {width!r}, the weights have {params['W1'].shape[1]}"
        )


def check_inputs(X: np.ndarray, n_inputs: int) -> None:
    if X.ndim != 2 or X.shape[1] != n_inputs:
        raise ValueError(f"inputs must have shape (n, {n_inputs}), got {X.shape}")


def init_params(n_inputs: int, n_classes: int, rng: np.random.Generator, hidden: int = HIDDEN):
    """He-initialised weights, zero biases, identity BN; standardisation set by pretrain."""

    def he(fan_in, fan_out):
        return (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    params = {"in_mean": np.zeros(n_inputs), "in_std": np.ones(n_inputs)}
    params.update(W1=he(n_inputs, hidden), W2=he(hidden, hidden), W3=he(hidden, n_classes))
    params.update(b1=np.zeros(hidden), b2=np.zeros(hidden), b3=np.zeros(n_classes))
    for k in (1, 2):
        params.update({f"gamma{k}": np.ones(hidden), f"beta{k}": np.zeros(hidden)})
        params.update({f"mean{k}": np.zeros(hidden), f"var{k}": np.ones(hidden)})
    return {name: np.asarray(value, dtype=np.float32) for name, value in params.items()}
