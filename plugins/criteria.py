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


@hookimpl
def register_criteria(register):
    register(Magnitude)
    register(Random)
