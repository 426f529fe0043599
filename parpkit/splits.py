"""The engine's checks of a loaded split, in one place: ``parpkit run`` makes them when a split loads (before
anything trains or is scored), and ``parpkit.testing.check_dataset`` lets a dataset plugin's tests make the
same ones without a run. Each refusal names the split and the utterance."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from parpkit.errors import ParpkitError
from parpkit.interfaces import Utterance
from parpkit.metrics import text_normaliser

#: audio samples are floats in [-1, 1]; a peak above this is another scale (int16 values as floats, a gain)
MAX_PEAK = 2.0


def check_utterances(utts: Sequence[Utterance], split: str, backbone: Any = None, *, sample_rate: int | None = None,
                     min_samples: int | None = None) -> None:
    """Every utterance can be used as it is: ids unique text within the split (pseudo-labels, transcripts and
    checkpoints know utterances by id), a transcript that is text or None, audio mono float samples in [-1, 1],
    finite, at the backbone's sample rate and long enough for it (what the dataset hands over, after any
    resampling it does). ``backbone`` gives the sample rate and the shortest audio; without one, the given
    values or 16 kHz and one sample."""
    where = f"dataset: split {split!r}"
    if not isinstance(utts, Sequence) or isinstance(utts, (str, bytes)):
        raise ParpkitError(f"{where}: load_split returned a {type(utts).__name__}; expected a sequence of parpkit.Utterance")
    name = backbone.name if backbone is not None else "the backbone"
    rate = sample_rate or (backbone.sample_rate if backbone is not None else 16000)
    shortest = min_samples or (backbone.min_samples() if backbone is not None else 1)
    seen: set[str] = set()
    for i, u in enumerate(utts):
        if not isinstance(u, Utterance):
            raise ParpkitError(f"{where}: item {i} is a {type(u).__name__}; expected parpkit.Utterance")
        if not isinstance(u.id, str) or not u.id:
            raise ParpkitError(f"{where}: utterance {i} has the id {u.id!r}; expected non-empty text")
        if u.id in seen:
            raise ParpkitError(f"{where}: utterance id {u.id!r} occurs more than once; ids must be unique within a split")
        seen.add(u.id)
        if u.text is not None and not isinstance(u.text, str):
            raise ParpkitError(f"{where}: utterance {u.id!r} has a transcript of type {type(u.text).__name__} ({u.text!r:.40}); "
                               "expected text (str), or None for unlabelled audio")
        if u.sample_rate != rate:
            raise ParpkitError(f"{where}: utterance {u.id!r} is at {u.sample_rate} Hz; the backbone takes {rate} Hz "
                               "(resample it in the dataset)")
        audio = np.asarray(u.audio)
        if audio.ndim != 1:
            raise ParpkitError(f"{where}: utterance {u.id!r} has audio of shape {audio.shape}; expected mono, one dimension "
                               "of samples (mix the channels down in the dataset)")
        if not np.issubdtype(audio.dtype, np.floating):
            raise ParpkitError(f"{where}: utterance {u.id!r} has {audio.dtype} samples; expected floats in [-1, 1] (divide "
                               "int16 samples by 32768)")
        if not np.isfinite(audio).all():
            bad = int((~np.isfinite(audio)).sum())
            raise ParpkitError(f"{where}: utterance {u.id!r} has {bad} non-finite audio sample{'s' if bad != 1 else ''} "
                               f"(NaN or infinity) of {audio.size}")
        if len(audio) < shortest:  # a 1-sample clip would crash a CTC model's feature encoder mid-training
            raise ParpkitError(f"{where}: utterance {u.id} is {len(audio)} samples long; {name} needs at least "
                               f"{shortest} ({shortest / rate * 1000:g} ms) to make one output frame; remove it from the split")
        peak = float(np.abs(audio).max())
        if peak > MAX_PEAK:
            raise ParpkitError(f"{where}: utterance {u.id!r} has samples up to {peak:.4g}; expected floats in [-1, 1] (int16 "
                               "values? divide by 32768)")


def unlabelled_scored(split: str) -> str:
    """What is wrong with a scored split that has utterances without transcripts."""
    return f"split {split!r} has utterances without transcripts; an evaluation split needs them all"


def unlabelled_training(split: str, which: str = "some of the") -> str:
    """What is wrong with a training split with utterances without transcripts, in a recipe that does not distil."""
    return (f"{which} utterances of {split!r} have no transcript; unlabelled audio trains only with distillation "
            "(the teacher transcribes it): add a distillation: section")


def check_scored(utts: Sequence[Utterance], split: str, dataset: Any, normalizer: str = "basic") -> None:
    """A split that is scored: every utterance has a transcript with something left to score once normalised as
    the scores normalise it (a reference such as ``?!`` would be counted but never scored, and the model's words
    on it ignored)."""
    where = f"dataset.eval_split: split {split!r}"
    if any(u.text is None for u in utts):
        raise ParpkitError(f"dataset.eval_split: {unlabelled_scored(split)}")
    norm = text_normaliser(getattr(dataset, "unit", "words"), normalizer)
    empty = [u for u in utts if not norm(dataset.score_text(u.text))]
    if empty and len(empty) == len(utts):
        raise ParpkitError(f"{where} has nothing to score: every one of its {len(utts)} transcripts is empty once normalised")
    if empty:
        shown = ", ".join(f"{u.id!r} ({u.text!r:.30})" for u in empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise ParpkitError(f"{where}: {len(empty)} of its {len(utts)} transcripts are empty once normalised ({shown}): "
                           "they would be counted but never scored, and the model's words on them ignored; remove those "
                           "utterances or give them their words")
