"""Reading audio files for datasets: any format libsndfile knows (WAV, FLAC, NIST SPHERE, …), mixed to
mono float32 and resampled to the backbone's rate."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

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


def read_audio(source: str | Path | BinaryIO, target_rate: int = 16000, name: str | Path | None = None) -> np.ndarray:
    """``source`` is a path or an open binary file (in-memory bytes); ``name`` labels errors for the latter."""
    import soundfile as sf

    label = Path(name if name is not None else source if isinstance(source, (str, Path)) else "<bytes>")
    try:
        data, rate = sf.read(str(source) if isinstance(source, (str, Path)) else source, dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile reports every failure as a RuntimeError/LibsndfileError
        raise AudioError(label, str(exc).strip() or type(exc).__name__) from None
    if data.shape[0] == 0:
        raise AudioError(label, "no samples")
    return resample(data.mean(axis=1), rate, target_rate)
