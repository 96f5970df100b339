"""The coordinator with CNN devices: 4-layer Skip adapters are checked, aggregated exactly, and
their reports (over the 128 KB publish limit once they carry a fleet adapter) travel chunked."""

from __future__ import annotations

import numpy as np
import pytest

from agent.trainer.adapter import Adapter
from agent.trainer.cnn import arch
from agent.trainer.cnn.finetune import run_cnn_method
from agent.uplink import Uplink
from coordinator.aggregation import AdapterShape, ExactDeltaStrategy, FitResult
from coordinator.reports import ReportRejected, check_adapter
from shared.protocol import DEFAULT_CHUNK_LIMIT, Reassembler, decode
from shared.protocol.enums import ArrayEncoding
from shared.protocol.messages import Report, ReportMetrics
from shared.topics import Topics
from tests.test_cnn_methods import tiny_model
from tests.test_cnn_model import toy_images

FULL_DIMS = arch.layer_input_dims(arch.build("cnn", 10), 28)  # (784, 784, 1568, 64)


@pytest.fixture(scope="module")
def cnn_reports():
    """Three devices' Skip2-LoRA adapters on one tiny CNN, different data and sample counts."""
    model = tiny_model("cnn")
    out = []
    for i, n in enumerate((40, 60, 100)):
        X, y = toy_images(n, seed=10 + i)
        adapter = run_cnn_method(model, X, y % 3, epochs=2, batch_size=10, seed=i).adapter
        out.append(FitResult(f"cam-{i}", adapter.to_arrays(), n))
    return model, out


def test_the_coordinator_infers_and_checks_a_four_layer_cnn_adapter(cnn_reports):
    model, results = cnn_reports
    shape = check_adapter("cam-0", results[0].arrays, results[0].num_samples, None)
    assert shape == AdapterShape(model.layer_input_dims, model.n_classes)
    assert len(shape.layer_dims) == 4
    three_layers = {k: v for k, v in results[1].arrays.items() if not k.endswith("4")}
    with pytest.raises(ReportRejected, match="the cohort's is"):
        check_adapter("cam-1", three_layers, 60, shape)


def test_exact_aggregation_of_cnn_adapters_averages_the_devices_logits(cnn_reports):
    model, results = cnn_reports
    shape = AdapterShape(model.layer_input_dims, model.n_classes)
    fleet = ExactDeltaStrategy(shape).aggregate_fit(results).arrays
    aggregate = Adapter.from_arrays(fleet, shape.layer_dims, shape.n_classes)
    X, _ = toy_images(30, seed=99)
    weights = np.array([r.num_samples for r in results]) / sum(r.num_samples for r in results)
    own = [Adapter.from_arrays(r.arrays, shape.layer_dims, shape.n_classes) for r in results]
    expected = sum(w * model.logits(X, a) for w, a in zip(weights, own, strict=True))
    # skip adapters end in the logits: the fleet adapter's logits are the weighted mean
    np.testing.assert_allclose(model.logits(X, aggregate), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("encoding", list(ArrayEncoding))
def test_a_full_size_cnn_report_with_fleet_deltas_travels_chunked(tmp_path, encoding):
    from agent.spool import Spool

    rng = np.random.default_rng(0)
    arrays = {}
    for k, d in enumerate(FULL_DIMS, start=1):  # a device that started from a fleet adapter
        arrays[f"delta{k}"] = rng.standard_normal((d, 10)).astype(np.float32) * 0.01
        arrays[f"A{k}"] = rng.standard_normal((d, 4)).astype(np.float32) * 0.1
        arrays[f"B{k}"] = rng.standard_normal((4, 10)).astype(np.float32) * 0.1
    metrics = ReportMetrics(0.1, 0.7, 1024, 10, 0.3, 0.3, "model:pi-zero-2w", 0.9, "h" * 64,
                            "skip2-lora", 4)  # fmt: skip
    report = Report("job-1", arrays, metrics, encoding=encoding)
    spool = Spool(tmp_path / "spool.sqlite", max_messages=100)
    items = Uplink("cam-0", Topics(), spool, boot_id="b1").encode(report)
    spool.close()
    assert all(len(item.payload) <= DEFAULT_CHUNK_LIMIT for item in items)
    if encoding is ArrayEncoding.FLOAT32:
        assert len(items) >= 2  # 3,200 × 14 floats: over one publish
    reassembler = Reassembler()
    done = [e for e in (reassembler.feed(decode(i.payload)) for i in items) if e is not None]
    (envelope,) = done
    received = envelope.message.adapter
    assert sorted(received) == sorted(arrays)
    tolerance = {"float32": 0, "float16": 1e-3, "int8": 2e-2}[encoding.value]
    for name, array in arrays.items():
        np.testing.assert_allclose(received[name], array, atol=tolerance * np.abs(array).max())
    shape = check_adapter("cam-0", received, 1024, None)
    assert shape.layer_dims == FULL_DIMS
