"""What one-shot Wanda and SparseGPT cost against one forward pass over the same calibration set.

A random-initialised whisper of tiny.en's shape (d_model 384, 4 encoder and 4 decoder layers, 6 heads, FFN
1536, vocabulary 51,864: nothing to download), its pool the weight matrices of every attention projection
and feed-forward linear (64 tensors), a calibration set of random log-mel inputs and label sequences of
varying length (padded, as collated batches are). In one process, on the same data:

- ``forward``: the model over the calibration set once (no gradients, no key/value cache), as ``model(**batch)``;
- ``wanda`` (per_row) and ``sparsegpt`` (per_tensor): one prune at ``--sparsity`` through the engine's pruner,
  the weights reset between them, with each ``pruning.calibration.sequential`` (``--by``). Each is split by
  the run context's timers into ``passes`` (the model's and the blocks' forward passes: recording each block's
  inputs, running it watched, and with ``block`` running it again pruned) and ``matrix`` (the observers: sums
  of squares, XᵀX; and the criterion's work: masks, SparseGPT's updates).

The forward pass is timed before and between the methods; the median is the yardstick (the machine's load
moves). The target of issue 30: each method at most 1.5 × the forward pass plus its matrix work, i.e.
``passes`` at most 1.5 × ``forward``. ``block`` (the references' walk) runs every block twice, once watched
and once pruned for the next block's inputs; ``layer`` runs it once. Neither reruns the conv front end or
the output projection, so what they cost against one forward depends on how much of it the blocks are.

    python benchmarks/calibration_cost.py [--utterances 16] [--batch-size 8] [--window-s 30] [--tokens 32]
                                          [--sparsity 0.5] [--by block,layer] [--threads N] [--clock wall|cpu]
                                          [--device cpu|cuda] [--json out.json]

On a machine other jobs share, ``--threads 1 --clock cpu`` (the process's CPU time) gives steady ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parpkit.context import CalibrationBatch, RunContext, TrainingSettings  # noqa: E402
from parpkit.masks import PoolPruner  # noqa: E402
from parpkit_plugins.activation_criteria import SparseGPT, Wanda  # noqa: E402
from parpkit_plugins.backbones.whisper import WhisperBackbone, WhisperOptions  # noqa: E402

#: whisper tiny.en's shape
TINY_EN = {"d_model": 384, "encoder_layers": 4, "decoder_layers": 4, "encoder_attention_heads": 6,
           "decoder_attention_heads": 6, "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536, "vocab_size": 51864,
           "num_mel_bins": 80, "max_target_positions": 448, "decoder_start_token_id": 50257, "pad_token_id": 50256,
           "eos_token_id": 50256, "bos_token_id": 50256}


def model_of(window_s: float, device: str, seed: int = 0) -> torch.nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(**TINY_EN, max_source_positions=round(window_s * 50))
    return WhisperForConditionalGeneration(config).eval().to(device)


def calibration_set(utterances: int, batch_size: int, window_s: float, tokens: int, seed: int = 0) -> list[CalibrationBatch]:
    """Random log-mel windows and label sequences of tokens // 2 .. tokens (the rest padding, -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, utterances, batch_size):
        n = min(batch_size, utterances - start)
        features = torch.randn(n, 80, round(window_s * 100), generator=g)
        labels = torch.randint(0, 50000, (n, tokens), generator=g)
        lengths = torch.randint(tokens // 2, tokens + 1, (n,), generator=g)
        labels[torch.arange(tokens)[None, :] >= lengths[:, None]] = -100
        out.append(CalibrationBatch({"input_features": features, "labels": labels}))
    return out


def pool_of(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".layers." in n and n.endswith("weight")
            and any(f".{k}." in n for k in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def forward_pass(model: torch.nn.Module, data: list[CalibrationBatch], device: str, clock) -> float:
    sync(device)
    t0 = clock()
    for batch in data:
        model(**{k: v.to(device) for k, v in batch.inputs.items()}, use_cache=False)
    sync(device)
    return clock() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--utterances", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window-s", type=float, default=30.0, help="the encoder's window (tiny.en's own: 30 s)")
    p.add_argument("--tokens", type=int, default=32, help="the longest label sequence")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--by", default="block,layer", help="pruning.calibration.sequential values to time")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the process's CPU time (all threads), steadier than wall time on a shared machine")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = model_of(args.window_s, args.device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = calibration_set(args.utterances, args.batch_size, args.window_s, args.tokens)
    pool = pool_of(model)
    with tempfile.TemporaryDirectory() as cache:  # the backbone's own real positions (nothing is loaded)
        backbone = WhisperBackbone(WhisperOptions(config=dict(TINY_EN), tokenizer="unused"), cache_dir=Path(cache))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    forward_pass(model, data[:1], args.device, clock)  # warm-up
    forwards = [forward_pass(model, data, args.device, clock)]
    rows: dict[str, dict] = {}
    for by in args.by.split(","):
        for name, make, scope in (("wanda", Wanda, "per_row"), ("sparsegpt", SparseGPT, "per_tensor")):
            model.load_state_dict(state)
            context = RunContext(model, pool, training=TrainingSettings(max_steps=0, batch_size=args.batch_size),
                                 scope=scope, sparsity=args.sparsity, calibration=data, positions=backbone.position_mask,
                                 warn=lambda _: None, sequential=by, clock=clock)
            pruner = PoolPruner(model, pool, make(), scope, context=context)
            sync(args.device)
            t0 = clock()
            pruner.prune(args.sparsity)
            sync(args.device)
            total = clock() - t0
            rows[f"{name} ({by})"] = {"seconds": total, "passes": context.timings["forward"],
                                      "matrix": context.timings["observe"] + context.timings["after_block"],
                                      "pool_zero_fraction": round(pruner.zero_fraction(), 4)}
            model.load_state_dict(state)
            forwards.append(forward_pass(model, data, args.device, clock))  # between the methods: the machine as it was then
    forward = sorted(forwards)[len(forwards) // 2]
    for r in rows.values():
        r.update({"ratio": round(r["seconds"] / forward, 2), "passes_ratio": round(r["passes"] / forward, 2),
                  "target_met": r["passes"] <= 1.5 * forward})
        r.update({k: round(r[k], 3) for k in ("seconds", "passes", "matrix")})
    out = {"device": args.device, "threads": torch.get_num_threads(), "clock": args.clock, "utterances": args.utterances,
           "batch_size": args.batch_size, "window_s": args.window_s, "tokens": args.tokens, "pool_tensors": len(pool),
           "forward_seconds": [round(f, 3) for f in forwards], "results": rows}
    print(f"whisper of tiny.en's shape, {len(pool)} pool tensors, {args.utterances} utterances of {args.window_s:g} s "
          f"(labels up to {args.tokens} tokens), batch {args.batch_size}, {args.device}, {torch.get_num_threads()} threads, {args.clock} clock")
    print(f"forward pass over the set: median {forward:.2f} s of {len(forwards)} ({', '.join(f'{f:.2f}' for f in forwards)})")
    print(f"{'':20} {'seconds':>8} {'x fwd':>6} {'passes':>8} {'x fwd':>6} {'matrix':>8}")
    for name, r in rows.items():
        print(f"{name:20} {r['seconds']:8.2f} {r['ratio']:6.2f} {r['passes']:8.2f} {r['passes_ratio']:6.2f} {r['matrix']:8.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
