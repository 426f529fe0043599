"""``parpkit export RUN_DIR``: a run's model in the form that fits where it is used.

- ``transformers``: a plain transformers folder with the removed FFN neurons gone from the matrices and the
  new widths in its config (``encoder_ffn_dim`` …), where every layer of a stack keeps the same width
  (structured pruning at scope ``per_tensor``); loads with ``from_pretrained``, no parpkit needed.
- ``compact``: every removed neuron and head gone, whatever the widths; loads with ``parpkit.load_compact``.
- ``sparse``: unstructured sparsity stored as bitmasks and kept values (``parpkit.sparse``); loads back
  bit for bit with ``parpkit.load_sparse``.
- formats a backbone writes itself (``Backbone.export_formats``: whisper's ``ct2`` for faster-whisper).

Without a format, the smallest one the run allows: ``transformers`` where it drops every removed unit,
else ``compact`` for structured runs, ``sparse`` for unstructured ones. Every export is written aside,
checked against the run's model, and put in place only then.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parpkit.compact import kept_units, load_compact, remove_units, save_compact
from parpkit.errors import ParpkitError, RecipeError
from parpkit.interfaces import Backbone, StructuredCriterion, Utterance
from parpkit.recipe import load_recipe
from parpkit.registry import Plugins
from parpkit.resolve import resolve
from parpkit.units import UnitGroup, restrict

#: parpkit's own formats (a backbone may add more: ``Backbone.export_formats``)
FORMATS = {
    "transformers": "plain transformers folder, removed FFN neurons dropped where every layer keeps the same width",
    "compact": "every removed FFN neuron and attention head dropped; loads with parpkit.load_compact",
    "sparse": "weights as bitmask + kept values (bit-exact); loads with parpkit.load_sparse",
}
#: written into every export folder: what it is (and the mark that lets a later export replace it)
MARKER = "parpkit_export.json"


@dataclass
class OpenRun:
    """A finished run's model as its backbone loads it, with the units its pruning removed."""

    run_dir: Path
    backbone: Backbone
    masked: torch.nn.Module
    structured: bool     # the recipe's criterion prunes whole units
    groups: list[UnitGroup]  # the structured groups inside the run's pool
    keep: dict[str, list[int]]  # units left in each of ``groups``
    all_groups: list[UnitGroup]  # every structured group of the model

    def removed(self, kind: str) -> int:
        return sum(g.units - len(self.keep[g.name]) for g in self.groups if g.kind == kind)

    def total(self, kind: str) -> int:
        return sum(g.units for g in self.groups if g.kind == kind)

    def widths(self) -> dict[str, int]:
        """Units left in every structured group of the model (all of them outside the pool)."""
        return {g.name: len(self.keep[g.name]) if g.name in self.keep else g.units for g in self.all_groups}


def open_run(run_dir: Path) -> OpenRun:
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "model").is_dir():
        raise ParpkitError(f"{run_dir}: not a finished parpkit run (expected recipe.yaml and model/)")
    if not any((run_dir / "model" / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise ParpkitError(f"{run_dir / 'model'}: no model weights (model.safetensors); the run did not finish writing it")
    recipe, _ = load_recipe(run_dir / "recipe.yaml")
    try:
        resolved = resolve(recipe, Plugins(), str(run_dir / "recipe.yaml"))
    except RecipeError as exc:
        # the mask is found: exporting needs the criterion's kind, not its options, and a run made by an older
        # parpkit may hold options that were since moved or renamed (wanda's and sparsegpt's calibration_batches)
        if exc.key != "pruning.criterion.options":
            raise
        stripped = recipe.model_copy(update={"pruning": recipe.pruning.model_copy(update={
            "criterion": recipe.pruning.criterion.model_copy(update={"options": {}})})})
        try:
            resolved = resolve(stripped, Plugins(), str(run_dir / "recipe.yaml"))
        except RecipeError:
            raise exc from None
    backbone = resolved.backbone
    masked = backbone.load_saved(run_dir / "model").eval()
    all_groups = backbone.structured_groups(masked)
    groups = restrict(all_groups, set(resolved.select_pool(masked)))
    return OpenRun(run_dir, backbone, masked, isinstance(resolved.criterion, StructuredCriterion), groups,
                   kept_units(masked, groups) if groups else {}, all_groups)


def formats(backbone: Backbone) -> dict[str, str]:
    return {**FORMATS, **backbone.export_formats()}


def choose_format(run: OpenRun) -> str:
    """The smallest form the run allows, that loads with the least: see the module's docstring."""
    if run.structured and (run.removed("ffn") or run.removed("heads")):
        _, shrink = run.backbone.plain_widths(run.masked, run.widths())
        dropped = {g.name for g in run.groups if len(run.keep[g.name]) < g.units}
        return "transformers" if dropped <= set(shrink) else "compact"
    if any(bool((p == 0).any()) for p in run.masked.parameters()):
        return "sparse"
    raise ParpkitError(f"{run.run_dir}: the model has no pruned weights, so nothing smaller can be written: "
                       f"{run.run_dir / 'model'} already is a plain transformers folder"
                       + (f"; other formats: --format {', '.join(run.backbone.export_formats())}"
                          if run.backbone.export_formats() else ""))


def export(run_dir: Path, fmt: str | None = None, output: Path | None = None, quantization: str | None = None) -> dict:
    """Write the run's model in format ``fmt`` (None: ``choose_format``) to ``output`` (default
    RUN_DIR/<format>); returns what was written and the checks made on it."""
    run = open_run(run_dir)
    known = formats(run.backbone)
    if fmt is not None and fmt not in known:
        raise ParpkitError(f"--format {fmt}: unknown for backbone {run.backbone.name!r}; formats: {', '.join(known)}")
    chosen = fmt or choose_format(run)
    if quantization is not None and chosen in FORMATS:
        raise ParpkitError(f"--quantization applies to formats a backbone writes ({', '.join(run.backbone.export_formats()) or 'none here'}), "
                           f"not to {chosen}")
    output = Path(output or run.run_dir / chosen)
    check_output(run.run_dir, output)
    partial = output.with_name(output.name + ".partial")  # written aside, put in place once complete and checked
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if chosen == "transformers":
            facts = _write_transformers(run, partial)
        elif chosen == "compact":
            facts = _write_compact(run, partial)
        elif chosen == "sparse":
            facts = _write_sparse(run, partial)
        else:
            partial.mkdir(parents=True)
            facts = run.backbone.export(chosen, run.masked, run.groups, run.keep, partial, quantization=quantization)
        diff = facts.get("max_abs_difference")
        if diff is not None and not math.isfinite(diff):  # NaN compares false with any tolerance
            raise ParpkitError(f"{run.run_dir}: the {chosen} model's outputs could not be compared with the run's: their "
                               f"largest difference is {diff} (a model gives {'NaN' if math.isnan(diff) else 'infinite'} "
                               "outputs; the run's own model may hold non-finite weights); nothing was written")
        report = {"format": chosen, "output": str(output), "chosen": fmt is None, "run": str(run.run_dir),
                  "description": known[chosen], **facts}
        (partial / MARKER).write_text(json.dumps(report, indent=1))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(output, ignore_errors=True)  # check_output allowed only an earlier export there
    partial.rename(output)
    return report


def _sizes(run: OpenRun, model: torch.nn.Module) -> dict[str, Any]:
    return {"parameters_before": sum(p.numel() for p in run.masked.parameters()),
            "parameters_after": sum(p.numel() for p in model.parameters())}


def _copy_run_files(run: OpenRun, directory: Path, skip: tuple[str, ...]) -> None:
    """Tokenizer, feature extractor and generation settings as the run saved them."""
    for f in (run.run_dir / "model").iterdir():
        if f.is_file() and f.name not in skip and not (directory / f.name).exists():
            shutil.copy2(f, directory / f.name)


def _write_transformers(run: OpenRun, directory: Path) -> dict[str, Any]:
    updates, shrink = run.backbone.plain_widths(run.masked, run.widths())
    dropped = [g for g in run.groups if len(run.keep[g.name]) < g.units]
    shrunk = [g for g in dropped if g.name in set(shrink)]
    if not shrunk:
        same = (f"so a plain transformers model would be the same size as {run.run_dir / 'model'} (already plain "
                "transformers, pruned weights as zeros)")
        if not dropped:
            raise ParpkitError(f"{run.run_dir}: no FFN neuron or attention head is wholly pruned, {same}; prune with "
                               "criterion: structured at scope per_tensor for a model this export shrinks, or write "
                               "--format sparse")
        raise ParpkitError(f"{run.run_dir}: the removed units cannot leave a plain transformers config ({_why_not_plain(dropped)}), "
                           f"{same}; --format compact drops every removed unit (loads with parpkit.load_compact)")
    small = copy.deepcopy(run.masked)
    remove_units(small, shrunk, {g.name: run.keep[g.name] for g in shrunk})
    for key, value in updates.items():
        setattr(small.config, key, value)
    small.save_pretrained(directory)
    _copy_run_files(run, directory, skip=("model.safetensors", "pytorch_model.bin", "config.json"))
    reloaded = type(run.masked).from_pretrained(directory).eval()
    left = [g for g in dropped if g.name not in set(shrink)]
    return {**_sizes(run, reloaded), "config": updates,
            "removed_neurons": sum(g.units - len(run.keep[g.name]) for g in shrunk if g.kind == "ffn"),
            "neurons": run.total("ffn"), "removed_heads": sum(g.units - len(run.keep[g.name]) for g in shrunk if g.kind == "heads"),
            "heads": run.total("heads"),
            "zeros_kept": {kind: sum(g.units - len(run.keep[g.name]) for g in left if g.kind == kind) for kind in ("ffn", "heads")},
            "max_abs_difference": max_output_difference(run.backbone, run.masked, reloaded),
            "load": f"transformers.{type(run.masked).__name__}.from_pretrained"}


def _why_not_plain(dropped: list[UnitGroup]) -> str:
    kinds = {g.kind for g in dropped}
    parts = []
    if "heads" in kinds:
        parts.append("removed attention heads (this model's config ties the head size to the head count)")
    if "ffn" in kinds:
        parts.append("FFN layers that keep different widths (prune at scope per_tensor for equal ones)")
    return " and ".join(parts)


def _write_compact(run: OpenRun, directory: Path) -> dict[str, Any]:
    if not run.groups:
        raise ParpkitError(f"backbone {run.backbone.name!r} declares no structured groups: nothing to compact")
    if not (run.removed("ffn") or run.removed("heads")):
        raise ParpkitError(f"{run.run_dir}: no FFN neuron or attention head is wholly pruned, so a compact model would be the "
                           "same size (the run's criterion prunes single weights); prune with criterion: structured for a "
                           "model that export can shrink, or write --format sparse")
    small = copy.deepcopy(run.masked)
    layout = remove_units(small, run.groups, run.keep)
    save_compact(small, layout, directory)
    _copy_run_files(run, directory, skip=("model.safetensors", "pytorch_model.bin", "config.json"))
    reloaded = load_compact(directory)
    return {**_sizes(run, reloaded), "removed_neurons": run.removed("ffn"), "neurons": run.total("ffn"),
            "removed_heads": run.removed("heads"), "heads": run.total("heads"),
            "max_abs_difference": max_output_difference(run.backbone, run.masked, reloaded), "load": "parpkit.load_compact"}


def _write_sparse(run: OpenRun, directory: Path) -> dict[str, Any]:
    from parpkit.sparse import WEIGHTS, read_sparse, save_sparse

    state, seen = {}, set()
    for name, t in run.masked.state_dict().items():  # tied weights are stored once, as save_pretrained does
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            state[name] = t
    directory.mkdir(parents=True)
    counts = save_sparse(state, directory / WEIGHTS, metadata={"model_class": type(run.masked).__name__})
    _copy_run_files(run, directory, skip=("model.safetensors", "pytorch_model.bin"))
    back = read_sparse(directory / WEIGHTS)
    differ = [n for n, t in state.items() if n not in back or not _same_bits(back[n], t)]
    if differ or set(back) != set(state):
        raise ParpkitError(f"{directory / WEIGHTS}: does not read back as written ({(differ or sorted(set(back) ^ set(state)))[0]}); "
                           "nothing was written")
    dense = run.run_dir / "model" / "model.safetensors"
    return {**counts, "bytes": (directory / WEIGHTS).stat().st_size,
            "dense_bytes": dense.stat().st_size if dense.is_file() else None, "bit_exact": True,
            "load": "parpkit.load_sparse"}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    b = b.detach().cpu().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a.reshape(-1).view(torch.uint8),
                                                                          b.reshape(-1).view(torch.uint8)))


def check_output(run_dir: Path, output: Path) -> None:
    """The output may be new, empty, or an earlier export (replaced); never the run's own files."""
    run, out = run_dir.resolve(), output.resolve()
    if out == run or out == run / "model" or (run / "model") in out.parents:
        raise ParpkitError(f"--output-dir {output}: that would overwrite the run's own model; choose another folder "
                           f"(default: {run_dir}/<format>)")
    if out.exists() and not out.is_dir():
        raise ParpkitError(f"--output-dir {output}: is a file; expected a folder")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).is_file() for m in (MARKER, "parpkit_compact.json")):
        raise ParpkitError(f"--output-dir {output}: the folder holds other files; choose a new or empty folder (an earlier "
                           "parpkit export there is replaced)")


@torch.no_grad()
def max_output_difference(backbone, a: torch.nn.Module, b: torch.nn.Module, seconds: float = 1.5) -> float:
    """Largest difference between the two models' logits on the same (random) input batch."""
    rng = np.random.default_rng(0)
    utts = [Utterance(str(i), (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32), 16000, "a test")
            for i in range(2)]
    batch = backbone.model_inputs(backbone.collate(utts))
    return float((a(**batch).logits - b(**batch).logits).abs().max())

