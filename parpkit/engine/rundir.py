"""The run directory: what a run writes for people and other tools, and the rules for reusing one."""

from __future__ import annotations

import csv
import datetime
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Any

from parpkit.errors import ParpkitError, RunDirBusy


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so that readers see the old file or the new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class JsonlLog:
    """One JSON object per line; only the main process writes."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.start = time.time()

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        row = {"event": event, "time_s": round(time.time() - self.start, 3), **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def same_recipe(old_text: str, new_text: str) -> bool:
    """Whether two resolved recipes ask for the same run. Compared without the values that equal the
    schema's defaults, so that a parpkit release adding a recipe key (with a default) still recognises
    the run directories it wrote before."""
    if old_text == new_text:
        return True
    from parpkit.recipe import Recipe, parse_yaml

    try:
        old, new = (Recipe.model_validate(parse_yaml(t)).model_dump(mode="json", exclude_defaults=True) for t in (old_text, new_text))
    except Exception:  # a recipe.yaml this release cannot read is not this recipe
        return False
    return old == new


#: everything a run (and ``parpkit export``) writes into its directory, as glob patterns: what a fresh start
#: removes, so that no later step (resume, pseudo-labelling, export, compare-masks, report) reads an earlier
#: run's files. ``metrics.json`` first (the run no longer counts as finished), ``recipe.yaml`` last.
RUN_OUTPUTS = ("metrics.json", "metrics.json.tmp", "checkpoints", "log.jsonl", "model", "masks*.safetensors", "sparsity.csv",
               "transcripts_*.jsonl", "pseudo_labels.jsonl", "pseudo_labels.jsonl.tmp", "tensorboard", "compact",
               "compact.partial", "recipe.yaml")


class RunDir:
    """``recipe.yaml``, ``metrics.json``, ``log.jsonl``, ``sparsity.csv``, masks, transcripts, ``model/`` and
    ``checkpoints/``. One run at a time: an exclusive lock (``.lock``, naming its holder) is held while a
    run works here, and dies with its process. A directory holds one recipe: another recipe is refused
    while there is something to lose (a finished run or a checkpoint), and a finished run is not redone."""

    def __init__(self, path: Path, recipe_text: str, main: bool = True):
        self.path, self.recipe_text, self.main = Path(path), recipe_text, main
        self.checkpoints = self.path / "checkpoints"
        self.log = JsonlLog(self.path / "log.jsonl", enabled=main)
        self._lock: IO[str] | None = None

    def acquire(self) -> None:
        """Create the directory and take its lock, or say who holds it."""
        if not self.main:
            return
        if self.path.exists() and not self.path.is_dir():
            raise ParpkitError(f"{self.path}: the run directory is a file; pass --output-dir with a directory")
        if (self.path / "recipe.yaml").is_file() and not self.is_run_directory():
            raise ParpkitError(f"{self.path / 'recipe.yaml'} was not written by a parpkit run (the folder holds no run: no "
                               ".lock, log.jsonl, metrics.json or checkpoints), and a run writes its own recipe.yaml "
                               "there; pass --output-dir with a folder of its own")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / ".lock", "a+")
        except OSError as exc:
            raise ParpkitError(f"{self.path}: cannot write the run directory ({exc.strerror})") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise RunDirBusy(f"{self.path} is in use by {holder}; wait for it to end, or pass another --output-dir") from None
        lock.seek(0)
        lock.truncate()
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        lock.flush()
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def is_run_directory(self) -> bool:
        """Whether a run has used this folder (a user's own folder with a recipe.yaml in it is not one)."""
        return any((self.path / name).exists() for name in (".lock", "log.jsonl", "metrics.json", "checkpoints"))

    def complete_run(self) -> dict | None:
        """The metrics of a finished run of this same recipe, read without writing anything (no lock): a
        finished run on a read-only mount is reported complete, not refused."""
        recipe, metrics = self.path / "recipe.yaml", self.path / "metrics.json"
        try:
            if metrics.is_file() and recipe.is_file() and same_recipe(recipe.read_text(), self.recipe_text):
                return json.loads(metrics.read_text())
        except (OSError, ValueError):
            return None  # damaged or unreadable: the locked path below says what is wrong
        return None

    def finished_metrics(self) -> dict | None:
        path = self.path / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else None

    def has_results(self) -> bool:
        """A finished run or a complete checkpoint: something a different recipe would destroy."""
        return (self.path / "metrics.json").exists() or any(self.checkpoints.glob("phase-*/*/COMPLETE"))

    def claim(self, fresh: bool) -> None:
        """Make the directory this recipe's: with ``fresh`` discard what is there; otherwise refuse a
        directory that holds results of another recipe (a run that stopped before writing any, say on
        a typo, does not block its corrected re-run)."""
        recipe = self.path / "recipe.yaml"
        if not self.main:
            return
        other = recipe.exists() and not same_recipe(recipe.read_text(), self.recipe_text)
        if other and not fresh and self.has_results():
            raise ParpkitError(f"{self.path} holds a run of a different recipe; pass --fresh to start it over, or "
                               "--output-dir for a new directory")
        if fresh or other:
            self.clear()

    def clear(self) -> None:
        """Remove every output of an earlier run (``RUN_OUTPUTS``); the lock and files of others stay."""
        for pattern in RUN_OUTPUTS:
            for stale in sorted(self.path.glob(pattern)):
                if stale.is_dir() and not stale.is_symlink():
                    shutil.rmtree(stale)
                else:
                    stale.unlink(missing_ok=True)

    def write_recipe(self) -> None:
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "recipe.yaml").write_text(self.recipe_text)

    def write_sparsity(self, rows: list[dict]) -> None:
        with (self.path / "sparsity.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    def write_metrics(self, metrics: dict) -> None:
        atomic_write(self.path / "metrics.json", json.dumps(metrics, indent=2))
