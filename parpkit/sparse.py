"""Sparse weights on disk: a safetensors file in which every tensor that holds enough zeros is stored as a
bitmask (one bit per element, packed) and the values it keeps, in flat order; every other tensor as it is.

Reading it back gives the same tensors bit for bit: zeros are dropped, and where some of them are -0.0
(a negative weight multiplied by a mask of 0) their signs are stored too. A tensor is stored sparse only
where that is smaller than dense (a large fp32 tensor from about 3% zeros on). The layout, for readers
without parpkit (``docs/how-to/export.md`` has a plain-torch reader):

- header metadata ``parpkit_sparse``: JSON ``{"format": "parpkit-bitmask/1", "sparse": {name: shape}}``;
- for each sparse tensor ``name``: ``name.bitmask`` (uint8; ``numpy.packbits(keep, bitorder="little")`` of
  the flattened keep-mask, keep = not zero) and ``name.values`` (the kept elements, in flat order, in the
  tensor's dtype); where any dropped zero is -0.0, ``name.signs`` (the same packing of the dropped
  elements' sign bits, in flat order);
- every other tensor under its own name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from parpkit.errors import ModelFormatError

FORMAT = "parpkit-bitmask/1"
#: the weights file of a sparse export (beside the model's config.json, tokenizer and processor files)
WEIGHTS = "sparse.safetensors"
_PARTS = ("bitmask", "values", "signs")


def save_sparse(state: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> dict:
    """Write ``state`` to ``path``; returns the counts: tensors stored sparse, elements kept and dropped."""
    from safetensors.torch import save_file

    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    kept = dropped = 0
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        if t.is_floating_point() and t.numel() > 0:
            flat = t.reshape(-1)
            keep = flat != 0  # NaN is kept
            n = int(keep.sum())
            signs = torch.signbit(flat[~keep])
            size = n * t.element_size() + math.ceil(t.numel() / 8) + (math.ceil(signs.numel() / 8) if signs.any() else 0)
            # the sparse form costs the kept values, the bits, and more entries in the file's JSON header
            if size + 2 * len(name) + 128 < t.numel() * t.element_size():
                out[f"{name}.bitmask"] = torch.from_numpy(np.packbits(keep.numpy(), bitorder="little"))
                out[f"{name}.values"] = flat[keep].clone()
                if signs.any():
                    out[f"{name}.signs"] = torch.from_numpy(np.packbits(signs.numpy(), bitorder="little"))
                shapes[name] = list(t.shape)
                kept, dropped = kept + n, dropped + t.numel() - n
                continue
        out[name] = t
    clash = [n for n in shapes if any(f"{n}.{part}" in state for part in _PARTS)]
    if clash:  # a model whose own names end so cannot be told apart from the encoding
        raise ValueError(f"cannot store {clash[0]} sparse: the state has a tensor named {clash[0]}.bitmask, .values or .signs")
    header = {**(metadata or {}), "parpkit_sparse": json.dumps({"format": FORMAT, "sparse": shapes}), "format": "pt"}
    save_file(out, str(path), metadata=header)
    return {"sparse_tensors": len(shapes), "kept": kept, "dropped": dropped}


def read_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """The state ``save_sparse`` wrote, every tensor dense again (bit for bit what was saved)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as exc:  # FileNotFoundError, SafetensorError for damaged files
        raise ModelFormatError(f"{path}: cannot read it as safetensors ({type(exc).__name__}: {exc})") from None
    with f:
        layout = json.loads((f.metadata() or {}).get("parpkit_sparse", "null") or "null")
        if not isinstance(layout, dict) or layout.get("format") != FORMAT:
            raise ModelFormatError(f"{path}: not a parpkit sparse file (no {FORMAT} layout in its header)")
        sparse = layout["sparse"]
        keys = set(f.keys())
        encoded = {f"{n}.{part}" for n in sparse for part in _PARTS}
        out = {k: f.get_tensor(k) for k in keys if k not in encoded}
        for name, shape in sparse.items():
            values = f.get_tensor(f"{name}.values")
            count = math.prod(shape)
            keep = torch.from_numpy(_unpack(f.get_tensor(f"{name}.bitmask"), count))
            if int(keep.sum()) != values.numel():
                raise ModelFormatError(f"{path}: {name}: the bitmask keeps {int(keep.sum())} elements but "
                                       f"{values.numel()} values are stored")
            dense = torch.zeros(count, dtype=values.dtype)
            dense[keep] = values
            if f"{name}.signs" in keys:  # the zeros that were -0.0
                zeros = torch.zeros(count - values.numel(), dtype=values.dtype)
                zeros[torch.from_numpy(_unpack(f.get_tensor(f"{name}.signs"), zeros.numel()))] = -0.0
                dense[~keep] = zeros
            out[name] = dense.reshape(shape)
    return out


def _unpack(bits: torch.Tensor, count: int) -> np.ndarray:
    return np.unpackbits(bits.numpy(), count=count, bitorder="little").astype(bool)


def load_sparse(directory: str | Path) -> torch.nn.Module:
    """A sparse export (``parpkit export RUN --format sparse``) as the transformers model it was: the
    architecture from its config.json, every weight from ``sparse.safetensors``, bit for bit."""
    import transformers

    directory = Path(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise ModelFormatError(f"{directory / 'config.json'}: names no transformers model class in `architectures` "
                               f"({architectures}); load the weights with parpkit.read_sparse and build the model yourself")
    return cls.from_pretrained(None, config=config, state_dict=read_sparse(directory / WEIGHTS)).eval()
