"""One pruning run: prepare → start → phases → judge → write.

- prepare: claim the run directory, load the data and the pretrained model, select the pool.
- start: resume from the newest complete checkpoint, or evaluate the dense model and compute the
  initial mask (after calibrating a gradient-based criterion).
- phases: one or more fine-tuning runs under the schedule (OMP and IMP rewind between them).
- judge: the schedule leaves the model as it should be judged (PARP re-prunes), then evaluation.
- write: the model, masks, per-tensor sparsity and metrics into the run directory.

Nothing is lost on a crash: see ``parpkit.engine.checkpoints``.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from parpkit.engine.checkpoints import RunState, checkpoints, find_resume_point, is_complete
from parpkit.engine.evaluation import evaluate
from parpkit.engine.rundir import RunDir
from parpkit.engine.training import (ListDataset, NonFiniteLoss, PhaseDriver, callbacks, tensorboard_dir, trainer_class,
                                     training_arguments)
from parpkit.errors import ParpkitError
from parpkit.interfaces import Phase, StructuredCriterion, Utterance
from parpkit.masks import PoolPruner, load_donor_masks, model_zero_fraction
from parpkit.progress import Progress
from parpkit.resolve import Resolved
from parpkit.units import restrict


@dataclass
class Session:
    """Everything one run holds between its steps."""

    resolved: Resolved
    progress: Progress
    rundir: RunDir
    device: torch.device
    main: bool
    world_size: int = 1
    train: Sequence[Utterance] = ()
    test: Sequence[Utterance] = ()
    model: torch.nn.Module | None = None
    pool: list[str] = field(default_factory=list)
    pruner: PoolPruner | None = None
    phases: list[Phase] = field(default_factory=list)
    stages: dict[str, dict] = field(default_factory=dict)
    state: RunState | None = None
    started: float = field(default_factory=time.time)
    seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "evaluate": 0.0})
    loss_sum: float = 0.0
    first_phase: int = 0

    @property
    def recipe(self):
        return self.resolved.recipe

    @property
    def log(self):
        return self.rundir.log


def run(resolved: Resolved, progress: Progress, *, output_dir: Path | None = None, resolved_mapping: dict | None = None,
        callbacks: Sequence[Any] = (), fresh: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run a recipe end to end (or resume it); returns the metrics also written to ``metrics.json``."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    recipe = resolved.recipe
    mapping = resolved_mapping if resolved_mapping is not None else recipe.model_dump(mode="json")
    probe = training_arguments(recipe, Path(output_dir or recipe.run_dir()), 1)  # sets up the process group (torchrun)
    rundir = RunDir(Path(output_dir or recipe.run_dir()), yaml.safe_dump(mapping, sort_keys=False), main=probe.process_index == 0)
    rundir.claim(fresh)
    if not fresh and (done := rundir.finished_metrics()) is not None:
        progress.console.print(f"{rundir.path}: this run is complete (pass --fresh to run it again)", soft_wrap=True, markup=False)
        return done if rundir.main else {}
    rundir.write_recipe()
    s = Session(resolved, progress, rundir, probe.device, rundir.main, probe.world_size)

    prepare(s)
    resume_ckpt = start(s, fresh=fresh, resume=resume)
    offset = sum(p.steps for p in s.phases[:s.first_phase])
    for index in range(s.first_phase, len(s.phases)):
        offset = train_phase(s, index, offset, resume_ckpt if index == s.first_phase else None, callbacks)
    s.resolved.schedule.before_evaluate(s.pruner)
    judge(s, "final")
    return write(s)


# ------------------------------------------------------------------------------------------ prepare

def prepare(s: Session) -> None:
    """Data, the pretrained model, the pool and the pruner."""
    r, ds, backbone = s.recipe, s.resolved.dataset, s.resolved.backbone
    torch.manual_seed(r.seed)
    s.train = ds.load_split(r.dataset.train_split, s.progress)
    s.test = ds.load_split(r.dataset.eval_split, s.progress)
    s.log.write("data", train=len(s.train), eval=len(s.test), eval_split=r.dataset.eval_split, **ds.report())
    backbone.prepare(s.train, ds.unit)
    s.model = backbone.load()
    s.pool = s.resolved.select_pool(s.model)
    criterion = s.resolved.criterion
    groups = restrict(backbone.structured_groups(s.model), set(s.pool)) if isinstance(criterion, StructuredCriterion) else []
    donor = None
    if r.pruning.mask_from:
        if not s.resolved.schedule.accepts_mask_from:
            raise ParpkitError(f"schedule {r.pruning.schedule.name!r} finds its own masks; pruning.mask_from "
                               "works with parp, parp_progressive and fixed")
        params = dict(s.model.named_parameters())
        donor = load_donor_masks(r.pruning.mask_from, {n: params[n] for n in s.pool}, file=s.resolved.file)
    s.pruner = PoolPruner(s.model, s.pool, criterion, r.pruning.scope, groups=groups, donor_masks=donor)
    s.pruner.snapshot("pretrained")
    s.phases = s.resolved.schedule.phases(r.training.max_steps)
    s.state = RunState(s.pruner, s.resolved.schedule, criterion, s.stages)
    s.log.write("model", parameters=sum(p.numel() for p in s.model.parameters()), pool_tensors=len(s.pool),
                pool_parameters=s.pruner.size, batch=batch_sizes(s))


def batch_sizes(s: Session) -> dict[str, int]:
    """``training.batch_size`` is per device: under torchrun the update sees all devices' batches."""
    t = s.recipe.training
    return {"per_device": t.batch_size, "accumulation": t.gradient_accumulation_steps, "devices": s.world_size,
            "global": t.batch_size * t.gradient_accumulation_steps * s.world_size}


# ------------------------------------------------------------------------------------------ start

def start(s: Session, *, fresh: bool, resume: bool) -> Path | None:
    """Restore the newest complete checkpoint, or begin: dense evaluation, calibration, initial mask.
    Returns the Trainer checkpoint to resume the first phase from, if any."""
    root = s.rundir.checkpoints
    first, resume_ckpt, boundary = (0, None, None) if fresh else find_resume_point(root, len(s.phases))
    resuming = boundary is not None or resume_ckpt is not None
    if resume and not resuming:
        raise ParpkitError(f"--resume: {s.rundir.path} holds no complete checkpoint to resume from "
                           "(set training.save_steps to write them)")
    s.first_phase = first
    if resuming:
        for directory in (boundary, resume_ckpt):
            if directory is not None:
                s.state.read(directory)
        s.log.write("resume", phase=first, checkpoint=str(resume_ckpt or boundary))
        s.progress.console.print(f"resuming from {resume_ckpt or boundary}", soft_wrap=True, markup=False)
        return resume_ckpt
    if s.main:
        shutil.rmtree(root, ignore_errors=True)
    if s.recipe.evaluation.dense:
        judge(s, "dense")
    calibrate(s)
    s.resolved.schedule.on_start(s.pruner)
    if s.pruner.masks is not None:
        s.log.write("prune", step=0, sparsity=s.pruner.sparsity, pool_zero_fraction=s.pruner.zero_fraction())
        if s.recipe.evaluation.after_prune:
            judge(s, "after_prune")
    return None


def calibrate(s: Session) -> None:
    """Let a gradient-based criterion see ``calibration_batches`` training batches before the first mask:
    forward and backward in eval mode (deterministic), no update, ``observe(0, params)`` after each."""
    criterion = s.resolved.criterion
    n = criterion.calibration_batches
    if n <= 0:
        return
    bs = s.recipe.training.batch_size
    order = torch.randperm(len(s.train), generator=torch.Generator().manual_seed(s.recipe.seed)).tolist()
    model = s.model.to(s.device)
    model.eval()
    with s.progress.task(f"calibrating {criterion.name}", total=n) as task:
        for b in range(n):
            batch = s.resolved.backbone.collate([s.train[order[(b * bs + i) % len(order)]] for i in range(bs)])
            model.zero_grad(set_to_none=True)
            model(**{k: v.to(s.device) for k, v in batch.items()}).loss.backward()
            criterion.observe(0, s.pruner.params)
            task.advance()
    model.zero_grad(set_to_none=True)
    model.train()
    s.log.write("calibrate", criterion=criterion.name, batches=n)


# ------------------------------------------------------------------------------------------ phases

def train_phase(s: Session, index: int, offset: int, resume_ckpt: Path | None, extra_callbacks: Sequence[Any]) -> int:
    """Fine-tune phase ``index`` (resuming its checkpoint if given); returns the step offset after it."""
    from transformers.trainer_callback import PrinterCallback

    r, schedule, pruner = s.recipe, s.resolved.schedule, s.pruner
    phase = s.phases[index]
    if resume_ckpt is None:
        schedule.on_phase_start(index, pruner)
    phase_dir = s.rundir.checkpoints / f"phase-{index}"
    args = training_arguments(r, phase_dir, phase.steps)
    t0 = time.time()
    label = "fine-tuning" if len(s.phases) == 1 else f"fine-tuning ({phase.name})"
    with s.progress.task(label, total=phase.steps) as task, tensorboard_dir(r.training.report_to, s.rundir.path / "tensorboard" / phase.name):
        driver = PhaseDriver(schedule, s.resolved.criterion, pruner, s.log, task, offset, r.training)
        trainer = trainer_class()(model=s.model, args=args, train_dataset=ListDataset(s.train),
                                  data_collator=s.resolved.backbone.collate,
                                  callbacks=[*callbacks(driver, s.state, index, r.training.keep_checkpoints), *extra_callbacks])
        trainer.remove_callback(PrinterCallback)  # progress and the JSONL log report instead
        trainer.parp = driver
        if resume_ckpt is not None:
            task.advance(int(resume_ckpt.name.split("-")[-1]))
        try:
            result = trainer.train(resume_from_checkpoint=str(resume_ckpt) if resume_ckpt else None)
        except NonFiniteLoss as exc:
            last = [p for p in checkpoints(phase_dir) if is_complete(p)]
            keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
            s.log.write("error", step=exc.step, message=str(exc))
            raise ParpkitError(f"{exc}; stopped, {keep}. Lower the learning rate or raise max_grad_norm "
                               "limits, then rerun into this directory to resume") from None
    s.seconds["train"] += time.time() - t0
    s.loss_sum += float(result.training_loss) * phase.steps
    s.model = trainer.model
    if phase.stage:
        schedule.before_evaluate(pruner)
        judge(s, phase.stage)
    before = pruner.prune_count
    schedule.on_phase_end(index, pruner)
    last = index == len(s.phases) - 1
    if pruner.prune_count != before:
        s.log.write("prune", step=offset + phase.steps, sparsity=pruner.sparsity, pool_zero_fraction=pruner.zero_fraction())
        if s.main and not last:
            pruner.save_masks(s.rundir.path / f"masks_{phase.name}.safetensors")
    offset += phase.steps
    if s.main and not last:
        s.state.write(phase_dir / "end", phase=index, offset=offset, weights=True)
    return offset


# ------------------------------------------------------------------------------------------ judge

def judge(s: Session, stage: str) -> None:
    """Evaluate the model as it is now under ``stage`` (main process only)."""
    if not s.main:
        return
    t0 = time.time()
    r = s.recipe
    rates = evaluate(s.resolved.backbone, s.resolved.dataset, s.model, s.test, s.progress, stage, s.device,
                     r.evaluation.batch_size, s.rundir.path / f"transcripts_{stage}.jsonl")
    s.seconds["evaluate"] += time.time() - t0
    s.stages[stage] = {**rates, "pool_sparsity": s.pruner.zero_fraction(), "model_sparsity": model_zero_fraction(s.model)}
    s.log.write("evaluate", stage=stage, **s.stages[stage])


# ------------------------------------------------------------------------------------------ write

def write(s: Session) -> dict[str, Any]:
    """The run directory's results; returns the metrics (empty on other ranks than the main one)."""
    if not s.main:
        return {}
    r, pruner, rundir = s.recipe, s.pruner, s.rundir
    s.resolved.backbone.save(s.model, rundir.path / "model")
    if pruner.masks is not None:
        pruner.save_masks(rundir.path / "masks.safetensors")
    rows = pruner.per_tensor_rows()
    rundir.write_sparsity(rows)
    metrics = {
        "recipe": r.name,
        "plugins": {"backbone": r.backbone.name, "dataset": r.dataset.name,
                    "criterion": r.pruning.criterion.name, "schedule": r.pruning.schedule.name},
        "target_sparsity": r.pruning.sparsity, "scope": r.pruning.scope,
        "eval_split": r.dataset.eval_split, "eval_utterances": len(s.test), "train_utterances": len(s.train),
        "model_parameters": sum(p.numel() for p in s.model.parameters()),
        "pool_parameters": pruner.size, "pool_tensors": len(s.pool),
        "pool_pruned": sum(row["zeros"] for row in rows),
        "dataset": s.resolved.dataset.report(),
        "phases": [{"name": p.name, "steps": p.steps} for p in s.phases],
        "steps": sum(p.steps for p in s.phases), "prunes": pruner.prune_count, "batch": batch_sizes(s),
        "train_loss": s.loss_sum / max(1, sum(p.steps for p in s.phases[s.first_phase:])),
        "stages": s.stages,
        "wall_time_s": {"total": round(time.time() - s.started, 1), "train": round(s.seconds["train"], 1),
                        "evaluate": round(s.seconds["evaluate"], 1)},
    }
    rundir.write_metrics(metrics)
    s.log.write("done", **metrics["wall_time_s"])
    return metrics
