"""Seeded sample messages of every kind, and a deep equality check that understands arrays."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from shared.protocol import (
    AdapterOrigin,
    AdapterPublication,
    ApplyAdapterParams,
    CancelParams,
    Chunk,
    DesiredState,
    EvaluateParams,
    FetchRequest,
    FinetuneParams,
    Heartbeat,
    Job,
    JobKind,
    JobReason,
    JobState,
    JobStatus,
    Lineage,
    Message,
    Presence,
    PresenceState,
    Report,
    ReportMetrics,
    RollbackAdapterParams,
)

BASE_HASH = "sha256:" + "ab" * 32


def adapter_arrays(rng: np.random.Generator, dims=(12, 96, 96), classes=3, rank=4) -> dict:
    """Skip-LoRA wire form: A_k (d_k x R), B_k (R x C), delta_k (d_k x C), float32."""
    arrays = {}
    for k, d in enumerate(dims, start=1):
        arrays[f"A{k}"] = rng.standard_normal((d, rank)).astype(np.float32)
        arrays[f"B{k}"] = rng.standard_normal((rank, classes)).astype(np.float32)
        arrays[f"delta{k}"] = rng.standard_normal((d, classes)).astype(np.float32) * 0.1
    return arrays


def metrics(rng: np.random.Generator) -> ReportMetrics:
    return ReportMetrics(
        accuracy_before=float(rng.uniform(0, 1)),
        accuracy_after=float(rng.uniform(0, 1)),
        samples=int(rng.integers(1, 5000)),
        epochs=int(rng.integers(1, 50)),
        finetune_seconds=float(rng.uniform(0, 100)),
        joules=float(rng.uniform(0, 500)),
        power_source="model:pi4-idle",
        cache_hit_rate=float(rng.uniform(0, 1)),
        base_model_hash=BASE_HASH,
        method="skip2-lora",
        rank=4,
    )


def sample_messages(seed: int) -> list[Message]:
    """One message of every kind (and every job kind), drawn from `seed`."""
    rng = np.random.default_rng(seed)
    return [
        Presence(
            PresenceState.ONLINE,
            boot_id=f"boot-{seed}",
            agent_version="0.1.0+dev",
            base_model_hash=BASE_HASH,
            cohort="fan-a",
            device={"hostname": "pi-07", "cpus": 4, "arm64": True, "mem_gb": 3.7, "note": None},
        ),
        Presence(
            PresenceState.ONLINE,
            boot_id=f"boot-{seed}",
            agent_version="0.2.0",
            base_model_hash=BASE_HASH,
            cohort="fan-a",
            train_samples=int(rng.integers(0, 500)),
            holdout_samples=int(rng.integers(0, 100)),
        ),
        Heartbeat(
            power_w=float(rng.uniform(1, 8)),
            power_source="ina219",
            energy_j_total=float(rng.uniform(0, 1e6)),
            cache_bytes=int(rng.integers(0, 2**40)),
            spool_depth=int(rng.integers(0, 100)),
            spool_dropped=0,
            uptime_s=float(rng.uniform(0, 1e5)),
            temperature_c=float(rng.uniform(20, 80)),
            drift_score=float(rng.uniform(0, 3)),
            adapter_version=int(rng.integers(0, 100)),
            busy_job_id="job-17",
            drifted=bool(seed % 2),
            clock_offset_s=float(rng.uniform(-4000, 4000)),
        ),
        Heartbeat(0.0, "model:pi4", 0.0, 0, 0, 0, 0.0),
        Heartbeat(1.2, "hwmon:ina226", 3.0, 0, 0, 0, 5.0, drifted=True),
        Heartbeat(
            1.2,
            "model:rpi-zero-2w",
            3.0,
            0,
            0,
            0,
            5.0,
            confidence_score=float(rng.uniform(0, 3)),
            feature_score=float(rng.uniform(0, 3)),
            signature=rng.standard_normal(96).astype(np.float32),
            signature_rows=int(rng.integers(1, 256)),
            adapter_origin=AdapterOrigin.PERSONAL,
        ),
        Job(
            "job-17",
            JobKind.FINETUNE,
            FinetuneParams(epochs=5, lr=float(rng.uniform(0.001, 0.1)), seed=seed, max_samples=300),
            expires_at=2e9,
            base_model_hash=BASE_HASH,
        ),
        Job(
            "job-23",
            JobKind.FINETUNE,
            FinetuneParams(epochs=30, lr=0.05, seed=seed, steps=30, start_version=0),
            expires_at=2e9,
        ),
        Job("job-18", JobKind.EVALUATE, EvaluateParams(), expires_at=2e9),
        Job("job-19", JobKind.EVALUATE, EvaluateParams(adapter_version=3), expires_at=2e9),
        Job("job-20", JobKind.APPLY_ADAPTER, ApplyAdapterParams(7), expires_at=2e9),
        Job("job-24", JobKind.APPLY_ADAPTER, ApplyAdapterParams(8, True), expires_at=2e9),
        Job("job-21", JobKind.ROLLBACK_ADAPTER, RollbackAdapterParams(), expires_at=2e9),
        Job("job-22", JobKind.CANCEL, CancelParams(target_job_id="job-17"), expires_at=2e9),
        JobStatus("job-17", JobState.IN_PROGRESS, progress=0.4, detail={"epoch": 2, "loss": 0.3}),
        JobStatus("job-17", JobState.SUCCEEDED, progress=1.0),
        JobStatus(
            "job-18", JobState.REJECTED, reason="already ran", reason_code=JobReason.DUPLICATE
        ),
        JobStatus(
            "job-22",
            JobState.REJECTED,
            reason_code=JobReason.NOTHING_TO_CANCEL,
            detail={"target_job_id": "job-9", "target_state": "succeeded"},
        ),
        Report(
            "job-17",
            adapter_arrays(rng),
            metrics(rng),
            parent_adapter_version=int(rng.integers(0, 10)),
        ),
        Report(
            "job-23",
            {k: v for k, v in adapter_arrays(rng).items() if k.startswith("delta")},
            dataclasses.replace(
                metrics(rng),
                method="skip2-delta",
                accuracy_running=float(rng.uniform(0, 1)),
                installed=bool(seed % 2),
                holdout_samples=int(rng.integers(1, 100)),
                steps=int(rng.integers(1, 1000)),
                loss_before=float(rng.uniform(0, 3)),
                loss_after=float(rng.uniform(0, 3)),
            ),
            parent_adapter_version=None,
        ),
        AdapterPublication(
            version=int(rng.integers(1, 1000)),
            base_model_hash=BASE_HASH,
            cohort="fan-a",
            arrays={k: v for k, v in adapter_arrays(rng).items() if k.startswith("delta")},
            lineage=Lineage("round-3", ("pi-01", "pi-02"), "fedavg-delta", parent_version=2),
            created_at=1.7e9,
        ),
        DesiredState(
            adapter_version=int(rng.integers(0, 100)), base_model_hash=BASE_HASH, cohort="x"
        ),
        DesiredState(adapter_version=None, base_model_hash=BASE_HASH, cohort="x"),
        DesiredState(adapter_version=4, base_model_hash=BASE_HASH, cohort="x", only_if_better=True),
        DesiredState(  # an offer with its adapter inline: one message to apply a version
            adapter_version=9,
            base_model_hash=BASE_HASH,
            cohort="fan-a",
            only_if_better=bool(seed % 2),
            adapter=AdapterPublication(
                version=9,
                base_model_hash=BASE_HASH,
                cohort="fan-a",
                arrays=adapter_arrays(rng),
                lineage=Lineage("round-4", ("pi-03",), "coordinate-median", parent_version=8),
                created_at=1.7e9,
            ),
            job_id="job-25",
            expires_at=float(rng.uniform(1e9, 2e9)),
        ),
        DesiredState(
            adapter_version=5,
            base_model_hash=BASE_HASH,
            cohort="x",
            job_id="job-26",
            expires_at=2e9,
        ),
        FetchRequest(adapter_version=int(rng.integers(0, 100))),
        Chunk("0" * 32, 1, 3, bytes(rng.integers(0, 256, 32, dtype=np.uint8)), b"\x00\x01piece"),
    ]


def assert_same(actual: object, expected: object, path: str = "message") -> None:
    """Deep equality for dataclasses, mappings and arrays (arrays compared as float32)."""
    if dataclasses.is_dataclass(expected):
        assert type(actual) is type(expected), path
        for f in dataclasses.fields(expected):
            assert_same(getattr(actual, f.name), getattr(expected, f.name), f"{path}.{f.name}")
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping) and set(actual) == set(expected), path
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray) and actual.dtype == np.float32, path
        np.testing.assert_array_equal(actual, expected.astype(np.float32), err_msg=path)
    else:
        assert actual == expected and type(actual) is type(expected), (path, actual, expected)
