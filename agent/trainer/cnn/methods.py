"""The CNN fine-tuning methods as data: what each trains, where in the model.

"all" and "last" are resolved against a model's units: the last unit is the FC that makes the
logits. The Skip methods are the MLP's (`agent/trainer/skip.py`), one adapter per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.trainer.cnn.arch import layer_units

WHERE = ("none", "all", "last")
ADAPTER = 0.5  # a bottleneck adapter's position: just above the unit whose output it adapts


@dataclass(frozen=True)
class Placement:
    """Where a method trains in a model: units, adapters, and the lowest trained position."""

    weights: frozenset[int]  # units whose W and b train
    lora: frozenset[int]
    dora: frozenset[int]
    adapters: tuple[int, ...]  # units whose output a bottleneck adapter adapts

    @property
    def lowest(self) -> float:
        """Backward stops here: unit u, or u + ½ for the adapter on unit u's output."""
        return min([*self.weights, *self.lora, *self.dora, *(u + ADAPTER for u in self.adapters)])


@dataclass(frozen=True)
class CnnMethod:
    name: str
    weights: str = "none"  # units whose W and b train
    bn_train: bool = False  # BN of those units in training mode, gamma and beta trained
    lora: str = "none"  # units with a LoRA adapter on their weight
    dora: str = "none"  # units with a DoRA adapter on their weight
    adapters: bool = False  # a bottleneck adapter on every layer's output but the logits
    optimizer: str = "sgd"  # sgd, or galore: Adam in a low-rank projection of the gradients
    skip: bool = False  # Skip-LoRA: every layer's input straight to the logits
    cache: str = "none"  # Skip-Cache kind: none, dense, q8, q4
    delta: bool = False  # Skip adapters train ΔW_k (d_k × C) itself, not A_k B_k (the MLP's too)
    lr_scale: float = 1.0  # this method's step size relative to the run's (Adam needs less)

    def units(self, where: str, n_units: int) -> frozenset[int]:
        if where not in WHERE:
            raise ValueError(f"{self.name}: unknown unit set {where!r}")
        return {"none": frozenset(), "all": frozenset(range(1, n_units + 1)),
                "last": frozenset({n_units})}[where]  # fmt: skip

    def placement(self, units) -> Placement:
        """Bottleneck adapters go on every layer's output but the logits' (arch.py's layers)."""
        n = len(units)
        adapters = tuple(layer[-1] for layer in layer_units(units)[:-1]) if self.adapters else ()
        return Placement(self.units(self.weights, n), self.units(self.lora, n),
                         self.units(self.dora, n), adapters)  # fmt: skip

    @property
    def is_adapter_only(self) -> bool:
        """True when the result is a Skip adapter a device can ship (base model untouched)."""
        return self.skip


# The Adam methods' step size relative to the SGD methods' (0.003 at the bench's 0.02): Adam
# normalises every step, so an SGD-sized one overshoots (measured on the rotated Fashion-MNIST
# bench, docs/benchmarks.md). LoRA-All with Adam shows what the optimizer alone does to the
# ranking; FT-All with Adam is the baseline GaLore saves optimizer memory against.
ADAM_LR = 0.15

CNN_METHODS: dict[str, CnnMethod] = {
    m.name: m
    for m in (
        CnnMethod("ft-all", weights="all", bn_train=True),
        CnnMethod("ft-last", weights="last"),
        CnnMethod("lora-last", lora="last"),
        CnnMethod("lora-all", lora="all"),
        CnnMethod("dora", dora="all"),
        CnnMethod("galore", weights="all", bn_train=True, optimizer="galore", lr_scale=ADAM_LR),
        CnnMethod("adapter", adapters=True),
        CnnMethod("lora-all-adam", lora="all", optimizer="adam", lr_scale=ADAM_LR),
        CnnMethod("ft-all-adam", weights="all", bn_train=True, optimizer="adam", lr_scale=ADAM_LR),
        CnnMethod("skip-lora", skip=True),
        CnnMethod("skip2-lora", skip=True, cache="dense"),
        CnnMethod("skip2-lora-q8", skip=True, cache="q8"),
        CnnMethod("skip2-lora-q4", skip=True, cache="q4"),
    )
}
# The Skip paths with ΔW_k trained directly (agent/trainer/delta_head.py), what the federation
# asks devices for: run when named, not part of the sources' comparison ("all").
DELTA_METHODS: dict[str, CnnMethod] = {
    m.name: m
    for m in (
        CnnMethod("skip-delta", skip=True, delta=True),
        CnnMethod("skip2-delta", skip=True, cache="dense", delta=True),
        CnnMethod("skip2-delta-q8", skip=True, cache="q8", delta=True),
        CnnMethod("skip2-delta-q4", skip=True, cache="q4", delta=True),
    )
}


def cnn_method_names() -> list[str]:
    """The sources' comparison: what `--methods all` runs."""
    return list(CNN_METHODS)


def resolve_cnn(name: str) -> CnnMethod:
    known = {**CNN_METHODS, **DELTA_METHODS}
    if name not in known:
        raise ValueError(f"unknown CNN method {name!r}; choose from {', '.join(known)}")
    return known[name]
