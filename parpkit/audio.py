"""Reading audio files for datasets: any format libsndfile knows (WAV, FLAC, NIST SPHERE, …), mixed to
mono float32 and resampled to the backbone's rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from parpkit.errors import ParpkitError


class AudioError(ParpkitError):
    def __init__(self, path: Path, reason: str):
        self.path = path
        super().__init__(f"{path}: unreadable audio ({reason})")


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return audio.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(audio, rate, target).astype(np.float32, copy=False)


def read_audio(path: str | Path, target_rate: int = 16000) -> np.ndarray:
    import soundfile as sf

    path = Path(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile reports every failure as a RuntimeError/LibsndfileError
        raise AudioError(path, str(exc).strip() or type(exc).__name__) from None
    if data.shape[0] == 0:
        raise AudioError(path, "no samples")
    return resample(data.mean(axis=1), rate, target_rate)
