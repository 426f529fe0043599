"""Criteria that look at the layers' inputs: Wanda (Sun et al. 2023) and SparseGPT (Frantar & Alistarh 2023).

Both read calibration batches through ``RunContext.capture_inputs`` (forward only, padded frames and tokens
left out) and only the weight matrices of linear layers; a bias in the pool is ranked by its magnitude.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from parpkit import (PluginOptions, PruningCriterion, ReconstructingCriterion, RunContext, as_rows, layer_blocks, lowest_k,
                     lowest_k_rows, split_count)


class CalibrationOptions(PluginOptions):
    #: training batches (of training.batch_size utterances, drawn with the recipe's seed) fed forward
    #: before each mask
    calibration_batches: int = Field(default=4, gt=0)
    #: accept biases in the pool (ranked by magnitude, each losing its share): off, because pruning half of
    #: every bias vector wrecks whisper (results/one_shot_tiny_en)
    prune_biases: bool = False


def _check_linear(name: str, context: RunContext, prune_biases: bool) -> None:
    """Weights these criteria score must belong to linear layers (their inputs are the features); biases
    only when asked for."""
    biases = [p for p in context.pool if context.module_of(p)[1] == "bias"]
    if biases and not prune_biases:
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


def _weights(context: RunContext) -> dict[str, str]:
    """Pool weight matrices by the name of the linear layer owning them."""
    return {context.module_of(p)[0]: p for p in context.pool if context.module_of(p)[1] == "weight"}


def magnitude_keep(param: torch.Tensor, count: int, scope: str) -> torch.Tensor:
    """Keep-mask losing exactly ``count`` entries of lowest magnitude (per_row: count / rows in each row)."""
    rows, cols = as_rows(param.shape)
    scores = param.detach().abs().float().reshape(rows, cols)
    prune = lowest_k_rows(scores, count // rows) if scope == "per_row" else lowest_k(scores.reshape(-1), count).view(rows, cols)
    return (~prune).view(param.shape)


class Wanda(PruningCriterion):
    """|W_ij|·‖X_j‖₂: a weight matters by its size times the norm of the input feature it multiplies, over
    the real positions of the calibration batches. Compared within each output row (``scope: per_row``) as
    the paper does; no weight is updated. The input norms are measured again before every prune."""

    name = "wanda"
    needs = "activations"
    Options = CalibrationOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        self.calibration_batches = self.options.calibration_batches
        self.norms: dict[str, torch.Tensor] = {}  # pool weight name -> input feature norms

    def check(self, context: RunContext) -> None:
        _check_linear(self.name, context, self.options.prune_biases)

    def calibrate(self, context: RunContext) -> None:
        weights = _weights(context)
        sums: dict[str, torch.Tensor] = {}

        def observe(module: str, x: torch.Tensor) -> None:
            sq = x.pow(2).sum(0)
            sums[module] = sq if module not in sums else sums[module] + sq

        context.capture_inputs(weights, observe, batches=self.calibration_batches)
        self.norms = {weights[m]: v.sqrt() for m, v in sums.items()}

    def scores(self, name: str, param: torch.nn.Parameter) -> torch.Tensor:
        score = param.detach().abs()
        norms = self.norms.get(name)
        return score if norms is None else score * norms.to(param.device, param.dtype)


class SparseGPTOptions(CalibrationOptions):
    #: columns whose mask is chosen together (the paper's adaptive mask selection), then updated column by column
    block_size: int = Field(default=128, gt=0)
    #: added to the diagonal of XᵀX, as a share of its mean (raised tenfold if the matrix is still singular)
    dampening: float = Field(default=0.01, gt=0, le=1)


class SparseGPT(ReconstructingCriterion):
    """Layer-wise reconstruction: for each linear layer, H = XᵀX of its inputs; in blocks of columns, the
    weights with the lowest w²/[H⁻¹]ᵢᵢ² are pruned and each pruned column's error is spread over the columns
    not yet visited (optimal brain surgeon updates through the Cholesky factor of H⁻¹). Layers go block by
    block in model order: each block is calibrated on the outputs of the blocks already pruned. Scope
    per_tensor prunes each layer's exact count (split over column blocks); per_row each output row's."""

    name = "sparsegpt"
    Options = SparseGPTOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        self.calibration_batches = self.options.calibration_batches

    def check(self, context: RunContext) -> None:
        _check_linear(self.name, context, self.options.prune_biases)

    @torch.no_grad()
    def reconstruct(self, context: RunContext, counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
        weights = _weights(context)
        masks: dict[str, torch.Tensor] = {}
        for block, members in layer_blocks(context, weights):
            hessians: dict[str, torch.Tensor] = {}

            def observe(module: str, x: torch.Tensor) -> None:
                xx = x.T.double() @ x.double()
                hessians[module] = xx if module not in hessians else hessians[module] + xx

            rows = context.capture_inputs(members, observe, batches=self.calibration_batches, stop_after=block)
            for module in members:
                name = weights[module]
                masks[name] = self.prune_layer(context.pool[name], hessians[module] / rows[module], counts[name], context.scope)
        for name, param in context.pool.items():  # biases (and weights of no linear layer, refused by check)
            if name not in masks:
                masks[name] = magnitude_keep(param, counts[name], context.scope)
        return masks

    def prune_layer(self, param: torch.Tensor, hessian: torch.Tensor, count: int, scope: str) -> torch.Tensor:
        """Prune ``count`` weights of one layer (in place) from its inputs' second moments; returns the keep-mask."""
        W = param.detach().float().clone()
        rows, cols = W.shape
        hinv = self._inverse_factor(hessian).float().to(W.device)
        size = self.options.block_size
        widths = [min(size, cols - i) for i in range(0, cols, size)]
        if scope == "per_row":
            per_block = split_count(count // rows, widths)
        else:
            per_block = split_count(count, [rows * w for w in widths])
        prune = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
        for b, i1 in enumerate(range(0, cols, size)):
            i2 = i1 + widths[b]
            W1, H1 = W[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
            d = torch.diagonal(H1)
            score = W1.pow(2) / d.pow(2)[None, :]
            if scope == "per_row":
                p1 = lowest_k_rows(score, per_block[b])
            else:
                p1 = lowest_k(score.reshape(-1), per_block[b]).view(rows, widths[b])
            errors = torch.zeros_like(W1)
            for i in range(widths[b]):
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
