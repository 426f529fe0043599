"""Criteria that look at the layers' inputs: Wanda (Sun et al. 2023) and SparseGPT (Frantar & Alistarh 2023).

Both read the recipe's calibration set (``pruning.calibration``) through the run context, padded frames and
tokens left out, and only the weight matrices of linear layers; a bias in the pool is ranked by its
magnitude. Both go block by block as the reference implementations do (``RunContext.sequential``): each
block is measured on the outputs of the blocks before it, already pruned. Both can spread the sparsity
unevenly over the blocks by their outlier ratios (``owl``, Yin et al. 2024), and SparseGPT can prune in an
N:M pattern (``pruning.pattern``; the engine selects Wanda's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, model_validator

from parpkit import (PluginOptions, PrunePlan, PruningCriterion, ReconstructingCriterion, RunContext, layer_blocks, lowest_k,
                     lowest_k_rows, n_of_m_prune, row_counts, split_count)


class OwlOptions(PluginOptions):
    """Outlier-weighted layerwise sparsity (OWL, Yin et al. 2024): blocks whose scores have more outliers
    keep more weights; the pool's total stays at the target."""

    #: a weight is an outlier where its score |W_ij|·‖X_j‖ is above this many times its block's mean score
    #: (the paper's M)
    threshold: float = Field(default=5.0, gt=0)
    #: block sparsities spread over [s - spread, s + spread] around the target s, the block with the most
    #: outliers the least sparse (the paper's λ)
    spread: float = Field(default=0.08, ge=0, lt=1)


class CalibrationOptions(PluginOptions):
    #: accept biases in the pool (ranked by magnitude, each losing its share): off, because pruning half of
    #: every bias vector wrecks whisper (results/one_shot_tiny_en)
    prune_biases: bool = False
    #: null: the same sparsity in every layer; or OWL's per-block sparsities from the blocks' outlier ratios,
    #: measured in one extra forward pass over the calibration set (scopes per_tensor and per_row; not with
    #: pruning.pattern), e.g. ``owl: {threshold: 5, spread: 0.08}``
    owl: OwlOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _calibration_moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "calibration_batches" in data:
            raise ValueError(
                "calibration_batches is no longer an option of this criterion: it calibrated on training batches "
                "(calibration_batches × training.batch_size utterances). The calibration set is now the recipe's "
                "pruning.calibration, independent of the training batch: remove calibration_batches and write "
                "pruning.calibration: {utterances: N, split: train} (N = calibration_batches × training.batch_size "
                "for as many utterances as before, e.g. 4 × 8 = 32; the default is 128)")
        return data


def _check(name: str, context: RunContext, options: CalibrationOptions) -> None:
    """Weights these criteria score must belong to linear layers (their inputs are the features); biases
    only when asked for; OWL only where each layer has a count of its own."""
    biases = [p for p in context.pool if context.module_of(p)[1] == "bias"]
    if biases and not options.prune_biases:
        raise ValueError(f"{name} ranks weight matrices by their inputs; the pool also holds {len(biases)} bias tensors "
                         f"(e.g. {biases[0]}), which it could rank by magnitude alone (per_row and per_tensor scopes prune "
                         "every bias vector to the target share, and half of every bias wrecks whisper); leave them out "
                         "(pruning.exclude: ['.*\\.bias']) or set options.prune_biases: true")
    for param in context.pool:
        owner, attr = context.module_of(param)
        module = context.modules[owner]
        if attr == "weight" and not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{name} ranks weights of linear layers by their inputs; pool tensor {param} belongs to a "
                             f"{type(module).__name__} (leave it out with pruning.exclude)")
    if options.owl is not None and context.scope == "global":
        raise ValueError("options.owl sets a sparsity for each block; the global scope ranks the whole pool at once "
                         "(its layers' sparsities follow from the ranking): set pruning.scope to per_row or per_tensor, "
                         "or remove owl")
    if options.owl is not None and context.pattern is not None:
        raise ValueError(f"options.owl sets a sparsity for each block; pruning.pattern {':'.join(map(str, context.pattern))} "
                         "fixes it in every row: use one or the other")


def _weights(context: RunContext) -> dict[str, str]:
    """Pool weight matrices by the name of the linear layer owning them."""
    return {context.module_of(p)[0]: p for p in context.pool if context.module_of(p)[1] == "weight"}


def _owned(context: RunContext, members: list[str]) -> list[str]:
    """Pool tensors (weights and biases) of the given modules, in pool order."""
    wanted = set(members)
    return [p for p in context.pool if context.module_of(p)[0] in wanted]


def magnitude_keep(context: RunContext, name: str) -> torch.Tensor:
    """Keep-mask of pool tensor ``name`` by magnitude, as the plan of the coming prune asks."""
    return context.plan.keep(name, context.pool[name].detach().abs().float())


def input_norms(context: RunContext, weights: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Per-position input norms of the model as it is, in one forward pass: sqrt(Σ x_j² / positions) over
    the real positions of the calibration set, per input feature j."""
    sums: dict[str, torch.Tensor] = {}

    def observe(module: str, x: torch.Tensor) -> None:
        sq = x.pow(2).sum(0, dtype=torch.float64)
        sums[module] = sq if module not in sums else sums[module].add_(sq)

    rows = context.capture_inputs(weights, observe)
    return {weights[m]: (v / rows[m]).sqrt().float() for m, v in sums.items()}


def owl_sparsities(context: RunContext, sparsity: float, options: OwlOptions, norms: Mapping[str, torch.Tensor]
                   ) -> dict[str, float]:
    """OWL: each block's outlier ratio D (the share of its Wanda scores |W|·‖X‖ above ``threshold`` × the
    block's mean score), mapped linearly onto [0, 2·spread] and shifted so that the pool's kept total is
    (1 - sparsity) of it; a block's sparsity is one minus that, clipped to [0, 1], for every pool tensor
    of the block. The engine makes exact counts of them."""
    weights = _weights(context)
    blocks = layer_blocks(context, weights)
    ratios, sizes, members_of = [], [], []
    for _, members in blocks:
        scores = torch.cat([(context.pool[weights[m]].detach().abs().float() * norms[weights[m]][None, :]).reshape(-1)
                            for m in members])
        ratios.append(float((scores > options.threshold * scores.mean()).float().mean()))
        owned = _owned(context, members)
        sizes.append(sum(context.pool[p].numel() for p in owned))
        members_of.append(owned)
    low, high = min(ratios), max(ratios)
    spread = [(r - low) / (high - low) * 2 * options.spread if high > low else 0.0 for r in ratios]
    total = sum(sizes)
    shift = sum(s * n for s, n in zip(spread, sizes, strict=True)) / total - (1 - sparsity)
    out: dict[str, float] = {}
    for keep, owned in zip(spread, members_of, strict=True):
        for p in owned:
            out[p] = min(1.0, max(0.0, 1 - (keep - shift)))
    return out


class WandaOptions(CalibrationOptions):
    #: true: one forward pass over the model as it is, every norm from the unpruned model (the walk through
    #: the pruned blocks, pruning.calibration.sequential, is the paper's method and the default)
    one_pass: bool = False


def wanda_scores(param: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
    """|W_ij|·‖X_j‖ (a tensor without input norms, a bias, by its magnitude)."""
    score = param.detach().abs()
    return score if norm is None else score * norm.to(param.device, param.dtype)


class Wanda(PruningCriterion):
    """|W_ij|·‖X_j‖: a weight matters by its size times the norm of the input feature it multiplies, ‖X_j‖
    the root mean square of feature j over the real positions of the calibration set (per position, so
    that layers which see more positions, whisper's encoder against its decoder, score alike under the
    global scope). Compared within each output row (``scope: per_row``) as the paper does; no weight is
    updated. Measured again before every prune, block by block: each block on the outputs of the blocks
    before it, pruned as the coming ranking will prune them (their weights are put back afterwards: the
    engine applies the masks). Under the global scope, whose ranking is known only once every block is
    measured, each block is pruned for the next ones by a ranking of its own at the prune's sparsity."""

    name = "wanda"
    needs = "activations"
    Options = WandaOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        self.norms: dict[str, torch.Tensor] = {}  # pool weight name -> per-position input feature norms

    def check(self, context: RunContext) -> None:
        _check(self.name, context, self.options)

    def allocate(self, context: RunContext, sparsity: float) -> dict[str, float] | None:
        if self.options.owl is None:
            return None
        return owl_sparsities(context, sparsity, self.options.owl, input_norms(context, _weights(context)))

    @torch.no_grad()
    def calibrate(self, context: RunContext) -> None:
        weights = _weights(context)
        if self.options.one_pass or context.plan is None:
            self.norms = input_norms(context, weights)
            return
        plan = context.plan
        sums: dict[str, torch.Tensor] = {}
        rows: dict[str, int] = {}
        norms: dict[str, torch.Tensor] = {}
        saved: dict[str, torch.Tensor] = {}

        def observe(module: str, x: torch.Tensor) -> None:
            sq = x.pow(2).sum(0, dtype=torch.float64)
            sums[module] = sq if module not in sums else sums[module].add_(sq)
            rows[module] = rows.get(module, 0) + x.shape[0]

        def after_block(block: str, members: list[str]) -> None:
            for m in members:
                norms[weights[m]] = (sums.pop(m) / rows[m]).sqrt().float()
            owned = _owned(context, members)
            if plan.counts is not None:
                keep = {p: plan.keep(p, wanda_scores(context.pool[p], norms.get(p))) for p in owned}
            else:  # global: the pool's ranking is known only at the end; the block is ranked on its own
                scores = [wanda_scores(context.pool[p], norms.get(p)).float() for p in owned]
                flat = torch.cat([s.reshape(-1) for s in scores])
                pruned = lowest_k(flat, round(plan.sparsity * flat.numel())).split([s.numel() for s in scores])
                keep = {p: ~m.view(s.shape) for p, m, s in zip(owned, pruned, scores, strict=True)}
            for p in owned:
                saved[p] = context.pool[p].detach().clone()
                context.pool[p].mul_(keep[p].to(context.pool[p].device, context.pool[p].dtype))

        try:
            context.sequential(weights, observe, after_block)
        finally:
            for p, value in saved.items():
                context.pool[p].copy_(value)
        self.norms = norms

    def scores(self, name: str, param: torch.nn.Parameter) -> torch.Tensor:
        return wanda_scores(param, self.norms.get(name))


class SparseGPTOptions(CalibrationOptions):
    #: columns whose mask is chosen together (the paper's adaptive mask selection), then updated column by
    #: column; a multiple of M under an N:M pattern
    block_size: int = Field(default=128, gt=0)
    #: added to the diagonal of XᵀX, as a share of its mean (raised tenfold if the matrix is still singular)
    dampening: float = Field(default=0.01, gt=0, le=1)


class SparseGPT(ReconstructingCriterion):
    """Layer-wise reconstruction: for each linear layer, H = XᵀX of its inputs; in blocks of columns, the
    weights with the lowest w²/[H⁻¹]ᵢᵢ² are pruned and each pruned column's error is spread over the columns
    not yet visited (optimal brain surgeon updates through the Cholesky factor of H⁻¹). Layers go block by
    block in model order, each block calibrated on the outputs of the blocks already pruned. Inputs that
    are always zero (dead columns) lose their weights, as the reference does. Scope per_tensor prunes each
    layer's exact count, each column block its share (the reference's rule); per_row each output row's
    count, chosen over the whole row and then column block by column block on the updated weights; an N:M
    pattern M - N of every M consecutive weights, chosen when the update reaches them. A weight that the
    masks in force prune and that is still zero stays pruned when the sparsity rises (nested masks)."""

    name = "sparsegpt"
    Options = SparseGPTOptions
    supports_pattern = True

    def check(self, context: RunContext) -> None:
        _check(self.name, context, self.options)
        if context.pattern is not None and self.options.block_size % context.pattern[1]:
            raise ValueError(f"options.block_size {self.options.block_size} is not a multiple of the pattern's "
                             f"{context.pattern[1]} (pruning.pattern); groups of M columns must not straddle blocks")

    def allocate(self, context: RunContext, sparsity: float) -> dict[str, float] | None:
        if self.options.owl is None:
            return None
        return owl_sparsities(context, sparsity, self.options.owl, input_norms(context, _weights(context)))

    @torch.no_grad()
    def reconstruct(self, context: RunContext, counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
        weights = _weights(context)
        if context.plan is None:  # called outside the engine's prune: the plan is the counts' alone
            context.plan = PrunePlan(context.sparsity, context.scope, dict(counts), context.pattern)
        plan = context.plan
        pinned = plan.pinned or {}
        pattern = plan.pattern
        masks: dict[str, torch.Tensor] = {}
        hessians: dict[str, torch.Tensor] = {}
        rows: dict[str, int] = {}
        last: list[Any] = [None, None]

        def observe(module: str, x: torch.Tensor) -> None:
            if x is not last[0]:  # q, k and v see the same rows: one product for the three
                last[:] = [x, (x.T @ x).double()]
            xx = last[1]
            hessians[module] = xx.clone() if module not in hessians else hessians[module].add_(xx)
            rows[module] = rows.get(module, 0) + x.shape[0]

        def after_block(block: str, members: list[str]) -> None:
            last[:] = [None, None]
            for m in members:
                name = weights[m]
                masks[name] = self.prune_layer(context.pool[name], hessians.pop(m) / rows[m], counts[name], context.scope,
                                               pattern=pattern, pinned=pinned.get(name))
            for p in _owned(context, members):  # biases (by magnitude), zeroed now so that the next block sees them so
                if p not in masks:
                    masks[p] = magnitude_keep(context, p)
                    context.pool[p].mul_(masks[p].to(context.pool[p].dtype))

        context.sequential(weights, observe, after_block)
        return masks

    def prune_layer(self, param: torch.Tensor, hessian: torch.Tensor, count: int, scope: str, *,
                    pattern: tuple[int, int] | None = None, pinned: torch.Tensor | None = None) -> torch.Tensor:
        """Prune ``count`` weights of one layer (in place) from its inputs' second moments; returns the
        keep-mask. ``pinned``: entries that must be pruned first (nested masks)."""
        W = param.detach().float().clone()
        rows, cols = W.shape
        dead = torch.diagonal(hessian) == 0  # an input that is always zero: its weights do nothing, and go
        W[:, dead.to(W.device)] = 0.0
        hinv = self._inverse_factor(hessian).float().to(W.device)
        pin = pinned.to(W.device).bool() if pinned is not None and bool(pinned.any()) else None
        size = self.options.block_size
        if pattern is not None and size % pattern[1]:
            raise ValueError(f"block_size {size} is not a multiple of the pattern's {pattern[1]}")
        widths = [min(size, cols - i) for i in range(0, cols, size)]
        starts = list(range(0, cols, size))

        def score_of(w: torch.Tensor, d: torch.Tensor, where: slice) -> torch.Tensor:
            score = w.pow(2) / d.pow(2)[None, :]
            return score if pin is None else score.masked_fill(pin[:, where], float("-inf"))

        per_block = row_budget = None
        if pattern is None and scope == "per_row":  # each row's count, placed by a ranking over the whole row
            whole = lowest_k_rows(score_of(W, torch.diagonal(hinv), slice(None)), row_counts(count, rows).to(W.device))
            row_budget = [whole[:, i1:i1 + w].sum(1) for i1, w in zip(starts, widths, strict=True)]
        elif pattern is None:
            per_block = split_count(count, [rows * w for w in widths])
        prune = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
        for b, i1 in enumerate(starts):
            i2 = i1 + widths[b]
            W1, H1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
            d = torch.diagonal(H1)
            if pattern is not None:
                p1 = torch.zeros(rows, widths[b], dtype=torch.bool, device=W.device)
            elif row_budget is not None:
                p1 = lowest_k_rows(score_of(W1, d, slice(i1, i2)), row_budget[b])
            else:
                p1 = lowest_k(score_of(W1, d, slice(i1, i2)).reshape(-1), per_block[b]).view(rows, widths[b])
            errors = torch.zeros_like(W1)
            for i in range(widths[b]):
                if pattern is not None and i % pattern[1] == 0:
                    m = pattern[1]
                    group = score_of(W1[:, i:i + m], d[i:i + m], slice(i1 + i, i1 + i + m))
                    p1[:, i:i + m] = n_of_m_prune(group, *pattern)
                w = W1[:, i]
                q = w.masked_fill(p1[:, i], 0.0)
                err = (w - q) / d[i]
                W1[:, i:] -= err[:, None] * H1[i, i:][None, :]
                W1[:, i] = q
                errors[:, i] = err
            W[:, i1:i2] = W1
            W[:, i2:] -= errors @ hinv[i1:i2, i2:]
            prune[:, i1:i2] = p1
        W.masked_fill_(prune, 0.0)
        param.data.copy_(W.to(param.dtype))
        return ~prune

    def _inverse_factor(self, hessian: torch.Tensor) -> torch.Tensor:
        """Upper Cholesky factor of (H + λI)⁻¹; λ grows tenfold until H + λI is positive definite."""
        H = hessian.clone()
        dead = torch.diagonal(H) == 0  # an input that is always zero: its weights do not matter
        H[dead, dead] = 1.0
        damp = self.options.dampening * torch.diagonal(H).mean()
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        for _ in range(6):
            L, info = torch.linalg.cholesky_ex(H + damp * eye)
            if int(info) == 0:
                return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            damp = damp * 10
        raise ValueError("sparsegpt: the inputs' second-moment matrix stays singular; raise dampening")
