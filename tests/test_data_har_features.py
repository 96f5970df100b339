"""window_features: shape, finiteness, per-window independence, and known signals."""

from __future__ import annotations

import numpy as np
import pytest

from agent.data import DataError, load_har_windows, window_feature_names, window_features
from agent.data.har_features import SAMPLE_RATE_HZ, WINDOW_LENGTH


@pytest.fixture(scope="module")
def real_windows(data_dir) -> np.ndarray:
    data = load_har_windows(data_dir)
    pick = np.random.default_rng(0).choice(len(data.windows), size=300, replace=False)
    return data.windows[np.sort(pick)]  # (300, 128, 6), all activities


def column(features: np.ndarray, name: str) -> np.ndarray:
    return features[:, window_feature_names().index(name)]


def synthetic_window(acc_x: np.ndarray) -> np.ndarray:
    """(1, 128, 6): gravity along z, `acc_x` on x, a still gyro with a little noise."""
    rng = np.random.default_rng(0)
    window = np.zeros((1, WINDOW_LENGTH, 6), np.float32)
    window[0, :, 0] = acc_x
    window[0, :, 2] = 1.0
    window[0, :, 3:] = rng.normal(0, 1e-3, size=(WINDOW_LENGTH, 3))
    return window


def test_shape_dtype_names_finite(real_windows):
    features = window_features(real_windows)
    names = window_feature_names()
    assert features.shape == (300, len(names)) and features.dtype == np.float32
    assert 150 <= len(names) <= 600 and len(set(names)) == len(names)
    assert np.isfinite(features).all()
    assert features.std(axis=0).min() > 0  # no dead feature


def test_each_window_is_featurised_on_its_own(real_windows):
    batch = window_features(real_windows[:20])
    one_by_one = np.concatenate([window_features(real_windows[i : i + 1]) for i in range(20)])
    np.testing.assert_allclose(batch, one_by_one, rtol=1e-5, atol=1e-5)


def test_float64_input_gives_same_features(real_windows):
    np.testing.assert_allclose(
        window_features(real_windows[:10].astype(np.float64)),
        window_features(real_windows[:10]),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_constant_windows_stay_finite(value):
    windows = np.full((2, WINDOW_LENGTH, 6), value, np.float32)
    assert np.isfinite(window_features(windows)).all()


def test_sine_wave_frequency_and_gravity():
    t = np.arange(WINDOW_LENGTH) / SAMPLE_RATE_HZ  # seconds
    step_hz = 2.0
    features = window_features(synthetic_window(0.3 * np.sin(2 * np.pi * step_hz * t)))
    nyquist = SAMPLE_RATE_HZ / 2
    assert column(features, "acc-x:dominant_freq")[0] == pytest.approx(step_hz / nyquist, abs=0.01)
    # 2 Hz sits in rFFT bin 5.12: the band 5-8 must carry the power
    bands = [n for n in window_feature_names() if n.startswith("acc-x:band")]
    strongest = bands[int(np.argmax([column(features, b)[0] for b in bands]))]
    assert strongest == "acc-x:band5-8"
    assert column(features, "gravity:z")[0] == pytest.approx(1.0, abs=0.01)
    assert column(features, "acc-x:std")[0] == pytest.approx(0.3 / np.sqrt(2), rel=0.05)
    # 5.12 periods in the window cross their mean about 10 times in 127 steps
    assert column(features, "acc-x:mean_crossing_rate")[0] == pytest.approx(10 / 127, abs=0.02)
    assert column(features, "acc-mag:mean")[0] == pytest.approx(1.02, abs=0.02)


def test_wrong_window_shape_is_a_data_error():
    with pytest.raises(DataError, match=r"\(n, 128, 6\)"):
        window_features(np.zeros((4, 64, 6), np.float32))
    with pytest.raises(DataError, match="shape"):
        window_features(np.zeros((128, 6), np.float32))
