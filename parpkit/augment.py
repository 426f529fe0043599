"""Training-audio augmentation (``dataset.augment``): audiomentations transforms applied to each training
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


class AugmentedDataset(torch.utils.data.Dataset):
    """The training utterances, each augmented as served; the Trainer's dataloader calls ``set_epoch`` before
    every epoch (resumed ones included), which is all the draws depend on besides the seed and the id."""

    def __init__(self, items: Sequence[Utterance], spec: Sequence[Mapping[str, Any]], seed: int):
        self.items, self.seed, self.epoch = items, seed, 0
        self.compose = build(spec)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Utterance:
        return augment(self.compose, self.items[i], self.seed, self.epoch)
