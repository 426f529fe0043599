"""Write a whisper model as a CTranslate2 directory that faster-whisper loads (``parpkit export RUN --format
ct2``), through CTranslate2's own converter (the optional extra ``ct2``: ctranslate2 and faster-whisper).

CTranslate2 reads each layer's widths from its weights and one head count per stack from its spec, so the
export drops every removed FFN neuron (layers may differ) and the removed heads of a stack where all its
attention modules keep the same number (scope per_tensor); other removed heads stay as zeros."""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from parpkit import ParpkitError, UnitGroup, remove_units

#: what ``--quantization`` may name (CTranslate2's weight types)
QUANTIZATIONS = ("int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16", "float32")
INSTALL = "pip install 'parpkit[ct2]' (ctranslate2 and faster-whisper)"


def _attention_modules(model: torch.nn.Module, side: str) -> list[str]:
    n = len(getattr(model.model, side).layers)
    kinds = ("self_attn", "encoder_attn") if side == "decoder" else ("self_attn",)
    return [f"model.{side}.layers.{i}.{k}" for i in range(n) for k in kinds]


def shrinkable(model: torch.nn.Module, groups: list[UnitGroup], kept: Mapping[str, list[int]]) -> tuple[list[UnitGroup], dict[str, int]]:
    """The groups a CTranslate2 spec lets the export drop units of, and the new head count of each stack
    that loses heads (config key -> heads)."""
    out = [g for g in groups if g.kind == "ffn" and len(kept[g.name]) < g.units]
    heads: dict[str, int] = {}
    by_name = {g.name: g for g in groups if g.kind == "heads"}
    for side in ("encoder", "decoder"):
        names = [f"{m}.heads" for m in _attention_modules(model, side)]
        full = getattr(model.config, f"{side}_attention_heads")
        counts = {len(kept[n]) if n in by_name else full for n in names}
        if len(counts) == 1 and (count := counts.pop()) < full:
            out += [by_name[n] for n in names]
            heads[f"{side}_attention_heads"] = count
    return out, heads


def write_ct2(model: torch.nn.Module, processor, groups: list[UnitGroup], kept: Mapping[str, list[int]], directory: Path,
              quantization: str | None, features: torch.Tensor) -> dict[str, Any]:
    """Convert ``model`` (with ``processor``'s tokenizer and feature extractor) into ``directory``;
    ``features``: a batch of log-mel features to compare the encoders on."""
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        raise ParpkitError(f"--format ct2 needs CTranslate2: {INSTALL}") from None
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ParpkitError(f"--quantization {quantization}: CTranslate2 takes {', '.join(QUANTIZATIONS)}")
    drop, heads = shrinkable(model, groups, kept)
    small = copy.deepcopy(model)
    remove_units(small, drop, {g.name: kept[g.name] for g in drop})
    for key, count in heads.items():
        setattr(small.config, key, count)
    if heads and hasattr(small.generation_config, "alignment_heads"):  # they name heads by their old numbers
        del small.generation_config.alignment_heads

    class InMemory(TransformersConverter):
        """The converter, handed the model in memory (its source folder holds only config and tokenizer)."""

        def load_model(self, model_class, model_name_or_path, **kwargs):
            return small

    source = Path(tempfile.mkdtemp(prefix="parpkit-ct2-"))
    try:
        small.config.save_pretrained(source)
        processor.save_pretrained(source)
        processor.feature_extractor.save_pretrained(source)  # preprocessor_config.json: faster-whisper reads its mel bins
        copy_files = [f for f in ("tokenizer.json", "preprocessor_config.json") if (source / f).is_file()]
        try:
            InMemory(str(source), copy_files=copy_files).convert(str(directory), quantization=quantization, force=True)
        except (ValueError, RuntimeError) as exc:
            raise ParpkitError(f"CTranslate2 could not convert the model: {exc}") from None
    finally:
        shutil.rmtree(source, ignore_errors=True)
    converted = ctranslate2.models.Whisper(str(directory), device="cpu")
    ours = np.asarray(converted.encode(ctranslate2.StorageView.from_array(features.numpy()), to_cpu=True))
    with torch.no_grad():
        reference = model.model.encoder(features).last_hidden_state.numpy()
    removed = lambda kind: sum(g.units - len(kept[g.name]) for g in drop if g.kind == kind)  # noqa: E731
    return {"removed_neurons": removed("ffn"), "neurons": sum(g.units for g in groups if g.kind == "ffn"),
            "removed_heads": removed("heads"), "heads": sum(g.units for g in groups if g.kind == "heads"),
            "zeros_kept": {"ffn": 0, "heads": sum(g.units - len(kept[g.name]) for g in groups
                                                  if g.kind == "heads" and g not in drop)},
            "parameters_before": sum(p.numel() for p in model.parameters()),
            "parameters_after": sum(p.numel() for p in small.parameters()),
            "quantization": quantization or "as saved (float32)", "config": heads,
            "max_abs_difference": float(np.abs(ours - reference).max()),
            "difference_of": "encoder outputs, CTranslate2 against the run's model"
                             + (f", weights in {quantization}" if quantization not in (None, "float32") else ""),
            "load": "faster_whisper.WhisperModel (or ctranslate2.models.Whisper)"}
