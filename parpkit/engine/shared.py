"""Work shared by the runs of a sweep, done once: the dense model's evaluation, and fine-tuning phases
that several recipes run identically (the dense fine-tune OMP and IMP start from, IMP's early rounds).

An entry is a folder named by a digest of everything that determines it (the key, kept beside it as
``key.json``), written under a temporary name and renamed when complete. A lock file per entry makes a
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def digest(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


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
