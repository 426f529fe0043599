"""Exact global magnitude masks: parpkit's selection against torch.nn.utils.prune and torch.topk, same pools.

Pools of the real shapes (whisper-tiny: 116 tensors, 16,544,256 weights; wav2vec2-base: 144 tensors,
85,017,600), 50% sparsity, two cases: ``fresh`` (|randn| scores) and ``reprune`` (half the pool already
exactly zero, as at a re-prune). Timed side by side, medians of several repeats:

- ``parpkit``: ``PoolPruner.prune`` as a run calls it again and again (its score buffer reused);
- ``parpkit, first``: the same with a fresh buffer;
- ``kthvalue (before)``: the selection parpkit used before (``torch.kthvalue`` on a concatenated copy);
- ``prune.global_unstructured``: torch's L1 global pruning on modules holding the same tensors;
- ``topk``: a bare ``torch.topk(k, sorted=False)`` over the concatenated pool (a lower bound, no mask).

Checks that parpkit's masks equal the ``kthvalue`` method's exactly (same rule: the k lowest, ties to
the lower index), and counts where torch's differ (only its order among tied values may).

    python benchmarks/mask_speed.py [--device cpu|cuda] [--repeats 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parpkit.masks import PoolPruner  # noqa: E402
from parpkit_plugins.criteria import Magnitude  # noqa: E402


def whisper_tiny_shapes() -> list[tuple[int, ...]]:
    d, f, shapes = 384, 1536, []
    for side, attns in (("encoder", 1), ("decoder", 2)):
        for _ in range(4):
            for _ in range(attns):
                shapes += [(d, d), (d,), (d, d), (d, d), (d,), (d, d), (d,)]  # q (+bias), k (no bias), v, out
            shapes += [(f, d), (f,), (d, f), (d,)]
    return shapes


def wav2vec2_base_shapes() -> list[tuple[int, ...]]:
    d, f = 768, 3072
    return [s for _ in range(12) for s in [(d, d), (d,)] * 4 + [(f, d), (f,), (d, f), (d,)]]


class Holder(torch.nn.Module):
    """The pool's tensors as ``weight`` parameters of sub-modules (what torch's pruning works on)."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self.parts = torch.nn.ModuleList()
        for t in tensors:
            m = torch.nn.Module()
            m.weight = torch.nn.Parameter(t.clone(), requires_grad=False)
            self.parts.append(m)


def pool(shapes, case: str, device: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g)
        if case == "reprune":
            t[torch.rand(s, generator=g) < 0.5] = 0
        out.append(t.to(device))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: str) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def kthvalue_masks(tensors: list[torch.Tensor], k: int) -> torch.Tensor:
    """The selection parpkit used before (flat prune mask)."""
    flat = torch.cat([t.reshape(-1).abs().float() for t in tensors])
    threshold = torch.kthvalue(flat.cpu(), k).values.to(flat.device)
    prune = flat < threshold
    need = k - int(prune.sum())
    if need > 0:
        prune[torch.nonzero(flat == threshold).flatten()[:need]] = True
    return prune


def topk_ms(tensors: list[torch.Tensor], k: int, repeats: int, device: str) -> float:
    flat = torch.cat([t.reshape(-1).abs() for t in tensors])
    return timed(lambda: torch.topk(flat, k, largest=False, sorted=False), repeats, device)


def measure(name: str, shapes, case: str, device: str, repeats: int) -> dict:
    from torch.nn.utils import prune

    tensors = pool(shapes, case, device)
    n = sum(t.numel() for t in tensors)
    k = round(0.5 * n)
    holder = Holder(tensors).to(device)
    names = [f"parts.{i}.weight" for i in range(len(tensors))]
    pruner = PoolPruner(holder, names, Magnitude(), "global")
    originals = [p.detach().clone() for p in pruner.params.values()]

    def parpkit_prune(first: bool = False):
        with torch.no_grad():
            for p, o in zip(pruner.params.values(), originals, strict=True):
                p.copy_(o)  # the prune zeroes the losers: start each repeat from the same weights
        if first:
            pruner._scores = None
        pruner.prune(0.5)

    parpkit_prune()
    ours = torch.cat([m.reshape(-1) for m in pruner.masks.values()])
    before = ~kthvalue_masks(tensors, k)
    row = {"pool": name, "case": case, "parameters": n, "identical_to_kthvalue_method": bool(torch.equal(ours, before))}
    row["parpkit_ms"] = timed(parpkit_prune, repeats, device)
    row["parpkit_first_ms"] = timed(lambda: parpkit_prune(first=True), repeats, device)
    row["kthvalue_before_ms"] = timed(lambda: kthvalue_masks(tensors, k), max(1, repeats // 2), device)
    row["topk_ms"] = topk_ms(tensors, k, max(1, repeats // 2), device)
    times = []
    for _ in range(max(1, repeats // 2)):
        h = Holder(tensors).to(device)  # built outside the timing
        sync(device)
        t = time.perf_counter()
        prune.global_unstructured([(m, "weight") for m in h.parts], pruning_method=prune.L1Unstructured, amount=0.5)
        sync(device)
        times.append(time.perf_counter() - t)
    row["torch_prune_ms"] = statistics.median(times) * 1000
    theirs = torch.cat([m.weight_mask.reshape(-1).bool() for m in h.parts])
    row["positions_differing_from_torch_prune"] = int((theirs != ours).sum())  # order among tied scores only
    row["speedup_vs_torch_prune"] = row["torch_prune_ms"] / row["parpkit_ms"]
    row["speedup_vs_kthvalue_before"] = row["kthvalue_before_ms"] / row["parpkit_ms"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pools", nargs="+", default=["whisper-tiny", "wav2vec2-base"], choices=["whisper-tiny", "wav2vec2-base"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {"whisper-tiny": whisper_tiny_shapes(), "wav2vec2-base": wav2vec2_base_shapes()}
    rows = [measure(p, shapes[p], case, args.device, args.repeats) for p in args.pools for case in ("fresh", "reprune")]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {device}; global 50% magnitude masks, median ms")
    print(f"{'pool':<15}{'case':<9}{'parameters':>12}{'parpkit':>9}{'first':>9}{'kthvalue':>10}{'torch prune':>13}{'topk':>9}"
          f"{'x prune':>9}{'identical':>11}")
    for r in rows:
        print(f"{r['pool']:<15}{r['case']:<9}{r['parameters']:>12,}{r['parpkit_ms']:>9.1f}{r['parpkit_first_ms']:>9.1f}"
              f"{r['kthvalue_before_ms']:>10.1f}{r['torch_prune_ms']:>13.1f}{r['topk_ms']:>9.1f}{r['speedup_vs_torch_prune']:>9.1f}"
              f"{str(r['identical_to_kthvalue_method']):>11}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
