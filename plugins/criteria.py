"""Built-in pruning criteria: magnitude (L1), random, movement, first-order Taylor, structured (L2 of
whole units), and the activation-aware wanda and sparsegpt (``activation_criteria``). Higher scores are kept."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field

from parpkit import PluginOptions, PruningCriterion, StructuredCriterion, UnitGroup, hookimpl

from .activation_criteria import SparseGPT, Wanda


class Magnitude(PruningCriterion):
    """|w|: the criterion of PARP's initial mask and of every re-prune."""

    name = "magnitude"

    def scores(self, name: str, param: torch.nn.Parameter) -> torch.Tensor:
        return param.detach().abs()


class RandomOptions(PluginOptions):
    #: null: the recipe's `seed`, so that runs with different seeds draw different masks (torch takes 32 bits)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)


class Random(PruningCriterion):
    """Uniform random scores, fixed per (seed, parameter name): the same mask on every call and rank."""

    name = "random"
    Options = RandomOptions

    def __init__(self, options=None, *, seed: int = 0, **kw: Any):
        super().__init__(options, **kw)
        self.seed = self.options.seed if self.options.seed is not None else seed

    def scores(self, name: str, param: torch.nn.Parameter) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.rand(param.shape, generator=gen).to(param.device)


class _Accumulating(PruningCriterion):
    """A criterion that keeps one float32 accumulator per pool tensor, updated in ``observe`` and saved
    in checkpoints. A tensor never observed would score zero, and all-zero scores rank by index order
    (whole tensors pruned): ``calibration_batches`` of 0 is refused before anything loads."""

    needs = "gradients"

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        self.calibration_batches = self.options.calibration_batches
        self.acc: dict[str, torch.Tensor] = {}
        self.observed = 0

    def check(self, context) -> None:
        if self.calibration_batches < 1:
            raise ValueError(f"{self.name} ranks by the gradients it has observed, and the first mask comes before any "
                             "update: with calibration_batches: 0 it has seen none, every score is zero and the ranking "
                             "falls to index order, pruning whole tensors; set options.calibration_batches to 1 or more")

    def scores(self, name: str, param: torch.nn.Parameter) -> torch.Tensor:
        acc = self.acc.get(name)
        return acc.to(param.device) if acc is not None else torch.zeros(param.shape, device=param.device)

    def state_dict(self) -> dict[str, Any]:
        return {"acc": dict(self.acc), "observed": self.observed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.acc = dict(state.get("acc", {}))
        self.observed = int(state.get("observed", 0))


class MovementOptions(PluginOptions):
    #: training batches seen (forward and backward, no update) before the first mask
    calibration_batches: int = Field(default=4, ge=0)


class Movement(_Accumulating):
    """Movement scores after Sanh, Wolf & Rush 2020, as the plain-gradient sum S = -Σ_t g_t·w_t over every
    observed update (not their learned scores: hard/soft movement pruning trains S through a straight-
    through estimator of the masked model; this is the first-order sum they derive it approximates).
    Weights that training pushes away from zero score high, weights it pulls toward zero score low,
    whatever their size: a large weight shrinking is pruned before a small one growing."""

    name = "movement"
    Options = MovementOptions

    @torch.no_grad()
    def observe(self, step: int, params: Mapping[str, torch.nn.Parameter]) -> None:
        for name, p in params.items():
            if p.grad is None:
                continue
            acc = self.acc.setdefault(name, torch.zeros(p.shape, dtype=torch.float32, device=p.device))
            acc.sub_(p.grad.float() * p.detach().float())
        self.observed += 1


class TaylorOptions(PluginOptions):
    #: training batches seen (forward and backward, no update) before the first mask
    calibration_batches: int = Field(default=4, ge=0)
    #: weight of the past in the running average (0: the last observed update only)
    decay: float = Field(default=0.9, ge=0, lt=1)
    #: squared: (g·w)², Molchanov et al. 2019's importance; abs: |g·w|, the variant of Molchanov et al. 2017
    form: Literal["squared", "abs"] = "squared"


class Taylor(_Accumulating):
    """First-order Taylor importance (Molchanov et al. 2019): the loss change from removing a weight is
    about g·w; the score is the running average of (g·w)² over observed updates (``form: abs``: of |g·w|,
    the 2017 variant), an exponential average with ``decay`` where the paper averages over batches (the
    first observation starts it). A large weight the loss does not depend on is pruned before a small
    one it depends on strongly."""

    name = "taylor"
    Options = TaylorOptions

    @torch.no_grad()
    def observe(self, step: int, params: Mapping[str, torch.nn.Parameter]) -> None:
        d = self.options.decay
        for name, p in params.items():
            if p.grad is None:
                continue
            value = p.grad.float() * p.detach().float()
            value = value.square_() if self.options.form == "squared" else value.abs_()
            acc = self.acc.get(name)
            if acc is None:
                self.acc[name] = value
            else:
                acc.mul_(d).add_(value, alpha=1 - d)
        self.observed += 1


class StructuredOptions(PluginOptions):
    #: which kinds of unit to prune: ffn (feed-forward neurons), heads (attention heads). Whisper's and
    #: wav2vec2's configs tie the head size to d_model / heads, so removed heads stay in a plain
    #: transformers export as zeros; ``[ffn]`` at scope per_tensor exports with every pruned weight removed
    units: list[Literal["ffn", "heads"]] = Field(default_factory=lambda: ["ffn", "heads"], min_length=1)


class Structured(StructuredCriterion):
    """Whole FFN neurons (fc1 row with its fc2 column) and attention heads (their q/k/v rows and
    output-projection columns), ranked by the L2 norm of all their weights. The backbone declares
    these groups; global scope ranks neurons against neurons and heads against heads over all layers
    (layers end with different widths); per_tensor scope prunes the same share of every layer, so all
    layers keep equal widths and ``parpkit export`` writes a plain transformers model."""

    name = "structured"
    Options = StructuredOptions

    def prunes(self, group: UnitGroup) -> bool:
        return group.kind in self.options.units

    def unit_scores(self, group: UnitGroup, params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor:
        total = torch.zeros(group.units, dtype=torch.float32)
        for m in group.members:
            t = params[m.param].detach().float().cpu()
            total += group.unit_rows(t, m).pow(2).sum(dim=1)
        return total.sqrt()


@hookimpl
def register_criteria(register):
    for criterion in (Magnitude, Random, Movement, Taylor, Structured, Wanda, SparseGPT):
        register(criterion)
