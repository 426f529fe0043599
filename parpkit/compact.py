"""Compaction: remove pruned units (FFN neurons, attention heads) from the matrices, save the smaller
model with its layout, and rebuild it from a saved layout."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from parpkit.errors import ParpkitError
from parpkit.units import Member, UnitGroup


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


def remove_units(model: torch.nn.Module, groups: list[UnitGroup], keep: Mapping[str, list[int]]) -> dict:
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
    remove_units(model, groups, {g["name"]: g["kept"] for g in layout["groups"]})
    return model


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
