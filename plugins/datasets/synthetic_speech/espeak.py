"""espeak-ng through its C API (ctypes), from the ``espeakng-loader`` wheel: no system packages."""

from __future__ import annotations

import ctypes

import numpy as np

from parpkit import ParpkitError

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH, _RANGE = 1, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class Espeak:
    """One process-wide synthesiser.

    The library keeps global state across calls (even across Terminate/Initialize): the same text
    twice in one process gives different audio, while the same sequence of calls in a fresh process
    with the same seeds gives identical audio. So corpora are synthesised in a fresh child process.
    """

    _instance: Espeak | None = None

    @classmethod
    def get(cls) -> Espeak:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            raise ParpkitError("the synthetic speech corpus needs espeak-ng: pip install espeakng-loader") from None
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.sample_rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise ParpkitError(f"espeak-ng failed to initialise (code {self.sample_rate})")
        self._chunks: list[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: the library holds a raw pointer
        self.lib.espeak_SetSynthCallback(self._callback)
        self._libc = ctypes.CDLL(None)

    def _collect(self, wav, n, _events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synth(self, text: str, voice: str, rate: int, pitch: int, seed: int = 0, intonation: int | None = None) -> np.ndarray:
        """int16 samples at ``self.sample_rate``; ``intonation`` is espeak's pitch range (0 monotone, 50 its
        default, 100 exaggerated; None leaves it alone)."""
        self._libc.srand(seed)  # espeak-ng draws from rand() and from its own generator
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ParpkitError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        if intonation is not None:
            self.lib.espeak_SetParameter(_RANGE, int(intonation), 0)
        self._chunks = []
        data = text.encode("utf-8")
        code = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()
        if intonation is not None:  # it persists across voices: back to the default
            self.lib.espeak_SetParameter(_RANGE, 50, 0)
        if code != 0 or not self._chunks:
            raise ParpkitError(f"espeak-ng could not synthesise {text!r} with voice {voice!r} (code {code})")
        return np.concatenate(self._chunks)


def variant_names() -> set[str]:
    """The voice variants in espeak-ng's data (``voices/!v``)."""
    import os

    try:
        import espeakng_loader
    except ImportError:
        raise ParpkitError("the synthetic speech corpus needs espeak-ng: pip install espeakng-loader") from None
    return set(os.listdir(os.path.join(espeakng_loader.get_data_path(), "voices", "!v")))


def voice_names() -> set[str]:
    """The voices espeak-ng's data holds, by file name (``en-us``, lower case), as ``espeak_SetVoiceByName``
    finds them. Read from the files, not the library: loading it here would change what a forked synthesis
    process produces."""
    import os

    try:
        import espeakng_loader
    except ImportError:
        raise ParpkitError("the synthetic speech corpus needs espeak-ng: pip install espeakng-loader") from None
    return {f.lower() for _, _, files in os.walk(os.path.join(espeakng_loader.get_data_path(), "lang")) for f in files}
