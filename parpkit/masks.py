"""The pruning pool, exact masks, and applying them in place.

Masks are boolean tensors (True = kept) keyed by parameter name. They are applied by zeroing weights
in place after optimizer steps: no ``weight_orig`` copies, no forward hooks.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from parpkit.errors import ParpkitError, RecipeError
from parpkit.interfaces import PruningCriterion


def select_pool(names: Iterable[str], include: list[str], exclude: list[str] = (),
                *, file: str | None = None, key: str = "pruning") -> list[str]:
    """Parameter names matched (``re.fullmatch``) by ``include`` and by no ``exclude`` pattern.

    A pattern that matches nothing is an error: a typo must not become a silent 0% sparsity.
    """
    names = list(names)
    for field, patterns in (("include", include), ("exclude", exclude)):
        for i, pattern in enumerate(patterns):
            rx = re.compile(pattern)
            if not any(rx.fullmatch(n) for n in names):
                example = ", ".join(names[:3])
                raise RecipeError(f"pattern {pattern!r} matches no parameter of the model "
                                  f"(names look like: {example}, …)", file=file, key=f"{key}.{field}[{i}]")
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    pool = [n for n in names if any(r.fullmatch(n) for r in inc) and not any(r.fullmatch(n) for r in exc)]
    if not pool:
        raise RecipeError("the pruning pool is empty: exclude removes everything include selects", file=file, key=key)
    return pool


def _lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` lowest entries of a flat tensor; ties go to the lower index."""
    prune = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return prune
    if k >= scores.numel():
        return ~prune
    threshold = torch.kthvalue(scores, k).values
    prune = scores < threshold
    need = k - int(prune.sum())
    if need > 0:
        ties = torch.nonzero(scores == threshold).flatten()[:need]
        prune[ties] = True
    return prune


def per_tensor_counts(sizes: list[int], sparsity: float) -> list[int]:
    """How many to prune in each tensor so that the total is exactly round(s·N) and each tensor gets
    floor or ceil of s·n (largest remainders first, ties to the earlier tensor)."""
    total = round(sparsity * sum(sizes))
    exact = [sparsity * n for n in sizes]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def compute_masks(scores: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks at ``sparsity`` from criterion scores; prunes exactly round(s·N) of N positions."""
    names = list(scores)
    flats = [scores[n].detach().reshape(-1).float() for n in names]
    sizes = [f.numel() for f in flats]
    if scope == "global":
        pruned = _lowest_k(torch.cat(flats), round(sparsity * sum(sizes))).split(sizes)
    elif scope == "per_tensor":
        pruned = [_lowest_k(f, k) for f, k in zip(flats, per_tensor_counts(sizes, sparsity))]
    else:
        raise ValueError(f"unknown scope {scope!r}; expected 'global' or 'per_tensor'")
    return OrderedDict((n, (~p).reshape(scores[n].shape)) for n, p in zip(names, pruned))


class Pruner:
    """Holds the pool and its current masks; schedules call it to (re-)prune and to enforce masks."""

    def __init__(self, model: torch.nn.Module, pool: list[str], criterion: PruningCriterion, scope: str):
        params = dict(model.named_parameters())
        self.params = OrderedDict((n, params[n]) for n in pool)
        self.criterion = criterion
        self.scope = scope
        self.masks: OrderedDict[str, torch.Tensor] | None = None
        self.sparsity = 0.0  # sparsity of the current masks
        self.prune_count = 0  # how many times masks were computed

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @torch.no_grad()
    def prune(self, sparsity: float) -> None:
        """Rank the whole pool now, at ``sparsity``, and zero the losers."""
        scores = {n: self.criterion.scores(n, p.detach()) for n, p in self.params.items()}
        self.set_masks(compute_masks(scores, sparsity, self.scope))
        self.sparsity = sparsity
        self.prune_count += 1

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.params if n not in masks]
        if missing:
            raise ParpkitError(f"mask set lacks {len(missing)} pool tensors, first: {missing[:3]}")
        self.masks = OrderedDict((n, masks[n].to(device=p.device, dtype=torch.bool)) for n, p in self.params.items())
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero pruned weights in place."""
        if self.masks is None:
            return
        for n, p in self.params.items():
            p.mul_(self.masks[n])

    @torch.no_grad()
    def zero_pruned_grads(self) -> None:
        if self.masks is None:
            return
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[n])

    # ----------------------------------------------------------------------------- measurements
    @torch.no_grad()
    def zero_fraction(self) -> float:
        """Fraction of pool weights that are exactly zero now (whatever the masks say)."""
        zeros = sum(int((p == 0).sum()) for p in self.params.values())
        return zeros / self.size

    def per_tensor_rows(self) -> list[dict]:
        rows = []
        for n, p in self.params.items():
            zeros = int((p.detach() == 0).sum())
            rows.append({"name": n, "shape": "x".join(map(str, p.shape)), "numel": p.numel(),
                         "zeros": zeros, "sparsity": round(zeros / p.numel(), 6)})
        return rows

    def save_masks(self, path: Path) -> None:
        if self.masks is None:
            raise ParpkitError("no masks to save: the schedule never pruned")
        save_file({n: m.detach().cpu().contiguous() for n, m in self.masks.items()}, str(path),
                  metadata={"sparsity": str(self.sparsity), "scope": self.scope})


@torch.no_grad()
def model_zero_fraction(model: torch.nn.Module) -> float:
    total = zeros = 0
    for p in model.parameters():
        total += p.numel()
        zeros += int((p == 0).sum())
    return zeros / total


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
