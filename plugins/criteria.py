"""Built-in pruning criteria: magnitude (L1) and random."""

from __future__ import annotations

import zlib

import torch

from parpkit import PruningCriterion, hookimpl
from parpkit.interfaces import PluginOptions


class Magnitude(PruningCriterion):
    """|w|: the criterion of PARP's initial mask and of every re-prune."""

    name = "magnitude"

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.abs()


class RandomOptions(PluginOptions):
    seed: int = 0


class Random(PruningCriterion):
    """Uniform random scores, fixed per (seed, parameter name): the same mask on every call and rank."""

    name = "random"
    Options = RandomOptions

    def scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.options.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.rand(weight.shape, generator=gen).to(weight.device)


class Structured(PruningCriterion):
    """Whole FFN neurons (fc1 row with its fc2 column) and attention heads (their q/k/v rows and
    output-projection columns), ranked by the L2 norm of all their weights. The backbone declares
    these groups; global scope ranks neurons against neurons and heads against heads over all layers."""

    name = "structured"
    structured = True

    def unit_scores(self, group, params) -> torch.Tensor:
        total = torch.zeros(group.units, dtype=torch.float32)
        for m in group.members:
            t = params[m.param].detach().float().cpu()
            total += group.unit_rows(t, m).pow(2).sum(dim=1)
        return total.sqrt()


@hookimpl
def register_criteria(register):
    register(Magnitude)
    register(Random)
    register(Structured)
