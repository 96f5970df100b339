"""The one real fine-tune of a load-generator process, and the per-device adapters made from it.

A simulated device does not train. Its report carries the process's reference adapter (trained
once, here, with agent.trainer.finetune on real device data), perturbed by a small seeded noise
(one of REPORT_VARIANTS per process, picked per (device, job)), and a per-device sample count;
every accuracy it sends is the real hold-out accuracy of the adapter it names, measured with the
agent's own Learner.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from agent.drift import RecentInputs, score_recent
from agent.learner import Learner, load_base_model, load_split
from agent.trainer.finetune import finetune

Arrays = Mapping[str, np.ndarray]
DRIFT_WINDOW_ROWS = 256  # as the agent: the latest rows the drift score looks at
# Each array of a device's report is the reference plus this fraction of its own spread as
# Gaussian noise: devices differ (the aggregate is a real weighted mean), none is garbage.
RELATIVE_NOISE = 0.05
# A process's devices report one of this many perturbed adapters (a load-generator
# simplification): each made, and evaluated for real, once per process. Perturbing and
# evaluating per (device, job) cost 18% of a generator's CPU in a 1,000-device round; with 64
# variants a round's reports still differ (and each carries its own job id, sample count and
# timestamps), and the aggregate is still a weighted mean of different adapters.
REPORT_VARIANTS = 64


@dataclass(frozen=True)
class ReferenceRun:
    learner: Learner  # the base model and this process's train / hold-out split (the agent's)
    arrays: dict[str, np.ndarray]  # the trained adapter, in wire form (A1..3, B1..3)
    accuracy_base: float  # hold-out accuracy of the base model alone
    accuracy_tuned: float  # hold-out accuracy with the reference adapter
    seconds: float  # wall time of the one real fine-tune
    cpu_seconds: float
    samples: int
    epochs: int
    cache_hit_rate: float
    cache_bytes: int
    drift_score: float  # BN1 mean squared z-score of the latest rows (agent.drift)

    @cached_property
    def base_model_hash(self) -> str:
        # BaseModel.weights_hash hashes every weight at each call; admission checks and
        # reports ask for it per job (measured: 12% of a generator's CPU in a round).
        return self.learner.model.weights_hash

    def summary(self) -> dict:
        return {
            "finetune_seconds": self.seconds,
            "finetune_cpu_seconds": self.cpu_seconds,
            "samples": self.samples,
            "epochs": self.epochs,
            "accuracy_base": self.accuracy_base,
            "accuracy_tuned": self.accuracy_tuned,
            "drift_score": self.drift_score,
            "base_model_hash": self.base_model_hash,
        }


def run_reference(
    base_model: Path,
    data: Path,
    *,
    epochs: int,
    lr: float,
    holdout_fraction: float = 0.25,
    seed: int = 0,
) -> ReferenceRun:
    """Loads the model and the data as the agent does, and fine-tunes once (timed)."""
    model = load_base_model(base_model)
    all_rows, train, holdout = load_split(data, model, holdout_fraction, seed)
    learner = Learner(model, train, holdout)
    started = time.process_time()
    result = finetune(model, train.X, train.y, epochs=epochs, lr=lr, seed=seed)
    cpu = time.process_time() - started
    recent = RecentInputs(DRIFT_WINDOW_ROWS, model.n_inputs)
    recent.add(all_rows.X)
    rows = recent.snapshot()
    drift = score_recent(model, rows, learner.logits(rows, None)).bn1_mean_squared_z
    return ReferenceRun(
        learner=learner,
        arrays=result.adapter.to_arrays(),
        accuracy_base=learner.holdout_accuracy(None),
        accuracy_tuned=learner.holdout_accuracy(result.adapter),
        seconds=result.seconds,
        cpu_seconds=max(cpu, result.cpu_seconds),
        samples=result.samples,
        epochs=result.epochs_run,
        cache_hit_rate=result.cache_hit_rate,
        cache_bytes=result.cache_bytes,
        drift_score=float(drift),
    )


def perturbed(reference: Arrays, seed: int) -> dict[str, np.ndarray]:
    """The reference arrays plus seeded Gaussian noise scaled to each array's spread."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, array in reference.items():
        spread = float(np.std(array)) or 1e-3
        noise = rng.standard_normal(array.shape) * (RELATIVE_NOISE * spread)
        out[name] = (array + noise).astype(array.dtype)
    return out


def device_samples(reference_samples: int, device_index: int) -> int:
    """A per-device training-set size between half and all of the process's rows (seeded), so
    aggregation weights differ as they would across a fleet."""
    rng = np.random.default_rng([device_index, 7])
    low = max(1, reference_samples // 2)
    return int(rng.integers(low, reference_samples + 1))


class Evaluator:
    """Real hold-out accuracy of adapter arrays, checked against the model as the agent does.

    Fleet versions are the same arrays for every device of a process: their accuracy is
    computed once per version.
    """

    def __init__(self, learner: Learner) -> None:
        self._learner = learner
        self._by_version: dict[int, float] = {}
        self._variants: dict[int, tuple[dict[str, np.ndarray], float]] = {}

    def accuracy(self, arrays: Arrays | None) -> float:
        """AdapterError if the arrays do not fit the model."""
        return self._learner.holdout_accuracy(self._learner.adapter(arrays))

    def version_accuracy(self, version: int, arrays: Arrays) -> float:
        if version not in self._by_version:
            self._by_version[version] = self.accuracy(arrays)
        return self._by_version[version]

    def variant(self, reference: Arrays, seed: int) -> tuple[dict[str, np.ndarray], float]:
        """The perturbed reference a report with this seed carries (one of REPORT_VARIANTS,
        made on first use), and its real hold-out accuracy. Shared: never modify the arrays."""
        key = seed % REPORT_VARIANTS
        if key not in self._variants:
            arrays = perturbed(reference, key)
            self._variants[key] = (arrays, self.accuracy(arrays))
        return self._variants[key]

    def make_variants(self, reference: Arrays) -> None:
        """Every variant now (a generator process, before its devices connect), so that no
        round pays for them."""
        for key in range(REPORT_VARIANTS):
            self.variant(reference, key)

    def check(self, arrays: Arrays) -> None:
        self._learner.adapter(arrays)

    @property
    def holdout_samples(self) -> int:
        return len(self._learner.holdout)
