"""``parpkit export RUN_DIR --compact``: remove pruned FFN neurons and attention heads from a run's model
and write a smaller one that gives the same outputs."""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import numpy as np
import torch

from parpkit.errors import ParpkitError
from parpkit.interfaces import Utterance
from parpkit.recipe import load_recipe
from parpkit.registry import Plugins
from parpkit.resolve import resolve
from parpkit.compact import compact, kept_units, load_compact, save_compact
from parpkit.units import restrict


def export_compact(run_dir: Path, output: Path | None = None) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "model").is_dir():
        raise ParpkitError(f"{run_dir}: not a finished parpkit run (expected recipe.yaml and model/)")
    if not any((run_dir / "model" / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise ParpkitError(f"{run_dir / 'model'}: no model weights (model.safetensors); the run did not finish writing it")
    output = Path(output or run_dir / "compact")
    check_output(run_dir, output)
    recipe, _ = load_recipe(run_dir / "recipe.yaml")
    resolved = resolve(recipe, Plugins(), str(run_dir / "recipe.yaml"))
    backbone = resolved.backbone
    masked = backbone.load_saved(run_dir / "model").eval()
    groups = restrict(backbone.structured_groups(masked), set(resolved.select_pool(masked)))
    if not groups:
        raise ParpkitError(f"backbone {recipe.backbone.name!r} declares no structured groups: nothing to compact")
    keep = kept_units(masked, groups)
    removed = {kind: sum(g.units - len(keep[g.name]) for g in groups if g.kind == kind) for kind in ("ffn", "heads")}
    total = {kind: sum(g.units for g in groups if g.kind == kind) for kind in ("ffn", "heads")}
    if not any(removed.values()):
        raise ParpkitError(f"{run_dir}: no FFN neuron or attention head is wholly pruned, so a compact model would be the "
                           f"same size (criterion {recipe.pruning.criterion.name!r} prunes single weights); prune with "
                           "criterion: structured for a model that export can shrink")
    before = sum(p.numel() for p in masked.parameters())
    small = copy.deepcopy(masked)
    layout = compact(small, groups, keep)
    partial = output.with_name(output.name + ".partial")  # written aside, put in place once complete
    shutil.rmtree(partial, ignore_errors=True)
    save_compact(small, layout, partial)
    for f in (run_dir / "model").iterdir():  # tokenizer, feature extractor and generation settings as they were
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            shutil.copy2(f, partial / f.name)
    reloaded = load_compact(partial)
    diff = max_output_difference(backbone, masked, reloaded)
    if not math.isfinite(diff):  # NaN compares false with any tolerance: it would pass for "the same outputs"
        shutil.rmtree(partial, ignore_errors=True)
        raise ParpkitError(f"{run_dir}: the compact model's outputs could not be compared with the run's: their largest "
                           f"difference is {diff} (a model gives {'NaN' if math.isnan(diff) else 'infinite'} outputs; "
                           "the run's own model may hold non-finite weights); nothing was written")
    shutil.rmtree(output, ignore_errors=True)  # check_output allowed only an earlier compact export there
    partial.rename(output)
    return {"output": str(output), "parameters_before": before, "parameters_after": sum(p.numel() for p in reloaded.parameters()),
            "removed_neurons": removed["ffn"], "neurons": total["ffn"], "removed_heads": removed["heads"], "heads": total["heads"],
            "max_abs_difference": diff}


def check_output(run_dir: Path, output: Path) -> None:
    """The output may be new, empty, or an earlier compact export (replaced); never the run's own files."""
    run, out = run_dir.resolve(), output.resolve()
    if out == run or out == run / "model" or (run / "model") in out.parents:
        raise ParpkitError(f"--output {output}: that would overwrite the run's own model; choose another folder "
                           f"(default: {run_dir / 'compact'})")
    if out.exists() and not out.is_dir():
        raise ParpkitError(f"--output {output}: is a file; expected a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "parpkit_compact.json").is_file():
        raise ParpkitError(f"--output {output}: the folder holds other files; choose a new or empty folder (an earlier "
                           "compact export there is replaced)")


@torch.no_grad()
def max_output_difference(backbone, a: torch.nn.Module, b: torch.nn.Module, seconds: float = 1.5) -> float:
    """Largest difference between the two models' logits on the same (random) input batch."""
    rng = np.random.default_rng(0)
    utts = [Utterance(str(i), (rng.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32), 16000, "a test")
            for i in range(2)]
    batch = backbone.model_inputs(backbone.collate(utts))
    return float((a(**batch).logits - b(**batch).logits).abs().max())
