"""Writes a small TIMIT-shaped tree (LDC layout, SPHERE audio, real .TXT/.PHN/.WRD formats, mixed case)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from parpkit.progress import QUIET

# (part, dialect region, speaker, upper-case names?) — core test, dev and other test speakers included
SPEAKERS = [("TRAIN", "DR1", "FCJF0", True), ("TRAIN", "DR2", "MAEB0", False), ("TRAIN", "dr3", "mbgt0", False),
            ("TEST", "DR1", "MDAB0", True),   # core test
            ("TEST", "DR1", "FAKS0", True),   # dev
            ("TEST", "DR2", "MBOM0", True)]   # neither: only in the full test set
UTTERANCES = ["SA1", "SA2", "SI648", "SX108"]
PHONES = "h# sh iy hh ae dcl d y er dcl d aa r kcl k s uw q ix n h#".split()


def write_tree(root: Path) -> Path:
    from parpkit_plugins.datasets.synthetic_speech import SyntheticOptions, SyntheticSpeech

    corpus = SyntheticSpeech(SyntheticOptions(sizes={"train": len(SPEAKERS) * len(UTTERANCES)}, speakers={"train": 2}),
                             cache_dir=root.parent / "synth-cache").load_split("train", QUIET)
    k = 0
    for part, dr, spk, upper in SPEAKERS:
        folder = root / part / dr / spk
        folder.mkdir(parents=True, exist_ok=True)
        for utt in UTTERANCES:
            u = corpus[k]
            k += 1
            stem = utt if upper else utt.lower()
            ext = (lambda e: e.upper()) if upper else (lambda e: e.lower())
            pcm = np.round(u.audio * 32767).astype(np.int16)
            sf.write(folder / f"{stem}.{ext('wav')}", pcm, 16000, format="NIST", subtype="PCM_16")
            n = len(pcm)
            (folder / f"{stem}.{ext('txt')}").write_text(f"0 {n} {u.text}\n")
            words = u.text.rstrip(".").lower().split()
            step = n // len(words)
            (folder / f"{stem}.{ext('wrd')}").write_text("".join(f"{i * step} {(i + 1) * step} {w}\n" for i, w in enumerate(words)))
            step = n // len(PHONES)
            (folder / f"{stem}.{ext('phn')}").write_text("".join(f"{i * step} {(i + 1) * step} {p}\n" for i, p in enumerate(PHONES)))
    return root
