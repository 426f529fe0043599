"""The engine's checks of what plugins hand it, in one place: scores, sparsities, phases, checkpoint state.

A plugin bug must not become a silently wrong run (NaN scores prune nothing while the log says 0.5) nor a
traceback deep in torch that names no plugin. Each check names the plugin, the tensor or value, what was
expected, and what to do.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

import torch

from parpkit.errors import ParpkitError
from parpkit.interfaces import Phase
from parpkit.selection import as_rows, per_tensor_counts, row_count


#: calibration batches are collated once and kept in memory for the whole run: more than this is a typo (the
#: reference SparseGPT and Wanda calibrate on 128 sequences), not a setting (10⁹ took 5 GB in two minutes)
MAX_CALIBRATION_BATCHES = 512


def check_calibration_batches(criterion: Any) -> None:
    """A criterion's ``calibration_batches``: a whole number from 0 to ``MAX_CALIBRATION_BATCHES``."""
    n = getattr(criterion, "calibration_batches", 0)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_CALIBRATION_BATCHES:
        raise ParpkitError(f"criterion {criterion.name!r}: calibration_batches is {n!r}; expected a whole number from 0 to "
                           f"{MAX_CALIBRATION_BATCHES} (the batches are collated once and kept in memory)")


_COUNT = re.compile(r"(layers|heads|dim|size|positions|embeddings)$")


def check_config_counts(backbone: str, config: Any) -> None:
    """Sizes and counts of a model's (transformers) config that built a model but not the one meant: a negative
    count builds nothing (``encoder_layers: -1`` made a whisper without an encoder: ``range(-1)`` is empty), and a
    model without layers has nothing to prune or learn."""
    if config is None or not hasattr(config, "to_dict"):
        return
    for key, value in config.to_dict().items():
        if isinstance(value, bool) or not isinstance(value, int) or not _COUNT.search(key):
            continue
        if value < 0 or (value == 0 and key.endswith(("layers", "heads"))):
            raise ParpkitError(f"{backbone}: the config cannot build a model: {key} is {value}; expected a positive count "
                               "(it would build a model without those parts, silently)")


def check_sparsity(sparsity: Any, who: str, what: str = "sparsity") -> float:
    """A sparsity a plugin asks for: a finite number in [0, 1) (1.0 would prune every weight)."""
    if isinstance(sparsity, torch.Tensor) and sparsity.numel() == 1:
        sparsity = sparsity.item()
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not math.isfinite(sparsity) \
            or not 0 <= sparsity < 1:
        raise ParpkitError(f"{who} asked for {what} {sparsity!r}; a sparsity is a number in [0, 1) (the share of the "
                           "pool's weights pruned)")
    return float(sparsity)


def check_leaves_weights(shapes: dict[str, Sequence[int]], sparsity: float, scope: str, who: str) -> None:
    """Refuse a sparsity that, by the exact counts the selection takes, prunes every weight of the pool (global)
    or of one tensor (per_tensor, per_row): 0.9999999 rounds to all of a pool under ten million weights. ``who``
    (may be empty) begins the message."""
    sizes = [math.prod(s) for s in shapes.values()]
    total = sum(sizes)
    who = f"{who}: " if who else ""
    if scope == "global":
        if total and round(sparsity * total) >= total:
            raise ParpkitError(f"{who}sparsity {sparsity!r} prunes every one of the pool's {total:,} weights "
                               f"(round(s·N) = N); use at most {(total - 1) / total:.6g}")
        return
    if scope == "per_tensor":
        counts = per_tensor_counts(sizes, sparsity)
    else:
        counts = [as_rows(s)[0] * row_count(s, sparsity) for s in shapes.values()]
    for (name, shape), count, size in zip(shapes.items(), counts, sizes, strict=True):
        if size and count >= size:
            rows, cols = as_rows(shape)
            how = f"each of its {rows} rows loses all {cols} weights" if scope == "per_row" else f"all {size} of its weights"
            raise ParpkitError(f"{who}sparsity {sparsity!r} in scope {scope} prunes every weight of {name} ({how}); use a "
                               "lower sparsity")


def check_scores(scores: Any, param: torch.Tensor, criterion: str, name: str, expected: tuple[int, ...] | None = None
                 ) -> torch.Tensor:
    """A criterion's scores for pool tensor ``name``: a tensor of the expected shape (the parameter's, or one
    per unit) with values (not the meta device). Finiteness is checked by ``nonfinite_count`` so that the
    selection needs no host synchronisation per tensor."""
    shape = tuple(param.shape) if expected is None else expected
    if not isinstance(scores, torch.Tensor):
        raise ParpkitError(f"criterion {criterion!r} returned a {type(scores).__name__} as the scores of {name}; expected "
                           f"a tensor of shape {shape}")
    if tuple(scores.shape) != shape:
        raise ParpkitError(f"criterion {criterion!r} returned scores of shape {tuple(scores.shape)} for {name}; expected "
                           f"{shape}, one score per {'weight' if expected is None else 'unit'} (a 0-d tensor would be "
                           "broadcast: every weight the same score)")
    if scores.device.type == "meta":
        raise ParpkitError(f"criterion {criterion!r} returned scores on the meta device (no values) for {name}; compute "
                           "them from the live parameter (param.detach())")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ParpkitError(f"criterion {criterion!r} returned {scores.dtype} scores for {name}; expected real numbers")
    return scores


def nonfinite_count(scores: torch.Tensor) -> torch.Tensor:
    """How many scores are NaN or infinite, as a 0-d tensor on their device (no host synchronisation)."""
    return (~torch.isfinite(scores)).sum()


def refuse_nonfinite(counts: dict[str, torch.Tensor], sizes: dict[str, int], criterion: str) -> None:
    """One host synchronisation for all the tensors of a prune: NaN or infinite scores would rank arbitrarily
    (all-NaN scores pruned no weight at all while the log said the target)."""
    if not counts:
        return
    device = next(iter(counts.values())).device
    values = torch.stack([c.to(device) for c in counts.values()]).tolist()  # one host synchronisation
    bad = [(n, v) for n, v in zip(counts, values, strict=True) if v]
    if bad:
        listed = "; ".join(f"{n}: {v:,} of {sizes[n]:,}" for n, v in bad[:3]) + (f"; and {len(bad) - 3} more tensors" if len(bad) > 3 else "")
        raise ParpkitError(f"criterion {criterion!r} returned non-finite scores (NaN or infinity) for {len(bad)} pool "
                           f"tensor{'s' if len(bad) > 1 else ''} ({listed}): a ranking of them would be arbitrary; "
                           "nothing was pruned")


def check_phases(phases: Any, schedule: str) -> list[Phase]:
    """A schedule's ``phases()``: a non-empty list of ``Phase`` with distinct names and whole steps >= 0 (an empty
    list trained nothing and exited 0; a phase of -5 steps failed deep inside the Trainer)."""
    if not isinstance(phases, (list, tuple)) or not phases:
        raise ParpkitError(f"schedule {schedule!r}: phases() returned {phases!r}; expected a non-empty list of "
                           "parpkit.Phase (the default is one phase of training.max_steps steps)")
    names: set[str] = set()
    for i, p in enumerate(phases):
        if not isinstance(p, Phase):
            raise ParpkitError(f"schedule {schedule!r}: phases()[{i}] is a {type(p).__name__}; expected parpkit.Phase")
        if isinstance(p.steps, bool) or not isinstance(p.steps, int) or p.steps < 0:
            raise ParpkitError(f"schedule {schedule!r}: phase {p.name!r} has {p.steps!r} steps; expected a whole number "
                               "of optimizer steps, 0 or more")
        if not isinstance(p.name, str) or not p.name or p.name in names:
            raise ParpkitError(f"schedule {schedule!r}: phase name {p.name!r} is empty, not text or given twice; "
                               "checkpoints and logs know phases by name")
        names.add(p.name)
    return list(phases)


def check_state(state: Any, plugin: str) -> None:
    """A plugin's ``state_dict()`` is what a checkpoint can hold: mappings with text keys, lists, JSON values and
    tensors. Checked when the run begins, not first found at the first checkpoint."""

    def walk(node: Any, where: str) -> None:
        if isinstance(node, torch.Tensor):
            return
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise ParpkitError(f"{plugin}: state_dict() has the key {k!r} at {where or 'the top'}; checkpoints "
                                       "keep text keys only")
                walk(v, f"{where}.{k}" if where else k)
            return
        if isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
            return
        try:
            json.dumps(node)
        except (TypeError, ValueError):
            raise ParpkitError(f"{plugin}: state_dict() holds {type(node).__name__} {node!r:.60} at {where or 'the top'}; a "
                               "checkpoint keeps JSON values (numbers, text, lists, mappings) and tensors only") from None

    walk(state, "")
