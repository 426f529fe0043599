"""CPU inference time of a compact export against the dense model, in the same run.

Random-initialised models of the real shapes (whisper-tiny, wav2vec2-base); 50% structured sparsity of
the FFN and attention groups (per layer, so every layer loses half its neurons and heads) through the
same pruner, structured criterion and compaction that ``parpkit export --compact`` uses. Reports the
median of several timed forward passes and the dense/compact ratio (target: >= 1.6x).

    python benchmarks/compact_speed.py [--models whisper wav2vec2] [--repeats 15] [--threads 2] [--json out.json]

With ``--run RUN_DIR`` (a whisper run exported with ``parpkit export RUN_DIR --compact``) it times that run's
own models instead: ``RUN_DIR/model`` (the masked model, dense shapes: as fast as the dense model) against
``RUN_DIR/compact``, on an input of the run's encoder window and 32 decoder tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def whisper_tiny():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from parpkit_plugins.backbones.whisper import structured_groups

    config = WhisperConfig(vocab_size=51864, d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
                           decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536)
    model = WhisperForConditionalGeneration(config).eval()
    inputs = {"input_features": torch.randn(1, 80, 3000), "decoder_input_ids": torch.randint(0, 50000, (1, 32))}
    return model, structured_groups(model), inputs, "1 x 30 s input, 32 decoder tokens"


def wav2vec2_base():
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from parpkit_plugins.backbones.wav2vec2 import structured_groups

    model = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=32)).eval()
    return model, structured_groups(model), {"input_values": torch.randn(1, 64000)}, "1 x 4 s input"


def timed(models: list, inputs, repeats: int) -> list[float]:
    """Median seconds per forward of each model; the models alternate so that drift hits all alike."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for m in models:
            m(**inputs)  # warm-up
        for _ in range(repeats):
            for i, m in enumerate(models):
                t = time.perf_counter()
                m(**inputs)
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def measure(name: str, build, repeats: int, sparsity: float) -> dict:
    import copy

    from parpkit.masks import PoolPruner
    from parpkit.compact import kept_units, remove_units
    from parpkit_plugins.criteria import Structured

    torch.manual_seed(0)
    dense, groups, inputs, shape = build()
    pool = sorted({m.param for g in groups for m in g.members})
    masked = copy.deepcopy(dense)
    PoolPruner(masked, pool, Structured(), "per_tensor", groups=groups).prune(sparsity)
    small = copy.deepcopy(masked)
    remove_units(small, groups, kept_units(small, groups))
    with torch.inference_mode():
        diff = float((masked(**inputs).logits - small(**inputs).logits).abs().max())
    t_dense, t_small = timed([dense, small], inputs, repeats)
    return {"model": name, "input": shape, "sparsity": sparsity,
            "parameters_dense": sum(p.numel() for p in dense.parameters()),
            "parameters_compact": sum(p.numel() for p in small.parameters()),
            "dense_s": round(t_dense, 4), "compact_s": round(t_small, 4), "speedup": round(t_dense / t_small, 2),
            "max_abs_difference_vs_masked": diff}


def measure_run(run: str, repeats: int) -> dict:
    from pathlib import Path

    from transformers import WhisperForConditionalGeneration

    from parpkit import load_compact

    run_dir = Path(run)
    dense = WhisperForConditionalGeneration.from_pretrained(run_dir / "model").eval()
    small = load_compact(run_dir / "compact").eval()
    frames = 2 * dense.config.max_source_positions
    g = torch.Generator().manual_seed(0)
    inputs = {"input_features": torch.randn(1, dense.config.num_mel_bins, frames, generator=g),
              "decoder_input_ids": torch.randint(0, 50000, (1, 32), generator=g)}
    with torch.inference_mode():
        diff = float((dense(**inputs).logits - small(**inputs).logits).abs().max())
    t_dense, t_small = timed([dense, small], inputs, repeats)
    nonzero = lambda m: sum(int(p.count_nonzero()) for p in m.parameters())  # noqa: E731
    return {"model": str(run_dir), "input": f"1 x {frames // 100} s input, 32 decoder tokens", "sparsity": None,
            "parameters_dense": sum(p.numel() for p in dense.parameters()), "nonzero_dense": nonzero(dense),
            "parameters_compact": sum(p.numel() for p in small.parameters()),
            "dense_s": round(t_dense, 4), "compact_s": round(t_small, 4), "speedup": round(t_dense / t_small, 2),
            "max_abs_difference_vs_masked": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["whisper", "wav2vec2"], choices=["whisper", "wav2vec2"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--run", help="a whisper run directory with compact/ (parpkit export --compact): time its models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    builders = {"whisper": ("whisper-tiny", whisper_tiny), "wav2vec2": ("wav2vec2-base", wav2vec2_base)}
    if args.run:
        results = [measure_run(args.run, args.repeats)]
    else:
        results = [measure(*builders[m], args.repeats, args.sparsity) for m in args.models]
    for r in results:
        print(f"{r['model']:14s} {r['input']:34s} params {r['parameters_dense']:>11,} -> {r['parameters_compact']:>11,}  "
              f"dense {r['dense_s'] * 1000:8.1f} ms  compact {r['compact_s'] * 1000:8.1f} ms  x{r['speedup']:.2f}  "
              f"(max |diff| vs masked {r['max_abs_difference_vs_masked']:.1e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
