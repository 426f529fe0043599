"""Training-audio augmentation (``dataset.augment``, and ``dataset.concatenate``'s joined passages): audiomentations transforms applied to each training
utterance as it is served, the draws a function of the recipe's seed, the utterance and the epoch, so a run
resumed from a checkpoint hears what an uninterrupted one would. Scored splits, calibration and the
teacher's pseudo-labels use the audio as it is; only fine-tuning batches are augmented.

The transforms are audiomentations' own (``pip install 'parpkit[augment]'``), named by class with their
keyword arguments, each with its probability ``p``::

    dataset:
      augment:
        - {name: AddGaussianSNR, min_snr_db: 10, max_snr_db: 30, p: 0.5}
        - {name: RoomSimulator, leave_length_unchanged: true, p: 0.3}
        - {name: LowPassFilter, min_cutoff_freq: 2000, max_cutoff_freq: 7000, p: 0.3}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from parpkit.errors import ParpkitError
from parpkit.interfaces import AUGMENTED, Utterance

#: the sample rate of the probe each transform is tried on when built
PROBE_RATE = 16000


def _library():
    try:
        import audiomentations
    except ImportError:
        raise ParpkitError("dataset.augment needs audiomentations: pip install 'parpkit[augment]'") from None
    return audiomentations


def build(spec: Sequence[Mapping[str, Any]]):
    """An audiomentations ``Compose`` of the recipe's transforms, in order; a name audiomentations lacks, or
    arguments its transform refuses, are an error naming the entry."""
    lib = _library()
    transforms = []
    for i, entry in enumerate(spec):
        entry = dict(entry)
        name = entry.pop("name", None)
        cls = getattr(lib, name, None) if isinstance(name, str) else None
        if not (isinstance(cls, type) and issubclass(cls, lib.core.transforms_interface.BaseTransform)):
            known = sorted(n for n, c in vars(lib).items() if isinstance(c, type)
                           and issubclass(c, lib.core.transforms_interface.BaseTransform) and not n.startswith("Base"))
            raise ParpkitError(f"dataset.augment[{i}]: {name!r} is not an audiomentations transform; some are: "
                               f"{', '.join(known[:12])} …")
        try:
            transform = cls(**entry)
            # once on a probe, whatever its p: what fails only when applied (an optional dependency missing, such
            # as RoomSimulator's pyroomacoustics) fails here, at validate, and not hours into training
            probe = np.random.default_rng(0).standard_normal(PROBE_RATE // 2).astype(np.float32) * 0.1
            chance, transform.p = transform.p, 1.0
            try:
                with _seeded(0):
                    transform.randomize_parameters(probe, PROBE_RATE)
                    transform.apply(probe, PROBE_RATE)
            finally:
                transform.p = chance
        except Exception as exc:  # the library's own checks (TypeError, ValueError, AssertionError, ImportError …)
            raise ParpkitError(f"dataset.augment[{i}] ({name}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        transforms.append(transform)
    return lib.Compose(transforms, p=1.0)


def draw_seed(seed: int, utterance_id: str, epoch: int) -> int:
    """The draw of one utterance in one epoch: stable across processes, ranks and resumed attempts."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{utterance_id}\0{epoch}".encode()).digest()[:4], "little")


@contextlib.contextmanager
def _seeded(seed: int):
    """audiomentations draws from ``random`` and ``np.random``: seed both, and give the caller's states back."""
    py, npy = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def augment(compose, utterance: Utterance, seed: int, epoch: int) -> Utterance:
    """``utterance`` as heard in ``epoch``: float32 audio of the same rate, marked ``AUGMENTED``."""
    with _seeded(draw_seed(seed, utterance.id, epoch)):
        audio = compose(samples=np.asarray(utterance.audio, dtype=np.float32), sample_rate=utterance.sample_rate)
    audio = np.nan_to_num(np.asarray(audio, dtype=np.float32))
    peak = float(np.abs(audio).max(initial=0.0))
    if peak > 1.0:  # reverberation or gain can push past full scale: scale down, as a recording level would, not clip
        audio = audio / peak
    return dataclasses.replace(utterance, audio=audio, extra={**utterance.extra, AUGMENTED: True})


#: utterances a passage may be joined from, drawn from its speaker's (or, without speakers, the split's)
CANDIDATES = 64


class Concatenator:
    """``dataset.concatenate``: serves a share of the training utterances joined to further ones (of the same
    speaker where known, in a drawn order, a drawn silence between them) into a passage of up to
    ``max_seconds``, its transcript the pieces' joined by spaces. Which utterances, and how long each passage
    grows (a goal drawn between half of ``max_seconds`` and all of it), follow the seed, the utterance and
    the epoch. Unlabelled utterances (no transcript) are served as they are and never joined; an utterance
    already as long as its drawn goal, or one with nothing short enough to join, is served alone, so the share
    of passages is at most ``p``."""

    def __init__(self, items: Sequence[Utterance], options: Any, seed: int):
        self.items, self.options, self.seed = items, options, seed
        self.by_speaker: dict[Any, list[int]] = {}
        for i, u in enumerate(items):
            if u.text is not None:
                self.by_speaker.setdefault(u.speaker if options.same_speaker else None, []).append(i)

    def __call__(self, i: int, epoch: int) -> Utterance:
        first, o = self.items[i], self.options
        rng = random.Random(draw_seed(self.seed, f"concatenate\0{first.id}", epoch))
        if first.text is None or rng.random() >= o.p:
            return first
        rate, limit = first.sample_rate, o.max_seconds * first.sample_rate
        goal = rng.uniform(limit / 2, limit)
        pool = self.by_speaker.get(first.speaker if o.same_speaker else None, [])
        pool = [j for j in rng.sample(pool, min(len(pool), CANDIDATES)) if j != i]  # a bounded draw, in random order
        pieces, texts, ids = [np.asarray(first.audio, dtype=np.float32)], [first.text], [first.id]
        total = len(pieces[0])
        for j in pool:
            if total >= goal:
                break
            u = self.items[j]
            gap = int(rng.uniform(*o.gap_seconds) * rate)
            if u.sample_rate != rate or total + gap + len(u.audio) > limit:
                continue
            pieces += [np.zeros(gap, dtype=np.float32), np.asarray(u.audio, dtype=np.float32)]
            texts.append(u.text)
            ids.append(u.id)
            total += gap + len(u.audio)
        if len(ids) == 1:
            return first
        return dataclasses.replace(first, audio=np.concatenate(pieces), text=" ".join(t.strip() for t in texts),
                                   extra={**first.extra, AUGMENTED: True, "concatenated": ids})


def joins_any(items: Sequence[Utterance], options: Any) -> bool:
    """Whether ``dataset.concatenate`` can join any passage at all: two labelled utterances (of one speaker,
    where ``same_speaker``; at one sample rate) that fit ``max_seconds`` with the shortest gap between them."""
    shortest: dict[Any, list[float]] = {}
    for u in items:
        if u.text is None:
            continue
        key = (u.speaker if options.same_speaker else None, u.sample_rate)
        shortest[key] = sorted([*shortest.get(key, []), len(u.audio) / u.sample_rate])[:2]
    return any(len(two) == 2 and sum(two) + options.gap_seconds[0] <= options.max_seconds for two in shortest.values())


class AugmentedDataset(torch.utils.data.Dataset):
    """The training utterances, each joined to others (``concatenate``, if given) and augmented (``spec``) as
    served; the Trainer's dataloader calls ``set_epoch`` before every epoch (resumed ones included), which is
    all the draws depend on besides the seed and the id."""

    def __init__(self, items: Sequence[Utterance], spec: Sequence[Mapping[str, Any]], seed: int, concatenate: Any = None):
        self.items, self.seed, self.epoch = items, seed, 0
        self.compose = build(spec) if spec else None
        self.concatenate = Concatenator(items, concatenate, seed) if concatenate is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Utterance:
        u = self.concatenate(i, self.epoch) if self.concatenate is not None else self.items[i]
        return augment(self.compose, u, self.seed, self.epoch) if self.compose is not None else u
