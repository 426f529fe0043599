"""Why PARP's mask moves when it ranks with Wanda and hardly at all when it ranks by magnitude.

Wanda scores a weight by |w_ij| times the norm of input feature j over the calibration set, compared
within each output row (``scope: per_row``). A PARP run re-ranks the whole pool at every re-prune, after
training every weight, the zeroed ones too. A zeroed weight could come back because the input norms changed
under it, or because its own |w| wandered off zero far enough; magnitude PARP needs the latter and, at a sane
rate, does not get it (``benchmarks/regrowth.py``). This takes a checkpoint between two re-prunes of a Wanda
PARP run and prints:

- ``come_back``: how many of the zeroed weights (outside the mask in force) a re-prune now would keep:
  ``wanda_now`` (|w now| x norms now, what the run does) and ``wanda_first_norms`` (|w now| x the
  pretrained model's norms: the inputs held as they were). About equal means the norms' change is not why;
- ``mask_change_from_norms_alone``: the pretrained weights ranked with the norms now against the first
  mask (pretrained weights x pretrained norms): how many weights the norms' change alone would swap;
- ``effective_threshold``: for each zeroed weight, the |w| it needs to come back now, its row's threshold
  (the smallest kept score) divided by its input's norm; quantiles, against the zeroed weights' own |w|;
- where the returning weights sit: the share whose input feature is in the top 1% / 10% of its layer's
  norms.

A check first: the pretrained weights x pretrained norms must give back ``masks_initial.safetensors`` (the
same calibration set the run used), or the comparison is off (``first_mask_reproduced`` is the share of
entries that agree).

    python benchmarks/wanda_regrowth.py RUN_DIR [--checkpoint CHECKPOINT_DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a finished or running Wanda PARP run that keeps checkpoints")
    p.add_argument("--checkpoint", type=Path, help="a checkpoint folder (default: the run's newest)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    from parpkit.engine.checkpoints import read_state
    from parpkit.engine.lifecycle import calibration_set_utterances, collate_calibration, run_context
    from parpkit.progress import Progress
    from parpkit.recipe import read_recipe_file, recipe_from_mapping
    from parpkit.registry import Plugins
    from parpkit.resolve import resolve
    from parpkit.selection import PoolLayout, PrunePlan, keep_masks, scope_counts

    ckpt = args.checkpoint
    if ckpt is None:
        found = sorted(args.run.glob("checkpoints/phase-*/checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
        if not found:
            raise SystemExit(f"no checkpoint in {args.run}/checkpoints; give --checkpoint")
        ckpt = found[-1]
    model_cfg, _ = recipe_from_mapping(read_recipe_file(args.run / "recipe.yaml"), (), str(args.run / "recipe.yaml"))
    resolved = resolve(model_cfg, Plugins(), str(args.run / "recipe.yaml"))
    r, backbone, criterion = resolved.recipe, resolved.backbone, resolved.criterion
    if criterion.needs != "activations" or not hasattr(criterion, "norms"):
        raise SystemExit(f"{args.run} ranks with {criterion.name!r}; this reads Wanda runs")
    if r.pruning.scope != "per_row" or resolved.schedule.name != "parp":
        raise SystemExit(f"{args.run}: this reads PARP runs ranking per_row at one sparsity (scope {r.pruning.scope!r}, "
                         f"schedule {resolved.schedule.name!r})")
    progress = Progress(enabled=False)
    torch.manual_seed(r.seed)  # as the run does before its data and model (a head the backbone initialises)
    train = resolved.dataset.load_split(r.dataset.train_split, progress)
    if any(u.text is None for u in train):
        raise SystemExit(f"{args.run}: its training split has untranscribed audio (pseudo-labelled in the run); "
                         "not supported here")
    backbone.prepare(train, resolved.dataset.unit)
    model = backbone.load()
    model.eval()

    c = r.pruning.calibration  # the run's calibration set
    source = train if c.split in (None, r.dataset.train_split) else resolved.dataset.load_split(c.split, progress)
    batches = collate_calibration(calibration_set_utterances(source, r.seed, c.utterances), c.batch_size, backbone)
    first = load_file(str(args.run / "masks_initial.safetensors"))
    pool = list(first)
    context = run_context(resolved, model, pool, [], calibration=batches, positions=backbone.position_mask)
    params = dict(model.named_parameters())
    # what the run's prunes planned (Wanda measures each block through the blocks before it, pruned so)
    context.plan = PrunePlan(r.pruning.sparsity, r.pruning.scope, OrderedDict(
        zip(pool, scope_counts([params[n_].shape for n_ in pool], r.pruning.sparsity, r.pruning.scope), strict=True)))

    def norms() -> dict[str, torch.Tensor]:
        criterion.calibrate(context)
        return {k: v.clone() for k, v in criterion.norms.items()}

    w0 = {n_: params[n_].detach().clone() for n_ in pool}
    n0 = norms()
    current = {name: m.bool() for name, m in read_state(ckpt)["pruner"]["masks"].items()}
    weights = load_file(str(ckpt / "model.safetensors"))
    missing = model.load_state_dict(weights, strict=False)
    if any(n_ in missing.missing_keys for n_ in pool):
        raise SystemExit(f"{ckpt}/model.safetensors lacks pool weights")
    wc = {n_: params[n_].detach().clone() for n_ in pool}
    nc = norms()

    layout = PoolLayout(OrderedDict((n_, w0[n_].shape) for n_ in pool))
    sparsity = r.pruning.sparsity

    def rank(w: dict, nrm: dict) -> dict[str, torch.Tensor]:
        masks, _ = keep_masks(layout, lambda n_: w[n_].abs() * nrm[n_], sparsity, r.pruning.scope)
        return masks

    check = rank(w0, n0)
    same = sum(int((check[n_] == first[n_]).sum()) for n_ in pool) / layout.numel
    if same < 1:
        raise SystemExit(f"the pretrained weights and norms give back {same:.6f} of the run's first mask, not all of it: "
                         "the calibration here differs from the run's, and so would every count below")
    zeroed = {n_: ~current[n_] for n_ in pool}
    total_zeroed = sum(int(z.sum()) for z in zeroed.values())
    out = {"run": str(args.run), "checkpoint": str(ckpt), "step": json.loads((ckpt / "trainer_state.json").read_text())["global_step"],
           "sparsity": sparsity, "scope": r.pruning.scope, "first_mask_reproduced": same, "zeroed": total_zeroed, "come_back": {}}
    for label, (w, nrm) in {"wanda_now": (wc, nc), "wanda_first_norms": (wc, n0)}.items():
        masks = rank(w, nrm)
        out["come_back"][label] = sum(int((masks[n_] & zeroed[n_]).sum()) for n_ in pool)
        if label == "wanda_now":
            back = masks
    by_norms = rank(w0, nc)
    out["mask_change_from_norms_alone"] = sum(int((by_norms[n_] & ~first[n_]).sum()) for n_ in pool)
    # the |w| each zeroed weight needs now: its row's smallest kept score over its input's norm
    needed, top1, top10, count, over = [], 0, 0, 0, 0
    for n_ in pool:
        score = wc[n_].abs() * nc[n_]
        kept_min = torch.where(back[n_], score, torch.full_like(score, float("inf"))).min(1, keepdim=True).values
        needed.append((kept_min / nc[n_].clamp_min(1e-12)).expand_as(score)[zeroed[n_]].flatten())
        over += int((score >= kept_min)[zeroed[n_]].sum())  # zeroed weights at or over their bar (ties aside: come_back)
        ret = back[n_] & zeroed[n_]
        if ret.any():
            cols = ret.nonzero()[:, 1]
            position = torch.empty(len(nc[n_]), dtype=torch.long)
            position[torch.argsort(nc[n_], descending=True)] = torch.arange(len(nc[n_]))
            share = position[cols].float() / len(nc[n_])
            top1, top10, count = top1 + int((share < 0.01).sum()), top10 + int((share < 0.10).sum()), count + len(cols)
    needed_all = torch.cat(needed).double()
    zabs = torch.cat([wc[n_][zeroed[n_]].abs().flatten() for n_ in pool]).double()
    sample = slice(None, None, max(1, needed_all.numel() // 2**24 + 1))  # torch.quantile's size limit
    qs = torch.tensor([0.0001, 0.001, 0.01, 0.5], dtype=torch.float64)
    out["effective_threshold"] = dict(zip(["q0.0001", "q0.001", "q0.01", "median"],
                                          map(float, torch.quantile(needed_all[sample], qs))))
    out["zeroed_abs"] = dict(zip(["median", "q0.99", "q0.9999", "max"],
                                 [*map(float, torch.quantile(zabs[sample], torch.tensor([0.5, 0.99, 0.9999], dtype=torch.float64))),
                                  float(zabs.max())]))
    out["zeroed_needing_under_0.002"] = float((needed_all < 0.002).double().mean())
    out["zeroed_at_or_over_their_bar"] = over
    out["come_back_on_top_1pct_norm_features"] = top1 / max(count, 1)
    out["come_back_on_top_10pct_norm_features"] = top10 / max(count, 1)
    rel = torch.cat([((nc[n_] - n0[n_]).abs() / n0[n_].clamp_min(1e-8)).flatten() for n_ in pool])
    out["norm_relative_change"] = {"median": float(rel.median()), "q0.9": float(torch.quantile(rel, 0.9))}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
