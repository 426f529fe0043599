"""Work shared by the runs of a sweep, done once: the dense model's evaluation, and fine-tuning phases
that several recipes run identically (the dense fine-tune OMP and IMP start from, IMP's early rounds).

An entry is a folder named by a digest of everything that determines it (the key, kept beside it as
``key.json``: recipe settings, parpkit's version, and the contents the run read: digests of every loaded
split and of the pretrained weights, so that editing a manifest's transcripts or a model's files in place
makes a new entry), written under a temporary name and renamed when complete. A lock file per entry makes a
second process wait for the first instead of computing the same thing; the lock dies with its process.
Sharing never changes a result: a run that finds an entry gets exactly what it would have computed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


def digest(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def utterances_digest(utterances: Iterable[Any]) -> str:
    """The sha256 of a loaded split as the engine sees it, in order: each utterance's id, transcript,
    speaker, sample rate and audio samples. A key holding it changes when a file the dataset reads does."""
    h = hashlib.sha256()
    for u in utterances:
        audio = np.ascontiguousarray(u.audio)
        h.update(json.dumps([u.id, u.text, u.speaker, u.sample_rate, str(audio.dtype), list(audio.shape)]).encode())
        h.update(memoryview(audio).cast("B"))
    return h.hexdigest()


def tensors_digest(state: Mapping[str, torch.Tensor]) -> str:
    """The sha256 of a state dict's names, dtypes, shapes and values (a model's weights as loaded)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class Entry:
    """One shared result: ``path`` exists (and is complete) once ``done``."""

    def __init__(self, path: Path, key: Any):
        self.path, self.key = path, key

    @property
    def done(self) -> bool:
        return (self.path / "key.json").is_file()

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A temporary folder to fill; renamed to the entry when the block ends without an error."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.path.parent))
        try:
            yield tmp
            (tmp / "key.json").write_text(json.dumps(self.key, indent=1, sort_keys=True, default=str))
            shutil.rmtree(self.path, ignore_errors=True)
            tmp.rename(self.path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class SharedWork:
    """The shared folder of a sweep (``None``: nothing is shared)."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None

    @contextlib.contextmanager
    def hold(self, kind: str, key: Any | None) -> Iterator[Entry | None]:
        """The entry for ``key``, locked for the block (``None`` when sharing is off or ``key`` is None)."""
        if self.root is None or key is None:
            yield None
            return
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"{kind}-{digest(key)}"
        with open(self.root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield Entry(self.root / name, key)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
