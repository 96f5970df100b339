"""The two CNNs as data: a sequence of units, grouped into layers.

A unit is one weighted operation (3×3 conv, 3×3 depthwise conv, 1×1 pointwise conv or FC),
then optionally BN (and ReLU) and pooling. Parameters of unit u are W{u}, b{u} and, with BN,
gamma{u}, beta{u}, mean{u}, var{u}: the MLP's names, so unit 1 is the "first layer" everywhere.

A layer is what a Skip adapter taps: the units from one `starts_layer` unit to the next. Layer
k's input x_k (flattened) feeds the adapter ΔW_k (d_k × C) straight to the logits. The second
layer's input, the widest (16 × 14 × 14 = 3,136), is average-pooled 2×2 first (784): the Skip
head's work and the Skip-Cache grow with Σ d_k, and pooling halves both (docs/benchmarks.md
measures it against the full map, `tap_pool=1`). In the
standard CNN every unit is a layer; in the depthwise-separable one a depthwise conv and its
pointwise conv form one layer (MobileNet's "depthwise separable convolution"), so both models
have 4 layers. Bottleneck adapters sit on every layer's output except the logits.

Both take 28×28 grayscale images (Fashion-MNIST) as rows of 784 pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

KERNEL = 3  # every spatial convolution is 3×3, stride 1, zero padding 1
OPS = ("conv", "dw", "pw", "fc")
POOLS = (None, "max")


@dataclass(frozen=True)
class Unit:
    op: str  # conv | dw | pw | fc
    c_in: int  # input channels (fc: input width)
    c_out: int  # output channels (dw: = c_in)
    bn: bool = True  # BN (then ReLU) after the op; the logits unit has neither
    pool: str | None = None  # "max": 2×2 max pooling
    starts_layer: bool = False  # its input is a layer input x_k
    tap_pool: int = 1  # x_k is average-pooled tap_pool×tap_pool before its Skip adapter

    def __post_init__(self):
        if self.op not in OPS or self.pool not in POOLS:
            raise ValueError(f"unknown unit {self}")
        if self.op == "dw" and self.c_in != self.c_out:
            raise ValueError("a depthwise conv keeps its channel count")

    def weight_shape(self) -> tuple[int, int]:
        if self.op == "conv":
            return (KERNEL * KERNEL * self.c_in, self.c_out)  # a kernel matrix on patches
        if self.op == "dw":
            return (KERNEL * KERNEL, self.c_out)  # one k×k kernel per channel
        return (self.c_in, self.c_out)

    def param_names(self, u: int) -> tuple[str, ...]:
        names = (f"W{u}", f"b{u}")
        if self.bn:
            names += tuple(f"{p}{u}" for p in ("gamma", "beta", "mean", "var"))
        return names


def standard_cnn(n_classes: int, side: int = 28, width: int = 16, hidden: int = 64, tap_pool=2):
    """conv3×3(1→w) BN ReLU maxpool · conv3×3(w→2w) BN ReLU maxpool · FC(→hidden) BN ReLU · FC."""
    flat = (side // 4) ** 2 * 2 * width
    return (
        Unit("conv", 1, width, pool="max", starts_layer=True),
        Unit("conv", width, 2 * width, pool="max", starts_layer=True, tap_pool=tap_pool),
        Unit("fc", flat, hidden, starts_layer=True),
        Unit("fc", hidden, n_classes, bn=False, starts_layer=True),
    )


def depthwise_cnn(n_classes: int, side: int = 28, width: int = 16, tap_pool=2):
    """MobileNet-style: conv3×3(1→w) BN ReLU maxpool · [dw3×3 BN ReLU · pw(w→2w) BN ReLU
    maxpool] · [dw3×3 BN ReLU · pw(2w→2w) BN ReLU] · FC. A global-average-pooled head (MobileNet's)
    reached 83 % on upright Fashion-MNIST against 89 % for this flattened one (measured, same
    pre-training), at this depth too few pixels of context for averaging them away."""
    flat = (side // 4) ** 2 * 2 * width
    return (
        Unit("conv", 1, width, pool="max", starts_layer=True),
        Unit("dw", width, width, starts_layer=True, tap_pool=tap_pool),
        Unit("pw", width, 2 * width, pool="max"),
        Unit("dw", 2 * width, 2 * width, starts_layer=True),
        Unit("pw", 2 * width, 2 * width),
        Unit("fc", flat, n_classes, bn=False, starts_layer=True),
    )


ARCHITECTURES = {"cnn": standard_cnn, "dwcnn": depthwise_cnn}


def build(name: str, n_classes: int, side: int = 28, **widths) -> tuple[Unit, ...]:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown CNN {name!r}: choose {' or '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name](n_classes, side, **widths)


def layer_units(units) -> list[list[int]]:
    """The 1-based unit indices of each layer."""
    out: list[list[int]] = []
    for u, unit in enumerate(units, start=1):
        if unit.starts_layer or not out:
            out.append([])
        out[-1].append(u)
    return out


def layer_input_dims(units, side: int) -> tuple[int, ...]:
    """d_k, the flattened width of each layer's input, for side×side single-channel images."""
    dims, h = [], side
    for unit in units:
        if unit.starts_layer:
            pooled = h // unit.tap_pool
            dims.append(unit.c_in if unit.op == "fc" else pooled * pooled * unit.c_in)
        if unit.pool == "max":
            h //= 2
    return tuple(dims)


def check_units(units, side: int) -> None:
    """Refuse an architecture whose shapes do not chain (misuse: raises at the call site)."""
    h, c = side, 1
    for u, unit in enumerate(units, start=1):
        expected = c * h * h if unit.op == "fc" and h > 1 else c
        if unit.c_in != expected:
            raise ValueError(f"unit {u} ({unit.op}) takes {unit.c_in} inputs, gets {expected}")
        if unit.pool == "max" and h % 2:
            raise ValueError(f"unit {u}: 2×2 max pooling of an odd size {h}")
        if unit.tap_pool < 1 or h % unit.tap_pool or (unit.tap_pool > 1 and unit.op == "fc"):
            raise ValueError(f"unit {u}: a {unit.tap_pool}× tap pooling of size {h}")
        if unit.op == "fc":
            h = 1
        c = unit.c_out
        h = h // 2 if unit.pool == "max" else h
    if not units[0].starts_layer or units[-1].op != "fc" or units[-1].bn:
        raise ValueError("a CNN starts a layer at its first unit and ends in an FC without BN")


def to_json(units) -> list[dict]:
    return [asdict(unit) for unit in units]


def from_json(items) -> tuple[Unit, ...]:
    return tuple(Unit(**item) for item in items)


def n_weights(units) -> int:
    """Parameters that train in FT-All (weights, biases, BN scale and shift)."""
    total = 0
    for unit in units:
        total += math.prod(unit.weight_shape()) + unit.c_out
        total += 2 * unit.c_out if unit.bn else 0
    return total
