"""Structured pruning: coupled groups of slices declared by backbones (no tracing), masks over whole
units (FFN neurons, attention heads), and compaction that removes pruned units from the matrices."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from parpkit.errors import ParpkitError


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


def select_units(scores: dict[str, torch.Tensor], groups: dict[str, UnitGroup], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Pruned units per group (bool, True = pruned). Global scope ranks each kind (neurons, heads) over all
    layers together; per-tensor scope prunes each group on its own. Every group keeps at least one unit."""
    pruned = {n: torch.zeros(g.units, dtype=torch.bool) for n, g in groups.items()}
    if scope == "per_tensor":
        for n, g in groups.items():
            k = min(round(sparsity * g.units), g.units - 1)
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
        target = round(sparsity * len(flat))
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


# --------------------------------------------------------------------------------------- compaction

def kept_units(model: torch.nn.Module, groups: list[UnitGroup]) -> dict[str, list[int]]:
    """Units of each group that hold any non-zero weight (a pruned unit is all zeros)."""
    params = dict(model.named_parameters())
    out = {}
    for g in groups:
        alive = torch.zeros(g.units, dtype=torch.bool)
        for m in g.members:
            t = params[m.param].detach()
            alive |= (g.unit_rows(t, m) != 0).any(dim=1)
        if not alive.any():
            alive[0] = True  # a layer needs one unit; an all-zero unit computes the same as none
        out[g.name] = alive.nonzero().flatten().tolist()
    return out


def _module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name)


def _shrink_linear(model: torch.nn.Module, module_name: str, dim: int, index: torch.Tensor) -> None:
    old = _module(model, module_name)
    w = old.weight.detach().index_select(dim, index)
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if old.bias is not None:
        new.bias.data.copy_(old.bias.detach().index_select(0, index) if dim == 0 else old.bias.detach())
    parent_name, _, attr = module_name.rpartition(".")
    setattr(_module(model, parent_name) if parent_name else model, attr, new)


def compact(model: torch.nn.Module, groups: list[UnitGroup], keep: dict[str, list[int]]) -> dict:
    """Remove pruned units in place; returns the layout (kept units per group) that rebuilds it."""
    layout = {"groups": []}
    for g in groups:
        units = keep[g.name]
        index = torch.tensor([u * g.width + j for u in units for j in range(g.width)], dtype=torch.long)
        modules = OrderedDict()
        for m in g.members:
            modules.setdefault(m.param.rsplit(".", 1)[0], m.dim)
        for module_name, dim in modules.items():
            _shrink_linear(model, module_name, dim, index)
        if g.owner is not None:
            _module(model, g.owner).num_heads = len(units)
        layout["groups"].append({**asdict(g), "members": [asdict(m) for m in g.members], "kept": units})
    return layout


def save_layout(layout: dict, directory: Path) -> None:
    (directory / "parpkit_compact.json").write_text(json.dumps(layout, indent=1))


def apply_layout(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """Shrink a freshly built full-size model to a saved compact layout (weights are loaded after)."""
    path = directory / "parpkit_compact.json"
    if not path.is_file():
        raise ParpkitError(f"{directory}: no parpkit_compact.json; not a compact export")
    layout = json.loads(path.read_text())
    groups = [UnitGroup(g["name"], g["kind"], g["units"], g["width"], tuple(Member(**m) for m in g["members"]), g.get("owner"))
              for g in layout["groups"]]
    compact(model, groups, {g["name"]: g["kept"] for g in layout["groups"]})
    return model


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


# ------------------------------------------------------------------------------- compact models

def save_compact(model: torch.nn.Module, layout: dict, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    seen: dict[int, str] = {}
    for k in list(state):  # tied weights are stored once
        ptr = state[k].data_ptr()
        if ptr in seen:
            del state[k]
        else:
            seen[ptr] = k
    save_file(state, str(directory / "model.safetensors"))
    save_layout({**layout, "model_class": type(model).__name__}, directory)


def load_compact(directory: str | Path) -> torch.nn.Module:
    """A compact export: the architecture from its config, shrunk to the saved layout, then its weights."""
    import transformers
    from safetensors.torch import load_file

    directory = Path(directory)
    layout = json.loads((directory / "parpkit_compact.json").read_text())
    config = transformers.AutoConfig.from_pretrained(directory)
    model = getattr(transformers, layout["model_class"])(config)
    apply_layout(model, directory)
    missing, unexpected = model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or any(m not in tied and not m.endswith("proj_out.weight") for m in missing):
        raise ParpkitError(f"{directory}: weights do not fit the compact layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
