"""Skip-LoRA and Skip2-LoRA: the frozen part, the batches' rows and the Skip-Cache.

No gradient flows into the base model, so the frozen forward pass (every x_k and the head
output z) is needed once per sample. Skip-LoRA runs it every batch; Skip2-LoRA caches its
rows, and once every sample is cached a batch is one gather of its rows [x | z] and the
adapter arithmetic of `SkipHead`.

Rows are gathered batch by batch into one small buffer rather than epoch by epoch into a
shuffled copy of everything: the cache and its copy together outgrow a 1 MiB L2 cache (the
fan sets' cache alone fits), and a batch's rows are then still in L1 for the products
(measured: about 2 µs a batch less).
"""

from __future__ import annotations

import numpy as np

from agent.trainer.adapter import Adapter
from agent.trainer.cache import make_cache
from agent.trainer.delta_head import DeltaHead
from agent.trainer.skip_head import SkipHead

# Frozen-feature floats per block when the dense cache is filled: bounds the fill's memory for
# any model (the MLP's ~450-float rows: ~2,300 samples a block; a CNN's ~3,200: ~330).
FILL_FLOATS = 1 << 20


class SkipTrainer:
    def __init__(self, model, *, layers=(1, 2, 3), lr, rank, rng, cache="none", start=None,
                 n_samples, capacity=None, batch_size=20, delta=False):  # fmt: skip
        dims = model.layer_input_dims
        self.model = model
        self.layers = tuple(layers)
        self.n_classes = model.n_classes
        self.delta = delta
        start = start.frozen() if start is not None and not start.is_empty else None
        self.cached_layers = [k for k in self.layers if k >= 2]
        self.x1_width = dims[0] if 1 in self.layers else 0
        in_dims = [dims[k - 1] for k in self.layers]
        if delta:  # ΔW_k trains from where the start adapter left it (a warm start)
            trained = [_delta_or_zero(start, k, dims, self.n_classes) for k in self.layers]
            self.head = DeltaHead(in_dims, self.n_classes, lr=lr, batch_size=batch_size,
                                  start=trained)  # fmt: skip
            start = _without_layers(start, self.layers)  # the rest of it stays frozen
        else:  # fresh factors on top of the start adapter, which is frozen
            self.head = SkipHead(in_dims, rank, self.n_classes, rng, lr=lr, batch_size=batch_size)
        # a frozen adapter the device already runs: folded into z by frozen_rows
        self.start = start
        self.backward, self.update = self.head.backward, self.head.update  # the head's own
        widths = [dims[k - 1] for k in self.cached_layers]
        self.cache = None
        if cache != "none":
            self.cache = make_cache(cache, n_samples, widths, self.n_classes, capacity)
        self.batch_size = batch_size
        # the one data set it trains on, given by the first epoch, and laid out once from it:
        # every sample's row [x | z] and its scaled one-hot label
        self.X1 = self._onehot = self.source = self.y_source = None
        # set up by the first epoch: shuffled labels, per-batch arrays and ids, θ's snapshot
        self.y_buffer = self.batches = self.ids = self._snapshot = None

    # ------------------------------------------------------------- frozen part
    def frozen_rows(self, x1):
        """Cache rows [x_k for cached k | z] of standardised inputs (B, N)."""
        xs, z = self.model.frozen_features(x1, standardized=True)
        if self.start is not None:  # a frozen adapter the device already runs: part of z
            z = z + self.start.delta_logits(xs)  # (B, C)
        # softmax is unchanged by a per-row shift; with max(z) = 0 cached, the head can skip
        # the usual max-subtraction (check_overflow guards the rare case that overflows)
        z = z - z.max(axis=1, keepdims=True)  # (B, C)
        return np.concatenate([xs[k - 1] for k in self.cached_layers] + [z], axis=1)

    # ------------------------------------------------------------------ epochs
    def begin_epoch(self, X1, labels, onehot, perm):
        """Shuffle this epoch's labels; the rows of each batch are gathered by forward()."""
        self.check_overflow()
        self._layout(X1, onehot)
        np.copyto(self._snapshot, self.head.theta)
        n, cache = len(perm), self.cache
        np.copyto(self.ids, perm)  # the batches' id views (self.batches) see the new order
        # mode "clip": the ids are valid, and "raise" would copy the output once more
        self.y_source.take(perm, 0, self.y_buffer, "clip")
        complete = cache is not None and cache.complete
        if cache is not None and cache.kind == "dense" and not complete:
            self._fill_dense_cache(X1)  # this epoch's look-ups: every one a miss
            complete = True
        elif complete:
            cache.stats.lookups += n
            cache.stats.hits += n
        self.ready = complete
        if complete and self.source is None:  # every sample's row [x | z], laid out once
            self.source = np.concatenate([X1[:, : self.x1_width], cache.rows], axis=1)

    def _fill_dense_cache(self, X1):
        """The first epoch's frozen forward for every sample at once, in a few large products.

        The same work as filling the cache batch by batch, but NumPy's cost per call is paid
        once per block of samples instead of once per batch. Counted as the epoch's misses.
        """
        n = len(X1)
        block = max(1, FILL_FLOATS // (sum(self.model.layer_input_dims) + self.n_classes))
        for start in range(0, n, block):
            ids = np.arange(start, min(start + block, n))
            self.cache.store(ids, self.frozen_rows(X1[ids]))
        self.cache.stats.lookups += n

    def _layout(self, X1, onehot):
        if self.X1 is not None:
            if X1 is not self.X1 or onehot is not self._onehot:
                # the Skip-Cache holds rows by sample id: other data would meet stale rows
                raise ValueError("a SkipTrainer trains on one data set: make a new one")
            return
        self.X1, self._onehot, n, head = X1, onehot, len(X1), self.head
        self._snapshot = np.empty_like(head.theta)  # θ when the epoch began: check_overflow
        self.y_source = (onehot * head.label_scale).astype(np.float32)  # (n, C)
        self.y_buffer = np.empty_like(self.y_source)  # (n, C)
        self.ids = np.empty(n, dtype=np.intp)  # (n,) this epoch's sample order
        size = self.batch_size
        self.batches = [
            (v, self.ids[i * size : i * size + len(v.x)])
            for i, v in enumerate(head.views(self.y_buffer))
        ]

    def forward(self, start, stop):
        views, ids = self.batches[start // self.batch_size]
        x = views.x  # (b, W)
        if stop - start != len(x):
            raise ValueError(f"batch {start}:{stop} does not match batch size {self.batch_size}")
        if self.ready:  # every row cached: one gather, no frozen forward
            self.source.take(ids, 0, x, "clip")
        else:
            if self.x1_width:
                x[:, : self.x1_width] = self.X1[ids]
            x[:, self.x1_width :] = self._frozen_batch(ids)
        return self.head.forward(views)

    def _frozen_batch(self, ids):
        x1 = self.X1[ids]  # (B, N)
        if self.cache is None:  # Skip-LoRA: the frozen forward every batch
            return self.frozen_rows(x1)
        hit, rows = self.cache.lookup(ids)
        if not hit.all():
            miss = ~hit
            rows[miss] = self.cache.store(ids[miss], self.frozen_rows(x1[miss]))
        return rows

    def check_overflow(self):
        """Redo the last epoch with a max-subtracting softmax if its exp overflowed.

        Logits are z + x ΔW with max(z) = 0, so exp overflows only if the adapter alone pushes
        a logit past ~88. Then the epoch's updates are NaN: restore the factors saved when the
        epoch began, replay the same batches with the stable softmax, and keep it from then on.
        """
        head = self.head
        # M = Q P is refreshed after every step, and any NaN or inf in θ reaches it (even
        # 0 · inf is NaN): checking M is checking θ, at a third of the size
        if self.batches is None or np.isfinite(head.M).all():
            return
        head.theta[...] = self._snapshot
        head.refresh()
        head.stable = True
        stats = self.cache.stats if self.cache is not None else None
        counted = (stats.lookups, stats.hits) if stats is not None else None
        for start in range(0, len(self.ids), self.batch_size):  # the same batches again
            views = self.forward(start, min(start + self.batch_size, len(self.ids)))
            head.backward(views)
            head.update()
        if stats is not None:  # a replay is not a second epoch: the hit rate stays as it was
            stats.lookups, stats.hits = counted

    # ------------------------------------------------------------- results
    def adapter(self) -> Adapter:
        self.check_overflow()
        n_layers = len(self.model.layer_input_dims)
        deltas = list(self.start.deltas) if self.start is not None else [None] * n_layers
        factors = [None] * n_layers
        trained = self.head.deltas() if self.delta else self.head.factors()
        for k, value in zip(self.layers, trained, strict=True):
            if self.delta:
                deltas[k - 1] = value
            else:
                factors[k - 1] = value
        dims = self.model.layer_input_dims
        return Adapter(dims, self.n_classes, tuple(deltas), tuple(factors))

    def logits(self, X1):
        xs, z = self.model.frozen_features(X1, standardized=True)
        return z + self.adapter().delta_logits(xs)

    @property
    def stable(self) -> bool:
        return self.head.stable

    @property
    def trainable_params(self) -> int:
        return self.head.trainable_params

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    @property
    def cache_hit_rate(self) -> float:
        return self.cache.stats.hit_rate if self.cache is not None else 0.0


def _delta_or_zero(start: Adapter | None, k: int, dims, n_classes: int) -> np.ndarray:
    """Layer k's ΔW in the (frozen) start adapter, or zeros: where ΔW-training begins."""
    if start is None or start.deltas[k - 1] is None:
        return np.zeros((dims[k - 1], n_classes), dtype=np.float32)
    return start.deltas[k - 1]


def _without_layers(start: Adapter | None, layers) -> Adapter | None:
    """The start adapter with the given layers' deltas removed (None if nothing is left)."""
    if start is None:
        return None
    deltas = tuple(None if k in layers else d for k, d in enumerate(start.deltas, start=1))
    rest = Adapter(start.layer_dims, start.n_classes, deltas)
    return None if rest.is_empty else rest
