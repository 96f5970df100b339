"""Shared test fixtures. Tests point the product at ../shared/data (or $SKIPFLEET_DATA_DIR)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Small matrix products are much faster on one BLAS thread (measured: 8x); set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent

# Module-scoped fixtures of the modules that run a whole fleet (each defines coordinator_flags).
from tests.topology import coordinator, prometheus  # noqa: E402, F401


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("SKIPFLEET_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (path / "fan_damage1.npz").exists():
        pytest.fail(f"data sets not found in {path}: set SKIPFLEET_DATA_DIR")
    return path


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A private mosquitto on a free 127.0.0.1 port (see tests/mqtt_broker.py), stopped after."""
    from tests.mqtt_broker import MosquittoBroker, find_mosquitto

    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed: run `make system-deps`")
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray for the whole session (init ~4 s): never one per test.

    The coordinator's integration tests run their fleet actor on it (each under its own actor
    name), and a coordinator subprocess joins it by address instead of starting a second Ray.
    """
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024**2,
        namespace="skipfleet-tests",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
