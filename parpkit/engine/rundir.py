"""The run directory: what a run writes for people and other tools, and the rules for reusing one."""

from __future__ import annotations

import csv
import datetime
import fcntl
import json
import io
import os
import re
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
    the run directories it wrote before, without the training settings that change no number
    (``recipe.BOOKKEEPING``), so that a run resumes with checkpoints written more often, and without ``vars``
    (substituted where they are used), so that a grid's points keep when a variable only later arms use is set."""
    if old_text == new_text:
        return True
    from parpkit.recipe import BOOKKEEPING, Recipe, parse_yaml

    def settings(text: str) -> dict:
        dump = Recipe.model_validate(parse_yaml(text)).model_dump(mode="json", exclude_defaults=True)
        dump["training"] = {k: v for k, v in dump.get("training", {}).items() if k not in BOOKKEEPING}
        dump.pop("vars", None)  # already substituted where used: a variable no key uses changes nothing
        return dump

    try:
        old, new = settings(old_text), settings(new_text)
    except Exception:  # a recipe.yaml this release cannot read is not this recipe
        return False
    return old == new


#: everything a run (and ``parpkit export``) writes into its directory, as glob patterns: what a fresh start
#: removes, so that no later step (resume, pseudo-labelling, export, compare-masks, report) reads an earlier
#: run's files. ``metrics.json`` first (the run no longer counts as finished), ``recipe.yaml`` last.
RUN_OUTPUTS = ("metrics.json", "metrics.json.tmp", "checkpoints", "log.jsonl", "model", "masks*.safetensors", "sparsity.csv",
               "transcripts_*.jsonl", "pseudo_labels.jsonl", "pseudo_labels.jsonl.tmp", "tensorboard", "compact",
               "compact.partial", "recipe.yaml")


#: the folder ``RunDir.clear`` moves a run's outputs into before deleting them
CLEARING = ".parpkit-clearing"

_LOCK_LINE = re.compile(r"pid \d+ on .*, started ")
_EVENT_LINE = re.compile(r'\{"event": "')


def _strings(node: Any, key: str = "") -> list[tuple[str, str]]:
    """Every string value of a recipe mapping with its dotted key (not ``name``, ``output_dir`` or ``sweep``)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() if not (not key and k in ("name", "output_dir", "sweep"))
                for s in _strings(v, f"{key}.{k}" if key else str(k))]
    if isinstance(node, list):
        return [s for i, v in enumerate(node) for s in _strings(v, f"{key}[{i}]")]
    return [(key, node)] if isinstance(node, str) else []


def lock_holder(path: Path) -> str | None:
    """Who is working in a run directory now: its ``.lock`` line (``pid 3368 on vm, started …``) while a process
    holds the lock, else None (no lock file, one that is not a regular file, or its holder is gone). Reads
    without keeping the lock: it takes a shared lock for an instant (a run starting in that instant tries again:
    ``RunDir.acquire``)."""
    lock_path = Path(path) / ".lock"
    try:
        if not lock_path.is_file():  # a FIFO would block the open; a folder cannot be locked
            return None
        fd = os.open(lock_path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    with open(fd, errors="replace") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return lock.read(1000).strip() or "another process"
            except OSError:
                return "another process"
        except OSError:
            return None
        fcntl.flock(lock, fcntl.LOCK_UN)
    return None


def last_logged_update(path: Path) -> int | None:
    """The update of the newest ``train`` event in a run directory's ``log.jsonl`` (read from its last 64 KiB),
    or None where there is none or the log cannot be read: how far a running point has got."""
    try:
        with open(Path(path) / "log.jsonl", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if '"train"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "train" and type(event.get("step")) is int:
            return event["step"]
    return None


LOCK_TRIES = 5  # tries 0.1 s apart before a run directory counts as in use


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
        foreign = self.foreign_outputs()
        if self.path / "recipe.yaml" in foreign:
            raise ParpkitError(f"{self.path / 'recipe.yaml'} was not written by a parpkit run (the folder holds no run: no "
                               ".lock, log.jsonl, metrics.json or checkpoints of one), and a run writes its own recipe.yaml "
                               "there; pass --output-dir with a folder of its own")
        if foreign:
            shown = ", ".join(str(f.relative_to(self.path)) for f in foreign[:3]) + (" …" if len(foreign) > 3 else "")
            raise ParpkitError(f"{self.path} is not a parpkit run directory (no run wrote there: no .lock, log.jsonl, "
                               f"metrics.json or checkpoints/phase-* of one), and it holds files a run writes or removes "
                               f"({shown}); they are not a run's to overwrite or delete, with --fresh or without: pass "
                               "--output-dir with a folder of its own")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / ".lock", "a+")
        except OSError as exc:
            raise ParpkitError(f"{self.path}: cannot write the run directory ({exc.strerror})") from None
        for attempt in range(LOCK_TRIES):  # a sweep's list (lock_holder) may hold a shared lock for an instant
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt < LOCK_TRIES - 1:
                    time.sleep(0.1)
        else:
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
        """Whether a run has used this folder, judged by what only a run writes: its lock naming a process, its
        log of events, a metrics.json beside a recipe.yaml, or checkpoints/phase-N (a user's own folder with
        a recipe.yaml, a model/ or a checkpoints/ of its own is not one)."""
        p = self.path
        try:
            lock = (p / ".lock").read_text(errors="replace") if (p / ".lock").is_file() else ""
            with (p / "log.jsonl").open(errors="replace") if (p / "log.jsonl").is_file() else io.StringIO() as f:
                first = f.readline()
        except OSError:
            return False
        return bool(_LOCK_LINE.match(lock) or _EVENT_LINE.match(first)
                    or ((p / "metrics.json").is_file() and (p / "recipe.yaml").is_file())
                    or any(c.is_dir() for c in p.glob("checkpoints/phase-*")))

    def foreign_outputs(self) -> list[Path]:
        """Files with the names a run writes (``RUN_OUTPUTS``) in a folder that is not a run directory: a run
        would overwrite or remove them, and they are not a run's (empty when the folder is a run directory)."""
        if not self.path.is_dir() or self.is_run_directory():
            return []
        found = [p for pattern in RUN_OUTPUTS for p in sorted(self.path.glob(pattern))]
        return [f for p in found for f in ([p] if not p.is_dir() else sorted(x for x in p.rglob("*") if not x.is_dir()) or [p])]

    def complete_run(self) -> dict | None:
        """The metrics of a finished run of this same recipe, read without writing anything (no lock): a
        finished run on a read-only mount is reported complete, not refused."""
        recipe, metrics = self.path / "recipe.yaml", self.path / "metrics.json"
        if (self.path / CLEARING).exists():
            return None  # being cleared (or left half cleared): the locked path finishes that
        try:
            if metrics.is_file() and recipe.is_file() and same_recipe(recipe.read_text(), self.recipe_text):
                return json.loads(metrics.read_text())
        except (OSError, ValueError):
            return None  # damaged or unreadable: the locked path below says what is wrong
        return None

    def finished_metrics(self) -> dict | None:
        """The metrics.json of a finished run here, or None; a damaged one (truncated, not a mapping) is an error
        naming it, not a traceback: what to do with it is the user's call."""
        path = self.path / "metrics.json"
        if not path.exists():
            return None
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            metrics = exc
        if not isinstance(metrics, dict):
            why = f"{type(metrics).__name__}: {metrics}" if isinstance(metrics, Exception) else f"a {type(metrics).__name__}"
            raise ParpkitError(f"{path} is damaged ({why}); the run there finished but its metrics cannot be read: pass "
                               "--fresh to run it again, or --output-dir for another folder")
        return metrics

    def has_results(self) -> bool:
        """A finished run or a complete checkpoint: something a different recipe would destroy."""
        return (self.path / "metrics.json").exists() or any(self.checkpoints.glob("phase-*/*/COMPLETE"))

    def claim(self, fresh: bool) -> None:
        """Make the directory this recipe's: with ``fresh`` discard what is there; otherwise refuse a
        directory that holds results of another recipe (a run that stopped before writing any, say on
        a typo, does not block its corrected re-run). Nothing is removed that the recipe reads (a
        ``mask_from`` or a teacher inside the directory), and a clearing an earlier process began and did
        not end is finished first."""
        recipe = self.path / "recipe.yaml"
        if not self.main:
            return
        other = recipe.exists() and not same_recipe(recipe.read_text(), self.recipe_text)
        if other and not fresh and self.has_results():
            raise ParpkitError(f"{self.path} holds a run of a different recipe; pass --fresh to start it over, or "
                               "--output-dir for a new directory")
        if fresh or other or (self.path / CLEARING).exists():
            self.refuse_reading_what_is_cleared()
            self.clear()

    def outputs(self) -> list[Path]:
        """What ``clear`` removes: every file and folder here matching ``RUN_OUTPUTS``."""
        return [p for pattern in RUN_OUTPUTS for p in sorted(self.path.glob(pattern))]

    def refuse_reading_what_is_cleared(self) -> None:
        """The recipe reads nothing that clearing would remove: a ``pruning.mask_from`` of this directory or a
        ``distillation.teacher: <this directory>/model`` would be deleted first and then found missing."""
        import yaml

        doomed = [p.resolve() for p in self.outputs()]
        here = self.path.resolve()
        for key, value in _strings(yaml.safe_load(self.recipe_text) or {}):
            target = Path(value).expanduser()
            if not value.strip() or not target.exists():
                continue
            target = target.resolve()
            if target == here or any(target == d or d in target.parents for d in doomed):
                raise ParpkitError(f"{key}: {value!r} lies in the run directory {self.path}, whose outputs this run would "
                                   "remove before it starts (--fresh, or another recipe): nothing was removed. Copy it "
                                   "elsewhere and point the recipe there, or pass --output-dir with another folder")

    def clear(self) -> None:
        """Remove every output of an earlier run (``RUN_OUTPUTS``; the lock and files of others stay), all or
        nothing: each is first moved into ``.parpkit-clearing`` (renames, instant), metrics.json first, then
        that folder is deleted. A process killed meanwhile leaves the folder behind, and the next run here
        finishes the clearing (``claim``) before it reads anything."""
        trash = self.path / CLEARING
        trash.mkdir(exist_ok=True)
        for i, stale in enumerate(self.outputs()):
            os.replace(stale, trash / f"{os.getpid()}-{i}-{stale.name}")
        shutil.rmtree(trash)

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
