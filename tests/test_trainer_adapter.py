"""The Skip-LoRA adapter for any number of layers (the MLP has 3, the CNNs 4)."""

import numpy as np
import pytest

from agent.trainer.adapter import Adapter
from agent.trainer.errors import AdapterError

DIMS, CLASSES, RANK = (6, 5, 4, 3), 2, 2


def factors(rng):
    return tuple(
        (rng.standard_normal((d, RANK)), rng.standard_normal((RANK, CLASSES))) for d in DIMS
    )


def test_a_four_layer_adapter_adds_every_layers_product_to_the_logits():
    rng = np.random.default_rng(0)
    adapter = Adapter(DIMS, CLASSES, factors=factors(rng))
    xs = [rng.standard_normal((7, d)) for d in DIMS]
    expected = sum(x @ A @ B for x, (A, B) in zip(xs, adapter.factors, strict=True))
    np.testing.assert_allclose(adapter.delta_logits(xs), expected, rtol=1e-5, atol=1e-5)
    assert len(adapter.deltas) == 4 and adapter.deltas[3] is None


def test_a_four_layer_adapter_round_trips_through_its_wire_names():
    adapter = Adapter(DIMS, CLASSES, factors=factors(np.random.default_rng(1))).frozen()
    arrays = adapter.to_arrays()
    assert sorted(arrays) == ["delta1", "delta2", "delta3", "delta4"]
    again = Adapter.from_arrays(arrays, DIMS, CLASSES)
    for a, b in zip(again.effective_deltas(), adapter.effective_deltas(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_names_beyond_the_models_layers_are_refused():
    arrays = Adapter(DIMS, CLASSES, factors=factors(np.random.default_rng(2))).to_arrays()
    with pytest.raises(AdapterError, match="unknown adapter arrays"):
        Adapter.from_arrays(arrays, DIMS[:3], CLASSES)


def test_parts_for_the_wrong_number_of_layers_are_refused():
    with pytest.raises(AdapterError, match="2 entries for 4 layers"):
        Adapter(DIMS, CLASSES, deltas=(None, None))
