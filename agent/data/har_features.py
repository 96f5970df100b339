"""On-device HAR features: raw 50 Hz windows (n, 128, 6) -> a fixed feature vector (n, F).

A device computes these itself from its accelerometer (g, gravity included) and gyroscope
(rad/s) windows, with NumPy only and no fitted parameters: every device maps the same window to
the same features, so models and adapters can move between devices. Counts are given as rates,
frequencies as a fraction of Nyquist and band powers as logs, but the groups still differ in
scale (a mean of |acc| near 1 g with spread 0.02, log band powers near -10 with spread 2), so a
trainer should standardise them with pre-training statistics (`agent.data.scaling.Standardizer`;
`har_drift_split` does it by default).

Channels: the 6 raw ones plus the magnitudes |acc| and |gyro| (orientation-free, so they carry
the motion even when the phone sits differently on another person's waist).
Groups, per window (C = 8 channels):
  statistics   11 per channel: mean, std, min, max, median absolute deviation, IQR, energy,
               skewness, kurtosis, mean-crossing rate, mean |first difference| (jerk)
  correlations 6: between the 3 acc axes and between the 3 gyro axes
  gravity      3: direction of the mean acc vector (unit vector): posture, i.e. sitting vs
               standing vs laying, lives here
  spectrum     11 per channel: log power in 8 log-spaced bands 0.4..25 Hz, dominant frequency,
               spectral centroid, spectral entropy
F = 11*8 + 6 + 3 + 11*8 = 185.
"""

from __future__ import annotations

import itertools

import numpy as np

from agent.data.errors import DataError

SAMPLE_RATE_HZ = 50
WINDOW_LENGTH = 128
RAW_CHANNELS = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
CHANNELS = (*RAW_CHANNELS, "acc-mag", "gyro-mag")

# rFFT bin edges of the spectrum bands (bin k is k * 50/128 = 0.39 k Hz, bins 1..64), roughly
# log-spaced: fine resolution around the 1-3 Hz of walking steps, coarse above 10 Hz.
BAND_EDGES = (1, 2, 3, 5, 8, 14, 23, 39, 65)
N_BANDS = len(BAND_EDGES) - 1
# Floor under band powers before the log (variance units: g^2, (rad/s)^2), about the sensor's
# noise level, so the log of a still channel does not run off towards -inf.
POWER_FLOOR = 1e-6
# Guards divisions by a variance or a norm that is zero for a perfectly constant channel.
TINY = 1e-12

STAT_NAMES = (
    "mean", "std", "min", "max", "mad", "iqr", "energy",
    "skewness", "kurtosis", "mean_crossing_rate", "jerk",
)  # fmt: skip
SPECTRUM_NAMES = (
    *(f"band{lo}-{hi}" for lo, hi in itertools.pairwise(BAND_EDGES)),
    "dominant_freq", "centroid", "entropy",
)  # fmt: skip
CORRELATION_PAIRS = ((0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5))


def window_features(windows: np.ndarray) -> np.ndarray:
    """float32 (n, 128, 6) raw windows -> float32 (n, F) features, F = `n_window_features()`."""
    windows = np.asarray(windows)
    if windows.ndim != 3 or windows.shape[1:] != (WINDOW_LENGTH, len(RAW_CHANNELS)):
        raise DataError(
            f"window_features: windows have shape {windows.shape}, expected "
            f"(n, {WINDOW_LENGTH}, {len(RAW_CHANNELS)}) = (n, samples, {', '.join(RAW_CHANNELS)})"
        )
    windows = windows.astype(np.float32, copy=False)  # (n, 128, 6)
    signals = with_magnitudes(windows)  # (n, 128, 8)
    features = np.concatenate(
        [
            channel_statistics(signals),  # (n, 88)
            axis_correlations(windows),  # (n, 6)
            gravity_direction(windows),  # (n, 3)
            spectrum_features(signals),  # (n, 88)
        ],
        axis=1,
    )
    return features.astype(np.float32, copy=False)  # (n, 185)


def window_feature_names() -> tuple[str, ...]:
    """Column names of `window_features`, in order (e.g. 'acc-x:std', 'gyro-mag:band2-3')."""
    stats = [f"{ch}:{stat}" for stat in STAT_NAMES for ch in CHANNELS]
    corrs = [f"corr:{RAW_CHANNELS[a]}:{RAW_CHANNELS[b]}" for a, b in CORRELATION_PAIRS]
    gravity = [f"gravity:{axis}" for axis in "xyz"]
    spectrum = [f"{ch}:{name}" for name in SPECTRUM_NAMES for ch in CHANNELS]
    return (*stats, *corrs, *gravity, *spectrum)


def n_window_features() -> int:
    return len(window_feature_names())


def with_magnitudes(windows: np.ndarray) -> np.ndarray:
    """(n, 128, 6) -> (n, 128, 8): the raw channels, then |acc| and |gyro| per sample."""
    acc_magnitude = np.linalg.norm(windows[:, :, 0:3], axis=2, keepdims=True)  # (n, 128, 1)
    gyro_magnitude = np.linalg.norm(windows[:, :, 3:6], axis=2, keepdims=True)  # (n, 128, 1)
    return np.concatenate([windows, acc_magnitude, gyro_magnitude], axis=2)  # (n, 128, 8)


def channel_statistics(signals: np.ndarray) -> np.ndarray:
    """(n, T, C) -> (n, 11 C): the STAT_NAMES statistics of every channel, grouped by statistic."""
    mean = signals.mean(axis=1)  # (n, C)
    centred = signals - mean[:, None, :]  # (n, T, C)
    centred_sq = centred * centred  # (n, T, C); products, not **: float32 `**3` is 20x slower
    variance = centred_sq.mean(axis=1)  # (n, C)
    std = np.sqrt(variance)  # (n, C)
    ordered = np.sort(signals, axis=1)  # (n, T, C); one sort gives min, max and the quantiles
    q25, median, q75 = (sorted_quantile(ordered, q) for q in (0.25, 0.5, 0.75))  # 3 x (n, C)
    deviation = np.sort(np.abs(signals - median[:, None, :]), axis=1)  # (n, T, C)
    mad = sorted_quantile(deviation, 0.5)  # (n, C); sort + pick beats np.median's partition here
    energy = (signals * signals).mean(axis=1)  # (n, C)
    safe_variance = np.maximum(variance, TINY)  # (n, C)
    skewness = (centred_sq * centred).mean(axis=1) / safe_variance**1.5  # (n, C)
    # kurtosis (>= 1 for any signal) as a log: spiky windows reach 50+ and would dominate
    kurtosis = np.log(np.maximum((centred_sq * centred_sq).mean(axis=1) / safe_variance**2, 1.0))
    above = centred > 0  # (n, T, C)
    mean_crossing_rate = (above[:, 1:] != above[:, :-1]).mean(axis=1)  # (n, C)
    jerk = np.abs(np.diff(signals, axis=1)).mean(axis=1)  # (n, C)
    minimum, maximum = ordered[:, 0], ordered[:, -1]  # (n, C)
    stats = [mean, std, minimum, maximum, mad, q75 - q25, energy,
             skewness, kurtosis, mean_crossing_rate, jerk]  # fmt: skip
    return np.concatenate(stats, axis=1)  # (n, 11 C)


def sorted_quantile(ordered: np.ndarray, q: float) -> np.ndarray:
    """(n, T, C) sorted along T -> (n, C): the q-quantile, interpolated as np.percentile does."""
    position = q * (ordered.shape[1] - 1)
    below = int(np.floor(position))
    above = min(below + 1, ordered.shape[1] - 1)
    weight = np.float32(position - below)
    return ordered[:, below] * (1 - weight) + ordered[:, above] * weight  # (n, C)


def axis_correlations(windows: np.ndarray) -> np.ndarray:
    """(n, T, 6) -> (n, 6): Pearson correlation of acc x/y, x/z, y/z and gyro x/y, x/z, y/z."""
    centred = windows - windows.mean(axis=1, keepdims=True)  # (n, T, 6)
    std = np.sqrt((centred**2).mean(axis=1))  # (n, 6)
    columns = []
    for a, b in CORRELATION_PAIRS:
        covariance = (centred[:, :, a] * centred[:, :, b]).mean(axis=1)  # (n,)
        columns.append(covariance / np.maximum(std[:, a] * std[:, b], TINY))  # (n,)
    return np.stack(columns, axis=1)  # (n, 6)


def gravity_direction(windows: np.ndarray) -> np.ndarray:
    """(n, T, 6) -> (n, 3): unit vector along the mean acceleration (gravity in a still window)."""
    mean_acc = windows[:, :, 0:3].mean(axis=1)  # (n, 3)
    norm = np.linalg.norm(mean_acc, axis=1, keepdims=True)  # (n, 1)
    return mean_acc / np.maximum(norm, TINY)  # (n, 3)


def spectrum_features(signals: np.ndarray) -> np.ndarray:
    """(n, T, C) -> (n, 11 C): band log-powers, dominant frequency, centroid, entropy per channel.

    Power is one-sided and scaled so that it sums (over bins 1..T/2) to about the variance of the
    window; the Hann taper keeps a strong step frequency from leaking into every band.
    """
    n_samples = signals.shape[1]
    taper = np.hanning(n_samples).astype(np.float32)  # (T,)
    centred = signals - signals.mean(axis=1, keepdims=True)  # (n, T, C)
    spectrum = np.fft.rfft(centred * taper[None, :, None], axis=1)  # (n, T/2+1, C) complex
    scale = 2.0 / (n_samples * np.sum(taper**2))
    spectrum = spectrum[:, 1:]  # (n, T/2, C), bins 1..T/2: bin 0 is the mean, removed above
    power = (spectrum.real * spectrum.real + spectrum.imag * spectrum.imag) * np.float32(scale)
    n_bins = power.shape[1]
    band_starts = np.array(BAND_EDGES[:-1]) - 1  # edges count from bin 1, `power` from index 0
    band_power = np.add.reduceat(power, band_starts, axis=1)  # (n, 8, C)
    log_band_power = np.log(band_power + POWER_FLOOR)  # (n, 8, C)
    bin_fraction = (np.arange(n_bins, dtype=np.float32) + 1) / n_bins  # (T/2,) freq / Nyquist
    total = np.maximum(power.sum(axis=1), TINY)  # (n, C)
    dominant = bin_fraction[np.argmax(power, axis=1)]  # (n, C)
    centroid = (power * bin_fraction[None, :, None]).sum(axis=1) / total  # (n, C)
    share = power / total[:, None, :]  # (n, T/2, C)
    entropy = -(share * np.log(share + TINY)).sum(axis=1) / np.log(n_bins)  # (n, C), in [0, 1]
    n, _, n_channels = signals.shape
    bands_flat = log_band_power.reshape(n, N_BANDS * n_channels)  # (n, 8 C), band-major
    return np.concatenate([bands_flat, dominant, centroid, entropy], axis=1)  # (n, 11 C)
