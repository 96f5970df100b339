"""A pre-trained CNN as the agent and the Skip trainer use it: the MLP's BaseModel interface.

Inputs are rows of side×side pixels (Fashion-MNIST: 784), standardised with one mean and one
standard deviation of the pre-training pixels: a per-pixel statistic would divide by ~0 at the
borders, where upright images are always empty and rotated ones are not. `frozen_features`
returns every layer's input x_k (flattened, channels last; average-pooled where its unit says
`tap_pool`) and the logits z, BN in inference mode: what Skip-Cache stores. A saved CNN is an
`.npz` of float32 arrays plus a JSON header with `"kind": "cnn"` and its units; its
`weights_hash` covers the units too. Like the MLP's, it may carry a drift calibration of its
last tap (the logits unit's input), outside the hash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.trainer.calibration import ARRAY_NAMES as CALIBRATION_ARRAYS
from agent.trainer.calibration import DriftCalibration
from agent.trainer.cnn import arch
from agent.trainer.cnn import layers as cl
from agent.trainer.cnn.network import UnitMods, folded, unit_forward, unit_infer
from agent.trainer.errors import ModelFileError
from agent.trainer.model import (
    FrozenFeatureModel,
    check_inputs,
    weights_hash,
    with_stored_calibration,
    write_model_file,
)
from agent.trainer.model_file import read_header

MODEL_KIND = "cnn"
FORMAT_VERSION = 1
CHUNK = 32  # images per inference pass: patches of ~3.6 MB (measured fastest of 16..512)


@dataclass
class CnnModel(FrozenFeatureModel):
    units: tuple[arch.Unit, ...]
    params: dict[str, np.ndarray]
    side: int = 28
    info: dict = field(default_factory=dict)  # task, class names, architecture name: JSON-safe
    # The drift calibration of the last tap (the logits unit's input), as the MLP's of x3
    calibration: DriftCalibration | None = None

    @property
    def param_names(self) -> tuple[str, ...]:
        names = ("in_mean", "in_std")
        for u, unit in enumerate(self.units, start=1):
            names += unit.param_names(u)
        return names

    @property
    def n_inputs(self) -> int:
        return self.side * self.side

    @property
    def n_classes(self) -> int:
        return self.units[-1].c_out

    @property
    def layer_input_dims(self) -> tuple[int, ...]:
        return arch.layer_input_dims(self.units, self.side)

    @property
    def n_parameters(self) -> int:
        return arch.n_weights(self.units)

    @property
    def weights_hash(self) -> str:
        return weights_hash(self.params, self.param_names, self._hash_prefix())

    def _hash_prefix(self) -> bytes:
        return json.dumps({"side": self.side, "units": arch.to_json(self.units)}).encode()

    # -------------------------------------------------------------- inference
    def standardize(self, X: np.ndarray) -> np.ndarray:
        check_inputs(X, self.n_inputs)
        return ((X - self.params["in_mean"]) / self.params["in_std"]).astype(np.float32)

    def images(self, x1: np.ndarray) -> np.ndarray:
        return x1.reshape(len(x1), self.side, self.side, 1)  # (B, H, W, 1)

    def frozen_features(self, X: np.ndarray, standardized: bool = False):
        """Every layer's input xs = [x1, .., xK] (flattened) and the logits z, all float32."""
        x1 = X if standardized else self.standardize(X)
        weights = [folded(unit, u, self.params) for u, unit in enumerate(self.units, start=1)]
        xs = z = None  # allocated once the first chunk shows the dtype; then filled in place
        for i in range(0, len(x1), CHUNK):
            taps, logits = self._frozen_chunk(x1[i : i + CHUNK], weights)
            if z is None:
                xs = [np.empty((len(x1), t.shape[1]), t.dtype) for t in taps]  # (n, d_k)
                z = np.empty((len(x1), logits.shape[1]), logits.dtype)  # (n, C)
            for out, tap in zip(xs, taps, strict=True):
                out[i : i + len(tap)] = tap
            z[i : i + len(logits)] = logits
        return xs, z

    def _frozen_chunk(self, x1, weights):
        h, xs = self.images(x1), []
        for unit, (W, b) in zip(self.units, weights, strict=True):
            if unit.starts_layer:
                tap = h if unit.tap_pool == 1 else cl.avgpool_forward(h, unit.tap_pool)[0]
                xs.append(tap.reshape(len(h), -1))  # (b, d_k)
            h = unit_infer(unit, h, W, b)
        return xs, h  # h: (b, C) logits

    def bn1_pre_activations(self, X: np.ndarray):
        """(unit 1's op output before BN1 as rows (n·H·W, C), BN1's running mean, var).

        Chunk by chunk into one output: the patches of every image at once would be a second
        copy the size of the result."""
        p = self.params
        bare = arch.Unit(self.units[0].op, self.units[0].c_in, self.units[0].c_out, bn=False)
        x1, per_image = self.standardize(X), self.n_inputs  # a row per pixel of each image
        out = np.empty((len(x1) * per_image, bare.c_out), dtype=np.float32)  # (n·H·W, C)
        for i in range(0, len(x1), CHUNK):
            h, _ = unit_forward(bare, 1, self.images(x1[i : i + CHUNK]), p, UnitMods())
            out[i * per_image : i * per_image + h.size // bare.c_out] = h.reshape(-1, bare.c_out)
        return out, p["mean1"], p["var1"]

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> str:
        header = {
            "format": FORMAT_VERSION,
            "kind": MODEL_KIND,
            "side": self.side,
            "units": arch.to_json(self.units),
            "weights_hash": self.weights_hash,
            "info": self.info,
        }
        arrays = {name: self.params[name] for name in self.param_names}
        return write_model_file(path, self, header, arrays)

    @classmethod
    def load(cls, path: str | Path) -> CnnModel:
        return load_cnn(Path(path))


def load_cnn(path: Path) -> CnnModel:
    header = read_header(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            units = arch.from_json(header["units"])
            side = int(header["side"])
            arch.check_units(units, side)
            model = CnnModel(units, {}, side, header.get("info", {}))
            model.params = {n: np.asarray(npz[n], dtype=np.float32) for n in model.param_names}
            extra = {name: npz[name] for name in CALIBRATION_ARRAYS if name in npz.files}
    except Exception as error:  # units or missing-array errors: one clear message
        raise ModelFileError(f"{path} is not a skipfleet CNN base model: {error}") from error
    if header.get("format") != FORMAT_VERSION or header.get("kind") != MODEL_KIND:
        raise ModelFileError(f"{path}: unsupported model format {header.get('format')!r}")
    check_param_shapes(model, path)
    if model.weights_hash != header.get("weights_hash"):
        raise ModelFileError(f"{path}: weights do not match the stored hash (corrupted file?)")
    return with_stored_calibration(model, header, extra, path)


def check_param_shapes(model: CnnModel, where) -> None:
    expected = {"in_mean": (1,), "in_std": (1,)}
    for u, unit in enumerate(model.units, start=1):
        expected[f"W{u}"] = unit.weight_shape()
        for name in unit.param_names(u)[1:]:
            expected[name] = (unit.c_out,)
    for name, shape in expected.items():
        array = model.params[name]
        if array.shape != shape:
            raise ModelFileError(f"{where}: {name} has shape {array.shape}, expected {shape}")
        if not np.isfinite(array).all():
            raise ModelFileError(f"{where}: {name} holds NaN or infinity")


def init_cnn(units, rng: np.random.Generator, side: int = 28, info=None) -> CnnModel:
    """He-initialised weights, zero biases, identity BN, standardisation (0, 1)."""
    arch.check_units(units, side)
    params = {"in_mean": np.zeros(1), "in_std": np.ones(1)}
    for u, unit in enumerate(units, start=1):
        fan_in, fan_out = unit.weight_shape()
        fan_in = fan_in if unit.op != "dw" else arch.KERNEL * arch.KERNEL
        params[f"W{u}"] = rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)
        params[f"b{u}"] = np.zeros(unit.c_out)
        if unit.bn:
            params.update({f"gamma{u}": np.ones(unit.c_out), f"beta{u}": np.zeros(unit.c_out)})
            params.update({f"mean{u}": np.zeros(unit.c_out), f"var{u}": np.ones(unit.c_out)})
    params = {name: np.asarray(value, dtype=np.float32) for name, value in params.items()}
    return CnnModel(tuple(units), params, side, dict(info or {}))


def widen_classes(model: CnnModel, n_classes: int, rng: np.random.Generator) -> CnnModel:
    """The model with its logits unit grown to n_classes: a device adding classes of its own.

    The new columns of the last weight are drawn at the scale of the existing ones and their
    biases set to the existing mean, so the new classes start as plausible but untrained
    outputs that every method can move (a zero column would stay zero for methods that do not
    train the last layer).
    """
    last, u = model.units[-1], len(model.units)
    extra = n_classes - last.c_out
    if extra <= 0:
        raise ValueError(f"the model already has {last.c_out} classes, asked for {n_classes}")
    W, b = model.params[f"W{u}"], model.params[f"b{u}"]
    params = dict(model.params)
    params[f"W{u}"] = np.concatenate(
        [W, rng.standard_normal((W.shape[0], extra)) * W.std()], axis=1
    )
    params[f"b{u}"] = np.concatenate([b, np.full(extra, b.mean())])
    params = {name: np.asarray(a, dtype=np.float32) for name, a in params.items()}
    units = (
        *model.units[:-1],
        arch.Unit(last.op, last.c_in, n_classes, bn=False, starts_layer=True),
    )
    return CnnModel(units, params, model.side, {**model.info, "widened_from": last.c_out})
