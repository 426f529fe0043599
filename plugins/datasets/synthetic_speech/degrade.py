"""Numpy-only, deterministic-per-seed degradations for the out-of-domain split: noise and reverberation.

Every function takes mono audio (any float/int dtype, float expected in [-1, 1]) and returns a new
float32 array of the SAME length with every sample in [-1, 1]. Randomness comes only from the
``rng`` argument: a ``numpy.random.Generator`` (or an int seed, turned into
``np.random.default_rng(seed)``), so the same seed gives bit-identical output on the same numpy.

    add_noise(audio, snr_db, rng, color="white")       white / pink / brown noise at an SNR
    reverberate(audio, rt60_s, rng, sample_rate=16000)  synthetic exponentially decaying room response
    colored_noise(n, color, rng)                        the noise itself (unit RMS)
    room_impulse_response(rt60_s, rng, sample_rate)     the impulse response itself
"""

from __future__ import annotations

import numpy as np

__all__ = ["add_noise", "reverberate", "colored_noise", "room_impulse_response", "signal_power"]

_COLOR_EXPONENT = {"white": 0.0, "pink": 1.0, "brown": 2.0, "blue": -1.0}  # power spectrum ~ 1 / f**exponent


def _rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, not {type(rng).__name__}")


def _as_float(audio) -> np.ndarray:
    x = np.asarray(audio)
    if x.ndim != 1:
        raise ValueError(f"mono audio expected, got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float64) / float(np.iinfo(x.dtype).max + 1)
    return x.astype(np.float64, copy=True)


def _finish(y: np.ndarray, limit: float = 0.999) -> np.ndarray:
    """float32 in [-1, 1]: scaled down as a whole (not clipped) if the peak exceeds ``limit``."""
    peak = float(np.max(np.abs(y))) if y.size else 0.0
    if peak > limit:
        y = y * (limit / peak)
    return np.clip(y, -1.0, 1.0).astype(np.float32)


def signal_power(audio, *, active: bool = True, sample_rate: int = 16000, floor_db: float = 40.0) -> float:
    """Mean square of ``audio``; with ``active`` only over 20 ms frames within ``floor_db`` of the
    loudest frame, so leading/trailing silence does not inflate the SNR of short utterances."""
    x = _as_float(audio)
    if x.size == 0:
        return 0.0
    if not active:
        return float(np.mean(x ** 2))
    frame = max(1, int(0.02 * sample_rate))
    n = len(x) // frame
    if n < 2:
        return float(np.mean(x ** 2))
    e = np.mean(x[:n * frame].reshape(n, frame) ** 2, axis=1)
    keep = e >= e.max() * 10 ** (-floor_db / 10)
    return float(np.mean(e[keep]))


def colored_noise(n: int, color: str, rng) -> np.ndarray:
    """``n`` samples of Gaussian noise with power spectrum ~ 1/f**k (white k=0, pink 1, brown 2,
    blue -1), zero mean, unit RMS, float64."""
    if color not in _COLOR_EXPONENT:
        raise ValueError(f"color must be one of {sorted(_COLOR_EXPONENT)}, not {color!r}")
    g = _rng(rng)
    if n <= 0:
        return np.zeros(0)
    white = g.standard_normal(n)
    k = _COLOR_EXPONENT[color]
    if k == 0.0:
        y = white
    else:
        spec = np.fft.rfft(white)
        f = np.arange(spec.size, dtype=np.float64)
        f[0] = f[1] if spec.size > 1 else 1.0  # no infinite gain at DC
        spec *= f ** (-k / 2.0)
        spec[0] = 0.0
        y = np.fft.irfft(spec, n)
    y = y - y.mean()
    rms = np.sqrt(np.mean(y ** 2))
    return y / rms if rms > 0 else y


def add_noise(audio, snr_db: float, rng, color: str = "white", *, active: bool = True, sample_rate: int = 16000) -> np.ndarray:
    """``audio`` plus ``color`` noise at ``snr_db`` dB signal-to-noise ratio (signal power measured
    over active speech frames unless ``active=False``). If the mix would exceed full scale, the mix
    as a whole is scaled down, so the SNR is exact. Same length, float32 in [-1, 1]."""
    x = _as_float(audio)
    noise = colored_noise(len(x), color, rng)
    p = signal_power(x, active=active, sample_rate=sample_rate)
    if p <= 0:  # silence: noise at -30 dBFS
        return _finish(noise * 10 ** (-30 / 20))
    noise *= np.sqrt(p / 10 ** (snr_db / 10))
    return _finish(x + noise)


def room_impulse_response(rt60_s: float, rng, sample_rate: int = 16000, *, drr_db: float = 0.0,
                          predelay_s: float | None = None, damping: float = 0.5) -> np.ndarray:
    """Synthetic room response: a unit direct path at sample 0, then (after a short pre-delay of
    2..12 ms drawn from ``rng`` unless given) Gaussian noise under an exponential envelope that
    falls 60 dB in ``rt60_s`` seconds, scaled to a direct-to-reverberant energy ratio of
    ``drr_db``; the tail is progressively low-passed (``damping`` 0..1: 0 none) since high
    frequencies die out faster in real rooms. Length 1.2 * rt60 (at least 10 ms)."""
    if rt60_s <= 0:
        raise ValueError("rt60_s must be positive")
    g = _rng(rng)
    n = max(int(1.2 * rt60_s * sample_rate), int(0.01 * sample_rate))
    t = np.arange(n) / sample_rate
    tail = g.standard_normal(n) * np.exp(-np.log(1000.0) * t / rt60_s)  # amplitude -60 dB at rt60
    if damping > 0:
        # crude frequency-dependent decay: blend in a one-pole low-passed copy as time goes on
        a = 0.2 + 0.75 * min(max(damping, 0.0), 1.0)
        lp = np.empty_like(tail)
        acc = 0.0
        for i, v in enumerate(tail):  # short loop (n ~ 1e4); keeps this numpy-only
            acc = a * acc + (1 - a) * v
            lp[i] = acc
        w = np.clip(t / rt60_s, 0.0, 1.0)
        tail = (1 - w) * tail + w * lp * (np.std(tail) / (np.std(lp) + 1e-12))
    pre = g.uniform(0.002, 0.012) if predelay_s is None else predelay_s
    tail[: max(1, int(pre * sample_rate))] = 0.0
    e = float(np.sum(tail ** 2))
    if e > 0:
        tail *= np.sqrt(10 ** (-drr_db / 10) / e)  # direct path energy is 1
    h = tail
    h[0] = 1.0
    return h


def reverberate(audio, rt60_s: float, rng, sample_rate: int = 16000, *, drr_db: float = 0.0,
                damping: float = 0.5) -> np.ndarray:
    """``audio`` convolved with ``room_impulse_response(rt60_s, rng, ...)`` (direct path at lag 0,
    so no delay), cut to the input length, then scaled to the input's RMS (or lower, to stay under
    full scale). Same length, float32 in [-1, 1]."""
    x = _as_float(audio)
    if x.size == 0:
        return x.astype(np.float32)
    h = room_impulse_response(rt60_s, rng, sample_rate, drr_db=drr_db, damping=damping)
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[: len(x)]
    rx, ry = np.sqrt(np.mean(x ** 2)), np.sqrt(np.mean(y ** 2))
    if ry > 0:
        y *= rx / ry
    return _finish(y)
