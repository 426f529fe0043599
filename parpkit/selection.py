"""Exact selection of the k lowest scores, fast on the CPU and on CUDA.

The rule every mask follows: exactly ``k`` entries are pruned, the lowest scores, and among scores
equal to the threshold (the k-th smallest value) the lower flat index goes first. For the global scope
the flat index is the position in the concatenation of the pool's tensors, in pool order.

Two steps. The threshold: on the CPU numpy's introselect (``np.partition``; ``torch.kthvalue`` is
several times slower), guarded against huge groups of equal scores (a re-prune at the same sparsity
finds half the pool at exactly zero, where introselect degrades badly): such a group is counted, and the
selection runs only on the side of it where the k-th value lies; on CUDA ``torch.topk`` of the smaller
side (``kthvalue`` is slow there). Then the mask from the threshold: on the CPU everything at or below
it, when that is exactly k entries; otherwise, and always on CUDA, everything below it plus the first
ties in index order, found without listing them and without any host synchronisation: ties cut per
1024-entry block (block counts, a cumsum over blocks, ``searchsorted``, a cumsum inside one block).

The scores of a pool go into one reusable float32 buffer, one tensor at a time, so a criterion's scores
never exist twice; the masks are views of one flat bool tensor.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

_SAMPLE = 4096   # entries sampled to spot a huge group of equal scores near the threshold
_HEAVY = 0.02    # … a value holding this share of the sample
_BLOCK = 1024    # tie-search block on CUDA (entries; a multiple of 8, at most 2040 for the byte-lane sums)


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1 <= k <= N) of a 1-D tensor, as a 0-dim tensor on its device."""
    n = flat.numel()
    if flat.device.type != "cpu":
        if k <= n - k + 1:
            return torch.topk(flat, k, largest=False, sorted=False).values.max()
        return torch.topk(flat, n - k + 1, largest=True, sorted=False).values.min()
    a = flat.detach().float().numpy()
    work = None
    if n >= 16 * _SAMPLE:  # a huge group of equal scores (a re-prune finds the last mask's zeros): count it,
        g = torch.Generator().manual_seed(n ^ k)  # then select only on the side of it where the k-th lies
        sample = np.sort(a[torch.randint(0, n, (_SAMPLE,), generator=g).numpy()])
        values, counts = np.unique(sample, return_counts=True)
        heavy = values[counts >= _HEAVY * _SAMPLE]
        if len(heavy):
            v = heavy[np.argmax(counts[counts >= _HEAVY * _SAMPLE])]
            lower = a < v
            below = int(np.count_nonzero(lower))
            equal = int(np.count_nonzero(a == v))
            if below < k <= below + equal:
                return torch.tensor(float(v), dtype=torch.float32)
            work = a[lower] if k <= below else a[a > v]
            k = k if k <= below else k - below - equal
    work = a.copy() if work is None else work
    work.partition(k - 1)
    return torch.tensor(float(work[k - 1]), dtype=torch.float32)


def mask_from_threshold(flat: torch.Tensor, thr: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` (bool, True = prune): the ``k`` lowest entries of ``flat``, whose k-th smallest is ``thr``."""
    if flat.device.type != "cpu":
        return _mask_without_sync(flat, thr, k, out)
    torch.le(flat, thr, out=out)
    surplus = int(torch.count_nonzero(out)) - k  # ties at thr beyond k: give back the highest-index ones
    if surplus > 0:  # rare with float scores, but a re-prune's zeros can be half the pool: no list of ties
        return _mask_without_sync(flat, thr, k, out)
    return out


def _mask_without_sync(flat: torch.Tensor, thr: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """``mask_from_threshold`` with no host synchronisation (for CUDA; it runs anywhere): the first
    ``need`` ties in index order, found block by block. Temporaries: one N-byte comparison, N/1024 counts."""
    n = flat.numel()
    torch.lt(flat, thr, out=out)
    need = (k - torch.count_nonzero(out)).reshape(1)
    nb = n // _BLOCK
    main = nb * _BLOCK
    tail_need = need
    if nb:
        eq = flat[:main] == thr
        words = eq.view(torch.int64).view(nb, _BLOCK // 8).sum(1)  # 8 bools per int64 word; a byte lane <= 128
        counts = words & 0xFF
        for shift in range(8, 64, 8):
            counts += (words >> shift) & 0xFF
        cum = counts.cumsum(0)
        b = torch.searchsorted(cum, need)  # the block where the need-th tie lies (nb: none)
        bc = b.clamp(max=nb - 1)
        rem = torch.where(b < nb, need - (cum[bc] - counts[bc]), 0)
        before = (torch.arange(nb, device=flat.device) < b).unsqueeze(1)
        out[:main].view(nb, _BLOCK).logical_or_(eq.view(nb, _BLOCK) & before)  # every tie of earlier blocks
        row = eq.view(nb, _BLOCK).index_select(0, bc)
        grid = out[:main].view(nb, _BLOCK)
        grid.index_copy_(0, bc, grid.index_select(0, bc) | (row & (row.cumsum(1) <= rem.unsqueeze(1))))
        tail_need = need - cum[-1:]
    if main < n:
        eq = flat[main:] == thr
        out[main:] |= eq & (eq.cumsum(0) <= tail_need)
    return out


def lowest_k(flat: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask (True = prune) of exactly the ``k`` lowest entries of a 1-D tensor, ties to the lower index."""
    n = flat.numel()
    out = torch.empty(n, dtype=torch.bool, device=flat.device) if out is None else out
    if k <= 0:
        return out.fill_(False)
    if k >= n:
        return out.fill_(True)
    return mask_from_threshold(flat, kth_smallest(flat, k), k, out)


def per_tensor_counts(sizes: Sequence[int], sparsity: float) -> list[int]:
    """How many to prune in each tensor so that the total is exactly round(s·N) and each tensor gets
    floor or ceil of s·n (largest remainders first, ties to the earlier tensor)."""
    total = round(sparsity * sum(sizes))
    exact = [sparsity * n for n in sizes]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def split_count(total: int, sizes: Sequence[int]) -> list[int]:
    """``total`` split over parts of ``sizes`` in proportion, exactly (largest remainders first, ties to the
    earlier part)."""
    whole = sum(sizes)
    exact = [total * n / whole if whole else 0.0 for n in sizes]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def as_rows(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, columns) of a tensor as the ``per_row`` scope sees it: an output row (neuron) of a matrix
    (or of a convolution, its output channel); a 1-D tensor (a bias) is one row."""
    n = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (n // rows if rows else 0)


def row_count(shape: Sequence[int], sparsity: float) -> int:
    """How many entries each row loses under ``per_row``: round(s·columns), the same for every row."""
    return round(sparsity * as_rows(shape)[1])


def scope_counts(shapes: Sequence[Sequence[int]], sparsity: float, scope: str) -> list[int]:
    """How many entries each tensor loses: per_tensor exactly (floor or ceil of s·n, summing to round(s·N));
    per_row every row round(s·columns). The global scope has no per-tensor count."""
    if scope == "per_tensor":
        return per_tensor_counts([math.prod(s) for s in shapes], sparsity)
    if scope == "per_row":
        return [as_rows(s)[0] * row_count(s, sparsity) for s in shapes]
    raise ValueError(f"scope {scope!r} has no per-tensor counts")


def lowest_k_rows(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Bool (rows, columns), True = prune: in every row exactly its ``k`` lowest scores (``k`` one count for
    every row, or a tensor of one count per row), ties to the lower index. On the CPU each row's threshold
    comes from numpy's introselect (a stable sort of every row is some thirty times slower), then the ties
    at it in index order; elsewhere, and for counts that differ by more than one, a stable sort per row."""
    rows, cols = scores.shape
    out = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if not isinstance(k, int):
        k = k.to(scores.device).reshape(rows)
        low, high = int(k.min()), int(k.max())
        if low == high:
            k = low
        elif high - low == 1 and scores.device.type == "cpu":  # row_counts: some rows one more
            out = lowest_k_rows(scores, low)
            more = (k > low).nonzero().squeeze(1)
            rest = scores.float()[more].masked_fill(out[more], float("inf"))
            out[more, rest.argmin(1)] = True  # the first of the lowest (index order among ties)
            return out
        else:
            order = torch.argsort(scores.float(), dim=1, stable=True)
            return out.scatter_(1, order, torch.arange(cols, device=scores.device)[None, :] < k[:, None])
    if k <= 0:
        return out
    if k >= cols:
        return out.fill_(True)
    if scores.device.type != "cpu":
        order = torch.argsort(scores.float(), dim=1, stable=True)[:, :k]
        return out.scatter_(1, order, True)
    s = scores.detach().float()
    threshold = torch.from_numpy(np.partition(s.numpy(), k - 1, axis=1)[:, k - 1].copy())[:, None]
    torch.le(s, threshold, out=out)
    if bool((out.sum(1) == k).all()):  # no row has more than one score at its threshold (float scores)
        return out
    torch.lt(s, threshold, out=out)
    ties = s == threshold
    need = k - out.sum(1, keepdim=True)
    return out.logical_or_(ties & (ties.cumsum(1) <= need))


def row_counts(count: int, rows: int) -> torch.Tensor:
    """How many entries each row of a tensor loses when the tensor loses ``count`` under ``per_row``: as
    evenly as can be, the first ``count % rows`` rows one more (with a uniform sparsity every row the same)."""
    base, extra = divmod(count, rows)
    return torch.full((rows,), base, dtype=torch.long) + (torch.arange(rows) < extra).long()


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"N:M"`` (N of every M consecutive weights of a row kept) as (N, M); None: unstructured."""
    if pattern is None:
        return None
    n, _, m = pattern.partition(":")
    return int(n), int(m)


def n_of_m_prune(scores: torch.Tensor, n: int, m: int, pinned: torch.Tensor | None = None) -> torch.Tensor:
    """Bool (rows, columns), True = prune: in every group of ``m`` consecutive columns of every row the
    ``m - n`` lowest scores (ties to the lower index), entries of ``pinned`` first."""
    rows, cols = scores.shape
    s = scores.float()
    if pinned is not None:
        s = s.masked_fill(pinned, float("-inf"))
    groups = s.reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=2, stable=True)[..., : m - n]
    out = torch.zeros(rows, cols // m, m, dtype=torch.bool, device=scores.device)
    return out.scatter_(2, order, True).reshape(rows, cols)


def apportion(total: int, weights: Sequence[float], caps: Sequence[int]) -> list[int]:
    """``total`` split over parts in proportion to ``weights`` (>= 0), no part above its cap: a part whose
    share reaches its cap gets the cap and the rest is shared again; then floors, and the largest
    remainders one more (ties to the earlier part)."""
    counts = [0] * len(weights)
    left, free = total, [i for i, c in enumerate(caps) if c > 0]
    while True:
        if left > 0 and not free:
            raise ValueError(f"cannot prune {total} entries of a pool of {sum(caps)}")
        whole = sum(weights[i] for i in free)
        share = {i: (left * weights[i] / whole if whole > 0 else left / len(free)) for i in free}
        full = [i for i in free if share[i] >= caps[i]]
        if not full:
            break
        for i in full:
            counts[i] = caps[i]
            left -= caps[i]
        free = [i for i in free if i not in full]
    for i in free:
        counts[i] = math.floor(share[i])
    for i in sorted(free, key=lambda i: (-(share[i] - math.floor(share[i])), i))[:left - sum(counts[i] for i in free)]:
        counts[i] += 1
    return counts


class PoolLayout:
    """Names, shapes and flat offsets of the pool's tensors, in order."""

    def __init__(self, shapes: dict[str, torch.Size]):
        self.names = list(shapes)
        self.shapes = [torch.Size(shapes[n]) for n in self.names]
        self.sizes = [s.numel() for s in self.shapes]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.numel = sum(self.sizes)

    def views(self, flat: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Per-tensor views (no copies) of a flat tensor laid out like the pool."""
        return OrderedDict((n, part.view(shape)) for n, part, shape in
                           zip(self.names, flat.split(self.sizes), self.shapes, strict=True))


def keep_masks(layout: PoolLayout, score: Callable[[str], torch.Tensor], sparsity: float, scope: str,
               buffer: torch.Tensor | None = None, *, counts: Sequence[int] | None = None,
               pattern: tuple[int, int] | None = None) -> tuple[OrderedDict[str, torch.Tensor], torch.Tensor | None]:
    """Keep-masks (True = kept) pruning exactly round(s·N) of the pool's N entries (global, per_tensor) or
    round(s·columns) of every row (per_row, see ``as_rows``), as views of one flat bool tensor. ``score(name)``
    is called once per tensor. Global scope copies the scores into one float32 ``buffer`` (allocated when None
    or the wrong size; returned for reuse at the next prune).

    ``counts``: how many each tensor loses instead (per_tensor; per_row, spread over its rows by
    ``row_counts``), e.g. a non-uniform layer allocation. ``pattern`` (N, M): N of every M consecutive
    entries of each row kept (per_row only)."""
    spans = list(zip(layout.names, layout.offsets, layout.sizes, layout.shapes, strict=True))
    prune = None
    if pattern is not None and scope != "per_row":
        raise ValueError(f"an N:M pattern chooses within the rows of each tensor; scope {scope!r} is not per_row")
    if scope == "global":
        if counts is not None:
            raise ValueError("the global scope ranks the whole pool: it takes no per-tensor counts")
        for name, offset, size, shape in spans:
            s = score(name).detach()
            if buffer is None or buffer.numel() != layout.numel or buffer.device != s.device:
                buffer = torch.empty(layout.numel, dtype=torch.float32, device=s.device)
            buffer[offset:offset + size].view(shape).copy_(s)
            del s
        prune = lowest_k(buffer, round(sparsity * layout.numel))
    elif scope in ("per_tensor", "per_row"):
        counts = list(counts) if counts is not None else scope_counts(layout.shapes, sparsity, scope)
        for (name, offset, size, shape), k in zip(spans, counts, strict=True):
            s = score(name).detach()
            prune = torch.empty(layout.numel, dtype=torch.bool, device=s.device) if prune is None else prune
            out = prune[offset:offset + size]
            if scope == "per_tensor":
                lowest_k(s.reshape(-1).float(), k, out=out)
            else:
                out.view(as_rows(shape)).copy_(select_rows(s, k, pattern))
            del s
    else:
        raise ValueError(f"unknown scope {scope!r}; expected 'global', 'per_tensor' or 'per_row'")
    return layout.views(torch.logical_not(prune, out=prune)), buffer


def select_rows(scores: torch.Tensor, count: int, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Bool (rows, columns), True = prune, for one tensor under ``per_row``: ``count`` entries spread over
    its rows by ``row_counts``, or with ``pattern`` (N, M) the M - N lowest of every M consecutive columns."""
    rows, cols = as_rows(scores.shape)
    s = scores.reshape(rows, cols)
    if pattern is not None:
        return n_of_m_prune(s, *pattern)
    per_row = row_counts(count, rows)
    return lowest_k_rows(s, int(per_row[0]) if bool((per_row == per_row[0]).all()) else per_row)


@dataclass(frozen=True)
class PrunePlan:
    """One prune as the engine computes and checks it, for criteria that choose masks themselves
    (``ReconstructingCriterion``) or must know them in advance (layer-by-layer calibration):

    - ``sparsity`` and ``scope`` of this prune (a gradual schedule prunes below the recipe's target);
    - ``counts``: pool tensor name -> entries it loses, exactly (per_tensor; per_row, spread over the rows
      by ``row_counts``); None under the global scope;
    - ``pattern``: (N, M) when N of every M consecutive entries of each row are kept, else None;
    - ``pinned``: pool tensor name -> entries that must stay pruned (pruned by the masks in force and still
      zero, when the sparsity does not fall: nested masks under gradual schedules); None: no masks yet.
    """

    sparsity: float
    scope: str
    counts: Mapping[str, int] | None = None
    pattern: tuple[int, int] | None = None
    pinned: Mapping[str, torch.Tensor] | None = field(default=None, compare=False)

    def keep(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        """The keep-mask of pool tensor ``name`` from its ``scores``, exactly as the engine selects it
        (per_tensor and per_row; the global scope ranks the pool as a whole, not one tensor)."""
        if self.counts is None:
            raise ValueError("the global scope ranks the whole pool: no tensor's mask is known on its own")
        k = self.counts[name]
        if self.scope == "per_tensor":
            return ~lowest_k(scores.detach().reshape(-1).float(), k).view(scores.shape)
        return ~select_rows(scores.detach(), k, self.pattern).view(scores.shape)

    def problem(self, name: str, keep: torch.Tensor) -> str | None:
        """What is wrong with a keep-mask a criterion returned for ``name`` (None: it is as planned)."""
        rows, cols = as_rows(keep.shape)
        pruned = (~keep.bool()).reshape(rows, cols)
        if self.pattern is not None:
            n, m = self.pattern
            per_group = pruned.reshape(rows, cols // m, m).sum(2)
            if bool((per_group != m - n).any()):
                return f"does not keep exactly {n} of every {m} consecutive weights of each row"
            return None
        if self.counts is None:
            return None
        total = int(pruned.sum())
        if total != self.counts[name]:
            return f"pruned {total} weights; the {self.scope} scope asks for exactly {self.counts[name]}"
        if self.scope == "per_row" and not torch.equal(pruned.sum(1).cpu(), row_counts(self.counts[name], rows)):
            return f"pruned rows unevenly; the per_row scope asks for {self.counts[name]} spread over {rows} rows"
        return None
