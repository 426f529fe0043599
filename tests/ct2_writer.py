"""Writes a CTranslate2-format Whisper model from a transformers one: the converter's test oracle."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch


def _string(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def ct2_variables(model) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    cfg = model.config
    v: dict[str, torch.Tensor] = {}

    def ln(src, dst):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    for i in (1, 2):
        v[f"encoder/conv{i}/weight"], v[f"encoder/conv{i}/bias"] = sd[f"model.encoder.conv{i}.weight"], sd[f"model.encoder.conv{i}.bias"]
    v["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    ln("model.encoder.layer_norm", "encoder/layer_norm")
    v["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    v["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    ln("model.decoder.layer_norm", "decoder/layer_norm")
    v["encoder/num_heads"] = torch.tensor(cfg.encoder_attention_heads, dtype=torch.int32)
    v["decoder/num_heads"] = torch.tensor(cfg.decoder_attention_heads, dtype=torch.int32)
    for side, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        for i in range(n):
            s, d = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            a = f"{s}.self_attn"
            ln(f"{s}.self_attn_layer_norm", f"{d}/self_attention/layer_norm")
            v[f"{d}/self_attention/linear_0/weight"] = torch.cat([sd[f"{a}.{p}_proj.weight"] for p in "qkv"])
            v[f"{d}/self_attention/linear_0/bias"] = torch.cat([sd[f"{a}.q_proj.bias"], torch.zeros_like(sd[f"{a}.q_proj.bias"]), sd[f"{a}.v_proj.bias"]])
            v[f"{d}/self_attention/linear_1/weight"], v[f"{d}/self_attention/linear_1/bias"] = sd[f"{a}.out_proj.weight"], sd[f"{a}.out_proj.bias"]
            if side == "decoder":
                c = f"{s}.encoder_attn"
                ln(f"{s}.encoder_attn_layer_norm", f"{d}/attention/layer_norm")
                v[f"{d}/attention/linear_0/weight"], v[f"{d}/attention/linear_0/bias"] = sd[f"{c}.q_proj.weight"], sd[f"{c}.q_proj.bias"]
                v[f"{d}/attention/linear_1/weight"] = torch.cat([sd[f"{c}.k_proj.weight"], sd[f"{c}.v_proj.weight"]])
                v[f"{d}/attention/linear_1/bias"] = torch.cat([torch.zeros_like(sd[f"{c}.v_proj.bias"]), sd[f"{c}.v_proj.bias"]])
                v[f"{d}/attention/linear_2/weight"], v[f"{d}/attention/linear_2/bias"] = sd[f"{c}.out_proj.weight"], sd[f"{c}.out_proj.bias"]
            ln(f"{s}.final_layer_norm", f"{d}/ffn/layer_norm")
            for j, fc in ((0, "fc1"), (1, "fc2")):
                v[f"{d}/ffn/linear_{j}/weight"], v[f"{d}/ffn/linear_{j}/bias"] = sd[f"{s}.{fc}.weight"], sd[f"{s}.{fc}.bias"]
    return v


def write_ct2(model, directory: Path, tokenizer_json: Path) -> Path:
    """A CTranslate2 Whisper directory (float16 weights, as the real tiny.en package ships)."""
    directory.mkdir(parents=True, exist_ok=True)
    variables = ct2_variables(model)
    out = [struct.pack("<i", 6), _string("WhisperSpec"), struct.pack("<i", 3), struct.pack("<I", len(variables))]
    for name, t in variables.items():
        is_int = t.dtype == torch.int32
        arr = t.numpy().astype(np.int32 if is_int else np.float16)
        out += [_string(name), struct.pack("<B", arr.ndim), struct.pack(f"<{arr.ndim}I", *arr.shape),
                struct.pack("<B", 3 if is_int else 4), struct.pack("<I", arr.nbytes), arr.tobytes()]
    out += [struct.pack("<I", 1), _string("decoder/projection/weight"), _string("decoder/embeddings/weight")]
    (directory / "model.bin").write_bytes(b"".join(out))
    (directory / "config.json").write_text(json.dumps({"suppress_ids": [1, 2], "suppress_ids_begin": [220, 50256]}))
    (directory / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    return directory
