"""The paper's eight fine-tuning methods as data: what each trains, where gradients flow."""

from __future__ import annotations

from dataclasses import dataclass

ALL_LAYERS = frozenset({1, 2, 3})


@dataclass(frozen=True)
class MethodSpec:
    name: str
    train_weights: frozenset[int] = frozenset()  # layers whose W and b train
    train_bias: frozenset[int] = frozenset()  # layers whose b alone trains
    bn_train: frozenset[int] = frozenset()  # BN layers in training mode, gamma/beta trained
    lora: frozenset[int] = frozenset()  # layers with an in-layer LoRA adapter
    skip: tuple[int, ...] = ()  # layers whose INPUT feeds a Skip-LoRA adapter to the logits
    cache: bool = False  # Skip-Cache: frozen activations computed once per sample
    delta: bool = False  # skip adapters train ΔW_k (d_k × C) itself, not A_k B_k

    @property
    def lowest_trained_layer(self) -> int:
        """Gradients must flow down to this layer and no further (4: no backprop at all)."""
        layers = self.train_weights | self.train_bias | self.bn_train | self.lora
        return min(layers) if layers else 4

    @property
    def is_adapter_only(self) -> bool:
        """True when the base model stays untouched, so the result is an adapter to ship."""
        return bool(self.skip) and not (self.train_weights | self.train_bias | self.lora)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("ft-all", train_weights=ALL_LAYERS, bn_train=frozenset({1, 2})),
        MethodSpec("ft-last", train_weights=frozenset({3})),
        MethodSpec("ft-bias", train_bias=ALL_LAYERS),
        MethodSpec(
            "ft-all-lora", train_weights=ALL_LAYERS, bn_train=frozenset({1, 2}), lora=ALL_LAYERS
        ),
        MethodSpec("lora-all", lora=ALL_LAYERS),
        MethodSpec("lora-last", lora=frozenset({3})),
        MethodSpec("skip-lora", skip=(1, 2, 3)),
        MethodSpec("skip2-lora", skip=(1, 2, 3), cache=True),
        # The same skip paths with ΔW_k trained directly: a convex problem (delta_head.py)
        MethodSpec("skip-delta", skip=(1, 2, 3), delta=True),
        MethodSpec("skip2-delta", skip=(1, 2, 3), cache=True, delta=True),
    )
}
# Skip2-LoRA with a quantized Skip-Cache (the CNN follow-up), selectable like a method.
CACHE_VARIANTS = {
    "skip2-lora-q8": ("skip2-lora", "q8"),
    "skip2-lora-q4": ("skip2-lora", "q4"),
    "skip2-delta-q8": ("skip2-delta", "q8"),
    "skip2-delta-q4": ("skip2-delta", "q4"),
}


def method_names() -> list[str]:
    return [*METHODS, *CACHE_VARIANTS]


def resolve(name: str) -> tuple[MethodSpec, str]:
    """Method name -> (spec, cache kind); cache kind is 'none', 'dense', 'q8' or 'q4'."""
    if name in CACHE_VARIANTS:
        base, cache = CACHE_VARIANTS[name]
        return METHODS[base], cache
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    spec = METHODS[name]
    return spec, ("dense" if spec.cache else "none")
