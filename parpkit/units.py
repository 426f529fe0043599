"""Units for structured pruning: coupled groups of slices that backbones declare (no tracing), and the
selection of whole units (FFN neurons, attention heads) at a sparsity, as masks over their members."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Member:
    param: str  # parameter name
    dim: int    # the dimension that indexes units (0: output rows, 1: input columns)


@dataclass(frozen=True)
class UnitGroup:
    """``units`` units of ``width`` consecutive indices along each member's ``dim``.

    FFN neuron j of a layer: row j of fc1 (and its bias), column j of fc2 (width 1).
    Attention head h: rows h·d…(h+1)·d of q/k/v (and biases), the same columns of the output projection.
    """

    name: str
    kind: str       # "ffn" or "heads"
    units: int
    width: int
    members: tuple[Member, ...]
    #: module owning the head count (attention), whose ``num_heads`` compaction updates
    owner: str | None = None

    def unit_rows(self, tensor: torch.Tensor, member: Member) -> torch.Tensor:
        """``tensor`` as one row per unit (everything of ``member`` that belongs to that unit)."""
        return tensor.movedim(member.dim, 0).reshape(self.units, -1)


def restrict(groups: list[UnitGroup], pool: set[str]) -> list[UnitGroup]:
    """Groups whose members are all in the pool (a partly excluded group cannot be pruned as a unit)."""
    return [g for g in groups if all(m.param in pool for m in g.members)]


def unit_count(sparsity: float, units: int) -> int:
    """Units to prune of ``units`` at ``sparsity``: rounded down (never above the target), with a margin for
    products such as 0.29 * 100 = 28.999999999999996."""
    return math.floor(sparsity * units + 1e-9)


def select_units(scores: dict[str, torch.Tensor], groups: dict[str, UnitGroup], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Pruned units per group (bool, True = pruned). Global scope ranks each kind (neurons, heads) over all
    layers together; per-tensor scope prunes each group on its own. Every group keeps at least one unit.
    Counts round down (``unit_count``): no kind loses more than ``sparsity`` of its units, so the pool's
    weight sparsity never exceeds the target (units of a kind are all the same size, and weights outside
    every unit are never pruned)."""
    pruned = {n: torch.zeros(g.units, dtype=torch.bool) for n, g in groups.items()}
    if scope == "per_tensor":
        for n, g in groups.items():
            k = min(unit_count(sparsity, g.units), g.units - 1)
            if k > 0:
                pruned[n][torch.argsort(scores[n].float(), stable=True)[:k]] = True
        return pruned
    for kind in sorted({g.kind for g in groups.values()}):
        names = [n for n, g in groups.items() if g.kind == kind]
        flat = torch.cat([scores[n].float() for n in names])
        owner = torch.cat([torch.full((groups[n].units,), i) for i, n in enumerate(names)])
        offsets = [0]
        for n in names:
            offsets.append(offsets[-1] + groups[n].units)
        target = unit_count(sparsity, len(flat))
        left = [groups[n].units for n in names]
        done = 0
        for idx in torch.argsort(flat, stable=True).tolist():
            if done == target:
                break
            i = int(owner[idx])
            if left[i] > 1:
                pruned[names[i]][idx - offsets[i]] = True
                left[i] -= 1
                done += 1
    return pruned


def unit_masks(pruned: dict[str, torch.Tensor], groups: dict[str, UnitGroup], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Keep-masks of the member tensors for the pruned units."""
    masks: dict[str, torch.Tensor] = {}
    for n, g in groups.items():
        keep_idx = (~pruned[n]).repeat_interleave(g.width)
        for m in g.members:
            mask = masks.setdefault(m.param, torch.ones(shapes[m.param], dtype=torch.bool))
            view = [1] * len(shapes[m.param])
            view[m.dim] = -1
            mask &= keep_idx.view(view).expand(shapes[m.param])
    return masks


# ------------------------------------------------------------------------------- declaring groups

def ffn_group(model: torch.nn.Module, name: str, up: str, down: str) -> UnitGroup:
    """Neurons of a feed-forward block: rows of ``up`` (and its bias), columns of ``down``."""
    params = dict(model.named_parameters())
    members = [Member(f"{up}.weight", 0)]
    if f"{up}.bias" in params:
        members.append(Member(f"{up}.bias", 0))
    members.append(Member(f"{down}.weight", 1))
    return UnitGroup(name, "ffn", params[f"{up}.weight"].shape[0], 1, tuple(members))


def head_group(model: torch.nn.Module, attention: str, q: str = "q_proj", k: str = "k_proj", v: str = "v_proj",
               out: str = "out_proj") -> UnitGroup:
    """Heads of an attention module: their rows of q/k/v (and biases), their columns of ``out``."""
    params = dict(model.named_parameters())
    module = model.get_submodule(attention)
    members = []
    for proj in (q, k, v):
        members.append(Member(f"{attention}.{proj}.weight", 0))
        if f"{attention}.{proj}.bias" in params:
            members.append(Member(f"{attention}.{proj}.bias", 0))
    members.append(Member(f"{attention}.{out}.weight", 1))
    return UnitGroup(f"{attention}.heads", "heads", module.num_heads, module.head_dim, tuple(members), owner=attention)
