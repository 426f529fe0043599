"""Checkpoints: parpkit's state beside the Trainer's, counted only once complete.

A checkpoint directory holds the Trainer's files plus ``parpkit_state.json`` (JSON values of the pruner,
schedule and criterion ``state_dict``s, the stages evaluated so far, the phase and step offset, the wall
time so far) and
``parpkit_tensors.safetensors`` (their tensors). The ``COMPLETE`` marker is written last: a directory
without it (a process killed while saving) is never used. It holds the sha256 of every other file, so a
file damaged after it was written (truncated, or overwritten in place) makes the checkpoint unusable
(``problem``), never resumed. Phase ends are kept the same way, with the model's weights, because the next
phase starts from them after the schedule acted.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from parpkit.engine.rundir import atomic_write
from parpkit.plugin_checks import check_state

MARKER = "COMPLETE"


def split_tensors(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """A nested state with every tensor replaced by ``{"__tensor__": key}``, and the tensors by key."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = node.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": key}
        if isinstance(node, Mapping):
            return {str(k): walk(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v) for v in node]
        return node

    return walk(tree), tensors


def join_tensors(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of ``split_tensors``."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    return tree


def read_state(directory: Path) -> dict:
    """A checkpoint's ``parpkit_state.json`` with its tensors in place (``["pruner"]["masks"]``: the masks in
    force when it was written)."""
    meta = json.loads((directory / "parpkit_state.json").read_text())
    return join_tensors(meta, load_file(str(directory / "parpkit_tensors.safetensors")))


def is_complete(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def checkpoints(phase_dir: Path) -> list[Path]:
    """The Trainer's ``checkpoint-N`` folders of a phase, oldest first."""
    found = [p for p in phase_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-[0-9]+", p.name)]  # not isdigit: "²"
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def rotate(phase_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older and incomplete ones before them."""
    ckpts = checkpoints(phase_dir)
    complete = [p for p in ckpts if is_complete(p)]
    if len(complete) <= keep:
        return
    cutoff = int(complete[-keep].name.split("-")[-1])
    for p in ckpts:
        if int(p.name.split("-")[-1]) < cutoff:
            shutil.rmtree(p, ignore_errors=True)


def extra_defaults() -> dict[str, Any]:
    """What a run keeps beside the stages, before anything happened: the learning curve, the best validation
    checkpoint, the phases taken from other runs, and each phase's training loss so far (``loss``: phase name ->
    ``{"sum": sum of the updates' mean losses, "updates": updates counted}``, so that a resumed run's mean covers
    the updates of every sitting)."""
    return {"curve": [], "best": None, "shared_phases": [], "loss": {}}


class RunState:
    """What a checkpoint adds to the Trainer's: the ``state_dict`` of pruner, schedule and criterion,
    the stages evaluated so far, the run's own record (``extra``: learning curve, best checkpoint), the
    phase and the step offset."""

    def __init__(self, pruner, schedule, criterion, stages: dict, extra: dict | None = None,
                 clock: Callable[[], dict] | None = None):
        self.pruner, self.schedule, self.criterion, self.stages = pruner, schedule, criterion, stages
        self.extra = extra if extra is not None else {}
        self.clock = clock  # the run's wall time so far, kept so that a resumed run can count it

    def write(self, directory: Path, *, phase: int, offset: int, weights: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MARKER).unlink(missing_ok=True)
        tree, tensors = split_tensors({"pruner": self.pruner.state_dict(), **self.plugin_states(), "extra": self.extra})
        save_file(tensors, str(directory / "parpkit_tensors.safetensors"))
        if weights:
            state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.pruner.model.state_dict().items()}
            save_file(state, str(directory / "weights.safetensors"))
        elapsed = {} if self.clock is None else {"elapsed": self.clock()}
        (directory / "parpkit_state.json").write_text(json.dumps({"phase": phase, "offset": offset, "stages": self.stages,
                                                                  **elapsed, **tree}))
        # last: a checkpoint without it is never used; the checksums catch damage done after it was written
        atomic_write(directory / MARKER, json.dumps({"sha256": checksums(directory)}, indent=1) + "\n")

    def plugin_states(self) -> dict[str, Any]:
        """The schedule's and criterion's ``state_dict``, refused (naming the plugin and the key) unless a
        checkpoint can hold them; the engine also calls this when a run begins, before any training."""
        states = {"schedule": self.schedule.state_dict(), "criterion": self.criterion.state_dict()}
        for kind, state in states.items():
            check_state(state, f"{kind} {getattr(self, kind).name!r}")
        return states

    def read(self, directory: Path) -> dict:
        meta = read_state(directory)
        self.pruner.load_state_dict(meta["pruner"])
        self.schedule.load_state_dict(meta["schedule"])
        self.criterion.load_state_dict(meta["criterion"])
        self.stages.clear()
        self.stages.update(meta["stages"])
        self.extra.clear()  # checkpoints of older parpkit releases have no (or less) extra: the defaults fill in
        self.extra.update({**extra_defaults(), **(meta.get("extra") or {})})
        if (directory / "weights.safetensors").exists():
            self.pruner.model.load_state_dict(load_file(str(directory / "weights.safetensors")))
        return meta


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def checksums(directory: Path) -> dict[str, str]:
    """The sha256 of every file in a checkpoint directory (its subfolders included), by relative path."""
    return {p.relative_to(directory).as_posix(): sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MARKER and not p.name.endswith(".tmp")}


def problem(directory: Path) -> str | None:
    """Why a complete checkpoint cannot be used (a file damaged or missing since), or None. Compares every
    file with the checksum its ``COMPLETE`` marker holds (bytes overwritten in place, not only truncation);
    for markers written before parpkit kept checksums, reads the JSON files, the safetensors headers (which
    also catch truncation) and the zip directories of torch files."""
    import zipfile

    from safetensors import safe_open

    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        marker = None  # "ok": a marker without checksums (older parpkit)
    if isinstance(marker, dict) and isinstance(marker.get("sha256"), dict):
        for name, digest in marker["sha256"].items():
            if not (directory / name).is_file():
                return f"{name} is missing"
            if sha256(directory / name) != digest:
                return f"{name} does not match the checksum written when it was complete"
    elif (directory / MARKER).read_bytes().strip() != b"ok":
        return f"{MARKER} is damaged"
    needed = ["parpkit_state.json", "parpkit_tensors.safetensors"]
    needed += ["weights.safetensors"] if directory.name == "end" else ["trainer_state.json", "model.safetensors"]
    for name in needed:
        if not (directory / name).is_file():
            return f"{name} is missing"
    try:
        for name in ("parpkit_state.json", "trainer_state.json"):
            if (directory / name).is_file():
                json.loads((directory / name).read_text())
        for path in directory.glob("*.safetensors"):
            with safe_open(str(path), "pt"):
                pass
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
            if (directory / name).is_file():
                with zipfile.ZipFile(directory / name) as z:
                    z.namelist()
    except Exception as exc:  # json, safetensors and zipfile each raise their own kinds
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'damaged'}"
    return None


def find_resume_point(root: Path, n_phases: int) -> tuple[int, Path | None, Path | None, list[str]]:
    """(first phase to train, its Trainer checkpoint to resume or None, the phase end to restore or
    None, notes on damaged checkpoints passed over). The most advanced usable one wins: a checkpoint in
    phase i, else the end of phase i-1 (the start of phase i), and so on back."""
    notes: list[str] = []
    for i in reversed(range(n_phases)):
        candidates = [(c, None) for c in reversed(checkpoints(root / f"phase-{i}")) if is_complete(c)]
        if i > 0 and is_complete(root / f"phase-{i - 1}" / "end"):
            candidates.append((None, root / f"phase-{i - 1}" / "end"))
        for ckpt, end in candidates:
            why = problem(ckpt or end)
            if why is None:
                return i, ckpt, end, notes
            notes.append(f"{ckpt or end} is damaged ({why})")
    return 0, None, None, notes


def resume_state(run_dir: Path, n_phases: int) -> str:
    """Where a started run of ``n_phases`` phases (its recipe's) would resume, in words, for a sweep's list of
    points: ``resumes at update N of M`` (the newest usable checkpoint, as ``find_resume_point`` picks it for the
    run; its phase where there are several), or ``starts over`` where none is usable yet. Raises OSError where
    the checkpoints cannot be read."""
    first, ckpt, end, notes = find_resume_point(Path(run_dir) / "checkpoints", n_phases)
    damaged = f" ({len(notes)} damaged checkpoint{'s' if len(notes) > 1 else ''} passed over)" if notes else ""
    phase = f" of phase {first + 1}" if n_phases > 1 else ""
    if ckpt is not None:
        try:
            trainer = json.loads((ckpt / "trainer_state.json").read_text())
            step, total = trainer["global_step"], trainer["max_steps"]
        except (ValueError, KeyError, TypeError):  # problem() read it: only a file changed since can fail
            step = total = None
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (step, total)):
            return f"resumes at update {step} of {total}{phase}{damaged}"
        return f"resumes from {ckpt.relative_to(run_dir)}{damaged}"
    if end is not None:
        return f"resumes at the start{phase}{damaged}"
    return f"starts over: no checkpoint yet{damaged}"
