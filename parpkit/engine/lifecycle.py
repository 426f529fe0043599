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

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

import parpkit.version
from parpkit.augment import AugmentedDataset, build as build_augmenter, joins_any
from parpkit.engine.distill import Distiller, check_teacher, make_teacher, pseudo_label
from parpkit.engine.checkpoints import (RunState, checkpoints, extra_defaults, find_resume_point, is_complete, join_tensors,
                                        problem, split_tensors)
from parpkit.engine.evaluation import evaluate
from parpkit.engine.rundir import RunDir
from parpkit.engine.shared import SharedWork, tensors_digest, utterances_digest
from parpkit.engine.training import (ListDataset, NonFiniteLoss, PhaseDriver, callbacks, effective_precision,
                                     tensorboard_dir, trainer_class, training_arguments)
from parpkit.context import CalibrationBatch, RunContext, TrainingSettings
from parpkit.errors import ParpkitError, RecipeError, UsageError, located
from parpkit.interfaces import Phase, StructuredCriterion, Utterance
from parpkit.masks import PoolPruner, check_donor_scope, load_donor_masks, model_zero_fraction
from parpkit.plugin_checks import check_calibration_batches, check_config_counts, check_leaves_weights, check_phases
from parpkit.progress import Progress
from parpkit.recipe import BOOKKEEPING
from parpkit.splits import check_scored, check_utterances, unlabelled_scored, unlabelled_training
from parpkit.resolve import Resolved
from parpkit.selection import as_rows, parse_pattern
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
    evals: dict[str, Sequence[Utterance]] = field(default_factory=dict)  # the first split is the headline
    validation: Sequence[Utterance] = ()
    model: torch.nn.Module | None = None
    pool: list[str] = field(default_factory=list)
    pruner: PoolPruner | None = None
    context: RunContext | None = None
    phases: list[Phase] = field(default_factory=list)
    stages: dict[str, dict] = field(default_factory=dict)
    state: RunState | None = None
    started: float = field(default_factory=time.time)
    seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "evaluate": 0.0})
    training_since: float | None = None  # when the phase now training began (its time is not in ``seconds`` yet)
    #: wall time of earlier attempts up to the checkpoint this one resumed from (a resumed run counts them)
    earlier: dict[str, float] = field(default_factory=lambda: {"total": 0.0, "train": 0.0, "evaluate": 0.0, "attempts": 0})
    first_phase: int = 0
    shared: SharedWork = field(default_factory=lambda: SharedWork(None))
    #: with sharing on: digests of what the run read (each loaded split, the pretrained weights, an explicit
    #: teacher's), part of every shared key, so that changed contents under the same paths are never reused
    contents: dict[str, str] = field(default_factory=dict)
    distiller: Distiller | None = None
    pseudo_labelled: int = 0  # training utterances the teacher transcribed
    #: what checkpoints keep beside the stages: the learning curve, the best validation checkpoint and the
    #: phases taken from other runs (a resumed run still reports those its earlier attempts took)
    extra: dict[str, Any] = field(default_factory=extra_defaults)

    @property
    def recipe(self):
        return self.resolved.recipe

    def elapsed(self) -> dict[str, float]:
        """Wall time so far, earlier attempts included (up to the checkpoint resumed from; work they did after
        it is redone, and counted, here), and the number of attempts (processes) it took."""
        now = time.time()
        training = now - self.training_since if self.training_since is not None else 0.0
        return {"total": round(self.earlier["total"] + now - self.started, 1),
                "train": round(self.earlier["train"] + self.seconds["train"] + training, 1),
                "evaluate": round(self.earlier["evaluate"] + self.seconds["evaluate"], 1),
                "attempts": int(self.earlier["attempts"]) + 1}

    @property
    def log(self):
        return self.rundir.log


def run(resolved: Resolved, progress: Progress, *, output_dir: Path | None = None, resolved_mapping: dict | None = None,
        callbacks: Sequence[Any] = (), fresh: bool = False, resume: bool = False, shared: Path | None = None) -> dict[str, Any]:
    """Run a recipe end to end (or resume it); returns the metrics also written to ``metrics.json``.

    ``shared``: a folder where work other recipes may repeat is kept and looked up (see
    ``parpkit.engine.shared``); a sweep passes one to all its points. Off under several processes."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    recipe = resolved.recipe
    mapping = resolved_mapping if resolved_mapping is not None else recipe.model_dump(mode="json")
    preflight(resolved)  # before the directory exists: a recipe that fails its checks leaves nothing behind
    check_this_machine(resolved)
    probe = training_arguments(recipe, Path(output_dir or recipe.run_dir()), 1)  # sets up the process group (torchrun)
    rundir = RunDir(Path(output_dir or recipe.run_dir()), yaml.safe_dump(mapping, sort_keys=False), main=probe.process_index == 0)

    def complete(done: dict) -> dict:
        progress.console.print(f"{rundir.path}: this run is complete (pass --fresh to run it again)", soft_wrap=True,
                               markup=False)
        return done if rundir.main else {}

    if not fresh and (done := rundir.complete_run()) is not None:  # before the lock: a read-only mount is fine
        return complete(done)
    rundir.acquire()
    try:
        rundir.claim(fresh)
        if not fresh and (done := rundir.finished_metrics()) is not None:
            return complete(done)
        rundir.write_recipe()
        s = Session(resolved, progress, rundir, probe.device, rundir.main, probe.world_size,
                    started=rundir.log.start)  # the wall time and the log's time_s count from the same moment
        s.shared = SharedWork(shared if probe.world_size == 1 else None)
        prepare(s)  # what the recipe names (data, model, teacher) loads: an error here refuses the input
        try:
            resume_ckpt = start(s, fresh=fresh, resume=resume)
            offset = sum(p.steps for p in s.phases[:s.first_phase])
            for index in range(s.first_phase, len(s.phases)):
                offset = train_phase(s, index, offset, resume_ckpt if index == s.first_phase else None, callbacks)
            if s.extra["best"] is not None:  # the final model is the best validation checkpoint
                s.model.load_state_dict(s.extra["best"]["weights"])
                s.log.write("best", step=s.extra["best"]["step"], **s.extra["best"]["rates"])
            before = s.pruner.prune_count
            s.resolved.schedule.before_evaluate(s.pruner)
            if s.pruner.prune_count != before:  # PARP's re-prune before scoring moves the mask too: logged like the others
                s.log.write("prune", step=offset, before_scoring=True, **s.pruner.prune_event())
            s.pruner.check_at_target(s.resolved.schedule.target, s.resolved.schedule.name)
            judge(s, "final")
            metrics = write(s)
        except (ParpkitError, OSError) as exc:
            exc.run_started = True  # computing had begun: the CLI exits 3 (failed), not 2 (refused), unless refused() says
            raise
        if s.main and not recipe.training.keep_checkpoints_when_done:
            shutil.rmtree(rundir.checkpoints, ignore_errors=True)  # metrics.json is written: the run is complete
        return metrics
    finally:
        rundir.release()


def run_context(resolved: Resolved, model: torch.nn.Module, pool: list[str], phases: list[Phase], **live: Any) -> RunContext:
    """The context plugins read: the recipe's settings with the skeleton (``loaded=False``) at check time,
    or the live model with its calibration batches (``batches``, ``positions``)."""
    r, t = resolved.recipe, resolved.recipe.training
    training = TrainingSettings(max_steps=t.max_steps, batch_size=t.batch_size, gradient_accumulation_steps=t.gradient_accumulation_steps,
                                learning_rate=t.learning_rate, lr_scheduler=t.lr_scheduler, warmup_steps=t.warmup_steps,
                                precision=effective_precision(t.precision))
    return RunContext(model, pool, training=training, phases=phases, sparsity=r.pruning.sparsity, scope=r.pruning.scope,
                      seed=r.seed, file=resolved.file, pattern=parse_pattern(r.pruning.pattern),
                      sequential=r.pruning.calibration.sequential, **live)


def build_skeleton(backbone) -> torch.nn.Module:
    """The backbone's meta-device model. Config values that cannot build a model (a width the heads do not
    divide, a negative or non-numeric size) fail inside transformers or torch with whatever exception they
    raise: one line naming the backbone, never a traceback. Building it costs no memory: the real model
    builds from the same config."""
    try:
        model = backbone.skeleton()
    except (ParpkitError, RecipeError):
        raise
    except Exception as exc:  # noqa: BLE001  (TypeError, RuntimeError, ZeroDivisionError … from the model's constructor)
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        text = text if len(text) <= 300 else text[:300] + " …"
        raise ParpkitError(f"{backbone.name}: the config cannot build a model: {text}") from None
    check_config_counts(backbone.name, getattr(model, "config", None))
    return model


def preflight(resolved: Resolved) -> tuple[torch.nn.Module, list[str]]:
    """Every check that needs no data and no weights, the same for ``parpkit validate`` and ``parpkit run``
    (which runs it before the directory is claimed): the dataset's layout and plan, the model's architecture
    and the pool, what criterion and schedule declare (scopes, a starting mask, their own ``check`` with
    the training settings and phases), and a distillation teacher given by directory or hub id. Returns the
    model's skeleton and the pool."""
    r, file = resolved.recipe, resolved.file
    criterion, schedule = resolved.criterion, resolved.schedule
    located(file, "dataset.options", resolved.dataset.check)
    scored = [(split, "dataset.eval_split") for split in r.dataset.eval_splits]
    if r.evaluation.every_steps and r.evaluation.validation_split:
        scored.append((r.evaluation.validation_split, "evaluation.validation_split"))
    for split, key in scored:  # what a run would refuse once it loads the split, where the dataset knows it now
        if located(file, "dataset.options", lambda: resolved.dataset.labelled(split)) is False:
            raise RecipeError(unlabelled_scored(split), file=file, key=key)
    if r.distillation is None and located(file, "dataset.options", lambda: resolved.dataset.labelled(r.dataset.train_split)) is False:
        raise RecipeError(unlabelled_training(r.dataset.train_split), file=file, key="dataset.train_split")
    model = located(file, "backbone.options", lambda: build_skeleton(resolved.backbone))
    pool = resolved.select_pool(model)
    if r.pruning.scope not in criterion.scopes:
        raise RecipeError(f"criterion {criterion.name!r} ranks in scope {' or '.join(criterion.scopes)}, not "
                          f"{r.pruning.scope!r}", file=file, key="pruning.scope")
    if isinstance(criterion, StructuredCriterion):
        check_whole_units(resolved, model, pool)
    if r.pruning.mask_from and not schedule.accepts_mask_from:
        raise RecipeError(f"schedule {schedule.name!r} finds its own masks and takes no starting mask; remove mask_from "
                          "or use a schedule that starts from a given mask (fixed, parp …)", file=file, key="pruning.mask_from")
    if r.pruning.mask_from:
        check_donor_scope(r.pruning.mask_from, r.pruning.scope, file=file)
    if r.training.freeze_transformer_steps and resolved.backbone.output_layer(model) is None:
        raise RecipeError(f"backbone {resolved.backbone.name!r} names no output layer (get_output_embeddings) to train "
                          "alone", file=file, key="training.freeze_transformer_steps")
    phases = located(file, "pruning.schedule.options", lambda: check_phases(schedule.phases(r.training.max_steps), schedule.name))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    located(file, "pruning.sparsity", lambda: check_leaves_weights({n: shapes[n] for n in pool}, r.pruning.sparsity,
                                                                   r.pruning.scope, ""))
    context = run_context(resolved, model, pool, phases, loaded=False)
    check_pattern(resolved, model, pool)
    located(file, "pruning.criterion.options", lambda: check_calibration_batches(criterion))
    located(file, "pruning.criterion", lambda: criterion.check(context))
    located(file, "pruning.schedule", lambda: schedule.check(context))
    check_teacher(r.distillation, resolved.backbone, file)
    window = resolved.backbone.training_window_s(model)
    if (c := r.dataset.concatenate) is not None and window is not None and c.max_seconds > window:
        raise RecipeError(f"{c.max_seconds:g} s: the longest passage must fit the training window of {window:g} s; lower "
                          "max_seconds, or train at a longer window", file=file, key="dataset.concatenate.max_seconds")
    if r.dataset.augment:
        located(file, "dataset.augment", lambda: build_augmenter(r.dataset.augment))
    return model, pool


def pruned_groups(backbone, criterion, model: torch.nn.Module, pool: list[str]) -> list:
    """The structured groups (FFN neurons, heads) inside the pool that a structured criterion prunes; none for
    any other criterion."""
    if not isinstance(criterion, StructuredCriterion):
        return []
    return [g for g in restrict(backbone.structured_groups(model), set(pool)) if criterion.prunes(g)]


def check_whole_units(resolved: Resolved, model: torch.nn.Module, pool: list[str]) -> None:
    """A structured criterion needs at least one whole unit in the pool: a unit whose members (its bias too) are
    not all in the pool is never pruned, so a pool of weight matrices alone would prune nothing."""
    criterion, file = resolved.criterion, resolved.file
    declared = [g for g in resolved.backbone.structured_groups(model) if criterion.prunes(g)]
    if restrict(declared, set(pool)):
        return
    if not declared:
        raise RecipeError(f"criterion {criterion.name!r} prunes whole units, but backbone {resolved.backbone.name!r} declares "
                          "none of the kinds it prunes", file=file, key="pruning.criterion")
    missing = next(m.param for g in declared for m in g.members if m.param not in pool)
    raise RecipeError(f"criterion {criterion.name!r} prunes whole units, and no unit has all its parameters in the pool, "
                      f"so nothing would be pruned (first missing: {missing}); a unit is pruned with its bias, so add "
                      "the units' biases to pruning.include (e.g. '...\\.(fc1|fc2)\\.(weight|bias)') or remove include",
                      file=file, key="pruning.include")


def check_pattern(resolved: Resolved, model: torch.nn.Module, pool: list[str]) -> None:
    """An N:M pattern needs a criterion whose masks can follow it and rows that split into groups of M."""
    r, file = resolved.recipe, resolved.file
    pattern = parse_pattern(r.pruning.pattern)
    if pattern is None:
        return
    if not resolved.criterion.supports_pattern:
        raise RecipeError(f"criterion {resolved.criterion.name!r} cannot prune in an N:M pattern (magnitude, wanda and "
                          "sparsegpt can); remove pattern or change the criterion", file=file, key="pruning.pattern")
    if not resolved.schedule.prunes_at_target_only:
        raise RecipeError(f"schedule {resolved.schedule.name!r} prunes at lower sparsities on its way to the target, and "
                          f"the {r.pruning.pattern} pattern prunes exactly {1 - pattern[0] / pattern[1]:g} of every row; use a "
                          "schedule that prunes at one sparsity (fixed, parp, omp) or remove pattern",
                          file=file, key="pruning.pattern")
    shapes = {n: p.shape for n, p in model.named_parameters()}
    odd = [n for n in pool if as_rows(shapes[n])[1] % pattern[1]]
    if odd:
        raise RecipeError(f"pattern {r.pruning.pattern}: {len(odd)} pool tensors have rows whose length is not a multiple "
                          f"of {pattern[1]} (first: {odd[0]}, shape {tuple(shapes[odd[0]])}); leave them out with "
                          "pruning.exclude", file=file, key="pruning.pattern")


def check_this_machine(resolved: Resolved) -> None:
    """What a recipe needs of the machine that trains it (not checked by ``validate``, which may run on a
    machine without the job's GPUs, such as a cluster's login node)."""
    if resolved.recipe.training.freeze_transformer_steps and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RecipeError("training.freeze_transformer_steps is not supported under several processes (DDP wraps the "
                          "model with every weight trainable); train in one process or set it to 0", file=resolved.file,
                          key="training.freeze_transformer_steps")
    if resolved.recipe.training.precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError("training.precision fp16 needs a CUDA device (its loss scaler); this machine has none: use bf16 "
                          "(autocast on the CPU) or fp32", file=resolved.file, key="training.precision")


# ------------------------------------------------------------------------------------------ prepare

def prepare(s: Session) -> None:
    """Data, the pretrained model, the pool and the pruner."""
    r, ds, backbone = s.recipe, s.resolved.dataset, s.resolved.backbone
    torch.manual_seed(r.seed)
    if (warning := training_split_scored(r)) is not None:
        s.log.write("warning", message=warning)
        s.progress.console.print(f"warning: {warning}", soft_wrap=True, markup=False)
    s.train = load_split(s, r.dataset.train_split)
    s.evals = {split: load_split(s, split) for split in r.dataset.eval_splits}
    for split, utts in s.evals.items():
        check_scored(utts, split, ds, r.evaluation.normalizer)
    if r.evaluation.every_steps:
        split = r.evaluation.validation_split or r.dataset.eval_splits[0]
        s.validation = s.evals[split] if split in s.evals else load_split(s, split)
    s.log.write("environment", **environment())  # each attempt's: a resumed run may go on on another machine
    s.log.write("data", train=len(s.train), eval={k: len(v) for k, v in s.evals.items()}, **ds.report())
    if ds.skipped:  # counted in metrics.json too; said here, so that a split scored on fewer utterances is noticed
        s.progress.console.print(f"warning: {r.dataset.name} skipped {len(ds.skipped)} utterance(s) (skip_unreadable), "
                                 f"first: {ds.skipped[0]}", soft_wrap=True, markup=False)
    labelled = [u for u in s.train if u.text is not None]
    backbone.prepare(labelled, ds.unit)
    s.model = backbone.load()
    scored = dict(s.evals)
    if s.validation and not any(s.validation is utts for utts in s.evals.values()):
        scored[r.evaluation.validation_split] = s.validation
    checked = [(r.dataset.train_split, s.train, True), *((split, utts, False) for split, utts in scored.items())]
    for split, utts, training in checked:  # lengths the loaded model cannot take, named before anything runs
        try:
            backbone.check_lengths(utts, training=training)
        except ParpkitError as exc:
            raise ParpkitError(f"dataset: split {split!r}: {exc}") from None
    if (c := r.dataset.concatenate) is not None and s.train:
        if backbone.training_window_s(s.model) is None:
            # preflight checked it against the window a backbone names; one that names none may still refuse lengths
            rate = s.train[0].sample_rate
            longest = Utterance(id="longest passage", audio=np.zeros(int(c.max_seconds * rate), np.float32),
                                sample_rate=rate, text=None)
            try:
                backbone.check_lengths([longest], training=True)
            except ParpkitError as exc:
                raise ParpkitError(f"dataset.concatenate.max_seconds {c.max_seconds:g}: the longest passage must fit the "
                                   f"training window ({exc}); lower max_seconds, or train at a longer window") from None
        if s.main and not joins_any(s.train, c):
            warn(s, f"dataset.concatenate joins no passage: no two labelled training utterances"
                    f"{' of one speaker' if c.same_speaker else ''} fit max_seconds {c.max_seconds:g} s with the shortest "
                    f"gap ({c.gap_seconds[0]:g} s) between them, so every utterance is served alone; raise max_seconds"
                    f"{', or set same_speaker: false' if c.same_speaker else ''}")
    if s.shared.root is not None:
        s.contents["model"] = tensors_digest(s.model.state_dict())
    d = r.distillation
    if d is not None and d.weight == 0 and d.hidden_weight == 0 and len(labelled) == len(s.train):
        # nothing to learn from the teacher and nothing for it to transcribe: it is not loaded, nor run
        s.log.write("teacher", skipped="distillation.weight and hidden_weight are 0")
        s.progress.console.print("distillation: weight and hidden_weight are 0, so the teacher teaches nothing: "
                                  "it is not loaded (this is fine-tuning without distillation)", soft_wrap=True, markup=False)
    elif d is not None:  # before the first prune: the teacher is the dense pretrained model
        s.distiller = make_teacher(r.distillation, s.model, backbone, s.device, effective_precision(r.training.precision),
                                   s.resolved.file)
        if s.shared.root is not None and r.distillation.teacher is not None:
            s.contents["teacher"] = tensors_digest(s.distiller.teacher.state_dict())
        s.log.write("teacher", source=r.distillation.teacher or "pretrained", memory_mb=round(s.distiller.memory_mb, 1),
                    parameters=sum(p.numel() for p in s.distiller.teacher.parameters()))
    if len(labelled) < len(s.train):
        if s.distiller is None:
            raise ParpkitError("dataset.train_split: " + unlabelled_training(
                r.dataset.train_split, f"{len(s.train) - len(labelled)} of the {len(s.train)}"))
        s.train = pseudo_label(s.distiller, s.train, s.progress, r.evaluation.batch_size,
                               s.rundir.path / "pseudo_labels.jsonl" if s.main else None)
        s.pseudo_labelled = len(s.train) - len(labelled)
        s.log.write("pseudo_labels", utterances=s.pseudo_labelled)
    s.pool = s.resolved.select_pool(s.model)
    criterion = s.resolved.criterion
    groups = pruned_groups(backbone, criterion, s.model, s.pool)
    donor = None
    if r.pruning.mask_from:
        params = dict(s.model.named_parameters())
        donor = load_donor_masks(r.pruning.mask_from, {n: params[n] for n in s.pool}, file=s.resolved.file)
    s.phases = s.resolved.schedule.phases(r.training.max_steps)
    calibration = CalibrationSet(s, calibration_split(s)) if criterion.needs == "activations" else None
    s.context = run_context(s.resolved, s.model, s.pool, s.phases, batches=CalibrationSource(s), calibration=calibration,
                            positions=backbone.position_mask, warn=lambda message: warn(s, message))
    s.pruner = PoolPruner(s.model, s.pool, criterion, r.pruning.scope, groups=groups, donor_masks=donor, context=s.context,
                          pattern=parse_pattern(r.pruning.pattern))
    s.pruner.owner, s.pruner.event = f"schedule {s.resolved.schedule.name!r}", s.log.write
    s.pruner.snapshot("pretrained")
    s.state = RunState(s.pruner, s.resolved.schedule, criterion, s.stages, s.extra, clock=s.elapsed)
    s.log.write("model", parameters=sum(p.numel() for p in s.model.parameters()), pool_tensors=len(s.pool),
                pool_parameters=s.pruner.size, batch=batch_sizes(s))


def environment() -> dict[str, Any]:
    """What a run's numbers depend on besides its recipe: versions, and the processor's kernels (float rounding
    differs between CPUs of other instruction sets, e.g. AVX2 and AVX-512, so weights trained and decodes scored
    there differ a little; greedy decoding of hard speech can turn that into a different word error rate)."""
    import platform

    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"parpkit": parpkit.version.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "cpu": cpu,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def warn(s: Session, message: str) -> None:
    """A warning in the log and on the console."""
    s.log.write("warning", message=message)
    s.progress.console.print(f"warning: {message}", soft_wrap=True, markup=False)


def calibration_split(s: Session) -> Sequence[Utterance]:
    """The utterances the calibration set is drawn from: the training split as the run trains on it
    (pseudo-labelled), or the split ``pruning.calibration.split`` names, which needs transcripts (the
    decoder's inputs, the CTC targets the batches carry)."""
    r = s.recipe
    split = r.pruning.calibration.split or r.dataset.train_split
    scored = set(r.dataset.eval_splits) | ({r.evaluation.validation_split or r.dataset.eval_splits[0]}
                                           if r.evaluation.every_steps else set())
    if split in scored and split != r.dataset.train_split:
        warn(s, f"pruning.calibration.split {split!r} is also scored: the masks are chosen on the audio they are judged "
                "on, and its scores are no longer those of unseen speech")
    if split == r.dataset.train_split:
        return s.train
    utts = s.evals[split] if split in s.evals else load_split(s, split)
    if any(u.text is None for u in utts):
        raise ParpkitError(f"pruning.calibration.split: split {split!r} has utterances without transcripts; calibration "
                           "batches carry transcripts (whisper's decoder inputs): use the training split or a labelled one")
    return utts


def load_split(s: Session, split: str) -> Sequence[Utterance]:
    """A split from the dataset, refused unless every utterance can be used as it is: ids unique within
    the split (pseudo-labels, transcripts and checkpoints know utterances by id), audio finite and at the
    backbone's sample rate (what the dataset hands over, after any resampling it does)."""
    utts = s.resolved.dataset.load_split(split, s.progress)
    check_utterances(utts, split, s.resolved.backbone)
    if s.shared.root is not None:
        s.contents[f"split:{split}"] = utterances_digest(utts)
    return utts


def training_split_scored(r) -> str | None:
    """A warning when the split the model trains on is also the one it is scored on (the scores then
    measure memorisation, not recognition); None otherwise."""
    train = r.dataset.train_split
    where = [f"dataset.eval_split ({train!r})"] if train in r.dataset.eval_splits else []
    if r.evaluation.every_steps and (r.evaluation.validation_split or r.dataset.eval_splits[0]) == train:
        where.append(f"the learning curve (evaluation.validation_split, {train!r})")
    if not where:
        return None
    return (f"the training split {train!r} is also scored by {' and '.join(where)}: those scores measure how well "
            "the model memorised its training data, not how well it recognises unseen speech")


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
    first, resume_ckpt, boundary, notes = (0, None, None, []) if fresh else find_resume_point(root, len(s.phases))
    for note in notes:
        s.log.write("damaged_checkpoint", message=note)
        s.progress.console.print(f"{note}; passing over it", soft_wrap=True, markup=False)
    resuming = boundary is not None or resume_ckpt is not None
    if resume and not resuming:
        raise UsageError(f"--resume: {s.rundir.path} holds no complete checkpoint to resume from "
                         "(set training.save_steps to write them)")
    s.first_phase = first
    if resuming:
        meta = s.state.read(resume_ckpt or boundary)  # a phase end also carries the weights the next phase starts from
        s.earlier.update(meta.get("elapsed", {}))  # checkpoints written before parpkit kept it have none
        s.log.write("resume", phase=first, checkpoint=str(resume_ckpt or boundary))
        s.progress.console.print(f"resuming from {resume_ckpt or boundary}", soft_wrap=True, markup=False)
        return resume_ckpt
    if s.main:
        shutil.rmtree(root, ignore_errors=True)
    if s.recipe.evaluation.dense:
        judge_dense(s)
    s.model.to(s.device)
    t0 = time.time()
    calibrate(s)
    s.resolved.schedule.on_start(s.pruner)
    s.state.plugin_states()  # a state a checkpoint cannot hold is named now, not at the first checkpoint
    if s.pruner.masks is not None:  # seconds: the first mask's calibration and selection (and reconstruction)
        s.log.write("prune", step=0, seconds=round(time.time() - t0, 2), **s.pruner.prune_event())
        if s.main:  # how far the final mask moves from this one is part of the answer (metrics: mask_iou_initial)
            s.pruner.save_masks(s.rundir.path / "masks_initial.safetensors")
        if s.recipe.evaluation.after_prune:
            judge(s, "after_prune")
    return None


class CalibrationSet:
    """The run's calibration set (``pruning.calibration``): its utterances drawn with the recipe's seed from
    ``utterances`` (the same on every call, rank and resumed attempt), collated ``batch_size`` at a time
    at the first use and kept."""

    def __init__(self, s: Session, utterances: Sequence[Utterance]):
        self.s = s
        self.utterances = utterances
        self.batches: list[CalibrationBatch] | None = None

    def __call__(self) -> list[CalibrationBatch]:
        if self.batches is None:
            s, c = self.s, self.s.recipe.pruning.calibration
            chosen = calibration_set_utterances(self.utterances, s.recipe.seed, c.utterances)
            if len(chosen) < c.utterances:
                warn(s, f"pruning.calibration.utterances is {c.utterances}, and its split has only {len(chosen)}: "
                        "calibrating on all of them")
            self.batches = collate_calibration(chosen, c.batch_size, s.resolved.backbone)
            s.log.write("calibration_set", split=c.split or s.recipe.dataset.train_split, utterances=len(chosen),
                        batches=len(self.batches))
        return self.batches


def calibration_set_utterances(utterances: Sequence[Utterance], seed: int, n: int) -> list[Utterance]:
    """The first ``n`` utterances (all, if fewer) of an order drawn with the seed."""
    order = torch.randperm(len(utterances), generator=torch.Generator().manual_seed(seed)).tolist()
    return [utterances[i] for i in order[:n]]


def collate_calibration(utterances: Sequence[Utterance], batch_size: int, backbone) -> list[CalibrationBatch]:
    """Calibration batches of ``batch_size`` utterances as the backbone collates them (model inputs only)."""
    chunks = [tuple(utterances[i:i + batch_size]) for i in range(0, len(utterances), batch_size)]
    return [CalibrationBatch(backbone.model_inputs(backbone.collate(chunk)), chunk) for chunk in chunks]


class CalibrationSource:
    """The training batches gradient criteria observe before the first mask: in an order drawn with the
    recipe's seed (the same on every call, rank and resumed attempt), collated once and kept."""

    def __init__(self, s: Session):
        self.s = s
        self.batches: list[CalibrationBatch] = []

    def __call__(self, n: int) -> list[CalibrationBatch]:
        s, backbone = self.s, self.s.resolved.backbone
        for utts in calibration_utterances(s.train, s.recipe.seed, s.recipe.training.batch_size, n)[len(self.batches):]:
            self.batches.append(CalibrationBatch(backbone.model_inputs(backbone.collate(utts)), utts))
        return self.batches[:n]


def calibration_utterances(train: Sequence[Utterance], seed: int, batch_size: int, n: int) -> list[tuple[Utterance, ...]]:
    """The utterances of the first ``n`` training batches a gradient criterion observes: the training set
    in an order drawn with the seed, ``batch_size`` at a time (wrapping round a small set)."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return [tuple(train[order[(b * batch_size + i) % len(order)]] for i in range(batch_size)) for b in range(n)]


def calibrate(s: Session) -> None:
    """Let a gradient-based criterion see ``calibration_batches`` training batches before the first mask:
    forward and backward in eval mode (deterministic), no update, ``observe(0, params)`` after each.
    (Criteria that need activations calibrate before each prune, through the run context.)"""
    criterion = s.resolved.criterion
    n = criterion.calibration_batches
    if n <= 0 or criterion.needs == "activations":
        return
    model = s.model.to(s.device)
    model.eval()
    with s.progress.task(f"calibrating {criterion.name}", total=n) as task:
        for batch in s.context.calibration_batches(n):
            model.zero_grad(set_to_none=True)
            model(**{k: v.to(s.device) for k, v in batch.inputs.items()}).loss.backward()
            criterion.observe(0, s.pruner.params)
            task.advance()
    model.zero_grad(set_to_none=True)
    model.train()
    s.log.write("calibrate", criterion=criterion.name, batches=n)


# ------------------------------------------------------------------------------------------ phases

def train_phase(s: Session, index: int, offset: int, resume_ckpt: Path | None, extra_callbacks: Sequence[Any]) -> int:
    """Fine-tune phase ``index`` (resuming its checkpoint if given, or taking it from the shared folder
    when another run trained it identically); returns the step offset after it."""
    schedule, pruner = s.resolved.schedule, s.pruner
    phase = s.phases[index]
    if resume_ckpt is None:
        schedule.on_phase_start(index, pruner)
    with s.shared.hold("phase", phase_key(s, index)) as entry:
        if entry is not None and entry.done:
            load_shared_phase(s, index, entry.path)
        else:
            if phase.steps:  # a phase of 0 steps (training.max_steps: 0, one-shot pruning) trains nothing
                fine_tune(s, index, offset, resume_ckpt, extra_callbacks)
            if phase.stage:
                schedule.before_evaluate(pruner)
                judge(s, phase.stage)
            if entry is not None and s.main:
                with entry.writing() as folder:
                    store_shared_phase(s, index, folder)
    before = pruner.prune_count
    schedule.on_phase_end(index, pruner)
    last = index == len(s.phases) - 1
    if pruner.prune_count != before:
        s.log.write("prune", step=offset + phase.steps, **pruner.prune_event())
        if s.main and not last:
            pruner.save_masks(s.rundir.path / f"masks_{phase.name}.safetensors")
    offset += phase.steps
    if s.main and not last:
        s.state.write(s.rundir.checkpoints / f"phase-{index}" / "end", phase=index, offset=offset, weights=True)
    return offset


def fine_tune(s: Session, index: int, offset: int, resume_ckpt: Path | None, extra_callbacks: Sequence[Any]) -> None:
    """One phase through the Trainer."""
    from transformers.trainer_callback import PrinterCallback

    r, schedule, pruner = s.recipe, s.resolved.schedule, s.pruner
    phase = s.phases[index]
    phase_dir = s.rundir.checkpoints / f"phase-{index}"
    # grouping reads the lengths of the utterances, not of the passages concatenate joins: not by default then
    group = (r.training.group_by_length if r.training.group_by_length is not None
             else s.resolved.backbone.pads_to_longest and r.dataset.concatenate is None)
    args = training_arguments(r, phase_dir, phase.steps, group_by_length=group)
    t0 = s.training_since = time.time()
    label = "fine-tuning" if len(s.phases) == 1 else f"fine-tuning ({phase.name})"
    validate = (lambda step: validate_now(s, step, index)) if r.evaluation.every_steps and s.main else None
    with s.progress.task(label, total=phase.steps) as task, tensorboard_dir(r.training.report_to, s.rundir.path / "tensorboard" / phase.name):
        # restored with the checkpoint it resumes from (one older parpkit wrote has none: the updates before it go uncounted)
        loss = s.extra.setdefault("loss", {}).setdefault(phase.name, {"sum": 0.0, "updates": 0})
        driver = PhaseDriver(schedule, s.resolved.criterion, pruner, s.log, task, offset, r.training, validate,
                             r.evaluation.every_steps, s.distiller, s.resolved.backbone, loss,
                             warn=(lambda message: warn(s, message)) if s.main else None)
        served = r.dataset.augment or r.dataset.concatenate
        train = (AugmentedDataset(s.train, r.dataset.augment, r.seed, r.dataset.concatenate) if served
                 else ListDataset(s.train))
        trainer = trainer_class()(model=s.model, args=args, train_dataset=train,
                                  data_collator=s.resolved.backbone.collate,
                                  callbacks=[*callbacks(driver, s.state, index, r.training.keep_checkpoints), *extra_callbacks])
        trainer.remove_callback(PrinterCallback)  # progress and the JSONL log report instead
        trainer.parp = driver
        if resume_ckpt is not None:
            task.advance(int(resume_ckpt.name.split("-")[-1]))
        try:
            result = trainer.train(resume_from_checkpoint=str(resume_ckpt) if resume_ckpt else None)
        except NonFiniteLoss as exc:
            # the newest complete checkpoint that is still as it was written (checksums), as resuming picks it
            good = next((p for p in reversed(checkpoints(phase_dir)) if is_complete(p) and problem(p) is None), None)
            keep = f"the last good checkpoint is {good}" if good else "no usable checkpoint was written yet"
            s.log.write("error", step=exc.step, message=str(exc))
            raise ParpkitError(f"{exc}; stopped, {keep}. Rerunning unchanged resumes there, on the same data "
                               "order, and likely meets the same loss; to train with a lower learning rate or "
                               "max_grad_norm (a changed recipe), pass --fresh or a new --output-dir") from None
    s.seconds["train"] += time.time() - t0
    s.training_since = None
    driver.settle_loss(trainer.accelerator)
    # the Trainer's train_loss covers this sitting's updates only (none, for a run killed after its last checkpoint)
    s.log.write("phase", phase=phase.name, **{**{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
                                              "train_loss": phase_loss(loss), "train_loss_updates": loss["updates"]})
    s.model = trainer.model


# ------------------------------------------------------------------------------------------ shared phases


def phase_loss(loss: dict) -> float | None:
    """The mean training loss over the updates ``loss`` counted (``extra["loss"]``); None where it counted none."""
    return loss["sum"] / loss["updates"] if loss["updates"] else None


def phase_key(s: Session, index: int) -> dict | None:
    """Everything that determines phase ``index``'s trained weights and its stage's scores, when the
    schedule says the phase can be shared (``Schedule.phase_key``); None otherwise."""
    phase = s.phases[index]
    k = s.resolved.schedule.phase_key(index, phase)
    r = s.recipe
    if k is None or (r.evaluation.keep_best and index == len(s.phases) - 1):
        return None  # keep_best keeps weights of the last phase only: another run's phase would not have them
    dump = lambda section: section.model_dump(mode="json", exclude_defaults=True)  # noqa: E731  (new keys keep old entries)
    return {"schedule": k, "steps": phase.steps, "seed": r.seed, "backbone": dump(r.backbone), "dataset": dump(r.dataset),
            # (max_steps too: the phase's own steps are in the key)
            "training": {k: v for k, v in dump(r.training).items() if k not in BOOKKEEPING | {"max_steps"}},
            "pool": {"include": r.pruning.include, "exclude": r.pruning.exclude, "scope": r.pruning.scope,
                     "criterion": dump(r.pruning.criterion), **calibration_key(s)},
            "evaluation": dump(r.evaluation), "world_size": s.world_size,
            "distillation": None if r.distillation is None else r.distillation.model_dump(mode="json"),
            **read_contents(s)}


def calibration_key(s: Session) -> dict[str, Any]:
    """What of the calibration set and the pattern shapes the masks: in full for activation-aware criteria
    (their phases from before the calibration set existed are never taken), nothing otherwise."""
    p = s.recipe.pruning
    key: dict[str, Any] = {"pattern": p.pattern} if p.pattern is not None else {}
    if s.resolved.criterion.needs == "activations":
        key["calibration"] = {**p.calibration.model_dump(mode="json"), "split": p.calibration.split or s.recipe.dataset.train_split}
    return key


def read_contents(s: Session) -> dict[str, Any]:
    """What every shared key holds beside the recipe: parpkit's version and the digests of what the run read."""
    return {"parpkit": parpkit.version.__version__, "contents": dict(sorted(s.contents.items()))}


def store_shared_phase(s: Session, index: int, folder: Path) -> None:
    phase = s.phases[index]
    tree, tensors = split_tensors({"pruner": s.pruner.state_dict(), "criterion": s.resolved.criterion.state_dict()})
    save_file(tensors, str(folder / "state.safetensors"))
    save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in s.model.state_dict().items()},
              str(folder / "weights.safetensors"))
    loss = s.extra["loss"].get(phase.name)
    (folder / "phase.json").write_text(json.dumps({
        "state": tree, "stage": s.stages.get(phase.stage) if phase.stage else None, "name": phase.name,
        "loss": loss, "train_loss": phase_loss(loss) if loss else None,  # the mean: what earlier parpkit reads
        "curve": [c for c in s.extra["curve"] if c["phase"] == index], "run": str(s.rundir.path)}))


def load_shared_phase(s: Session, index: int, folder: Path) -> None:
    """Take phase ``index``'s trained weights, pool and criterion state, and stage scores from another
    run that trained it identically. Stage sparsities are this run's own measurements."""
    phase = s.phases[index]
    meta = json.loads((folder / "phase.json").read_text())
    state = join_tensors(meta["state"], load_file(str(folder / "state.safetensors")))
    s.model.load_state_dict(load_file(str(folder / "weights.safetensors")))
    s.pruner.load_state_dict(state["pruner"])
    s.resolved.criterion.load_state_dict(state["criterion"])
    s.extra["curve"] += meta["curve"]
    if meta.get("loss") is not None:
        s.extra["loss"][phase.name] = meta["loss"]
    elif meta.get("train_loss") is not None:  # entries older parpkit wrote: the phase's mean, over all its updates
        s.extra["loss"][phase.name] = {"sum": meta["train_loss"] * phase.steps, "updates": phase.steps}
    if phase.stage:  # scored by the run that trained it, or (if it did not score it) here
        if meta["stage"] is not None:
            s.stages[phase.stage] = meta["stage"]
        else:
            s.resolved.schedule.before_evaluate(s.pruner)
            judge(s, phase.stage)
    s.extra.setdefault("shared_phases", []).append(phase.name)  # checkpoints before parpkit kept it have none
    s.log.write("shared", phase=phase.name, entry=str(folder), trained_by=meta["run"])
    s.progress.console.print(f"{phase.name}: trained identically by {meta['run']}; reusing it ({folder.name})",
                             soft_wrap=True, markup=False)


def dense_key(s: Session) -> dict:
    r = s.recipe
    return {"backbone": r.backbone.model_dump(mode="json", exclude_defaults=True), "dataset": r.dataset.name,
            "options": r.dataset.options, "splits": r.dataset.eval_splits,
            "evaluation": {"batch_size": r.evaluation.batch_size, "normalizer": r.evaluation.normalizer},
            **read_contents(s)}  # the training split too: a backbone may build its vocabulary from it


def judge_dense(s: Session) -> None:
    """The pretrained model's scores: the same for every run of a sweep, so computed once there."""
    if not s.main:
        return
    with s.shared.hold("dense", dense_key(s)) as entry:
        if entry is not None and entry.done:
            rates = json.loads((entry.path / "rates.json").read_text())
            shutil.copy2(entry.path / "transcripts.jsonl", s.rundir.path / "transcripts_dense.jsonl")
            record(s, "dense", rates)
            s.log.write("shared", stage="dense", entry=str(entry.path))
            return
        judge(s, "dense")
        if entry is not None:
            with entry.writing() as folder:
                (folder / "rates.json").write_text(json.dumps(s.stages["dense"]["splits"]))
                shutil.copy2(s.rundir.path / "transcripts_dense.jsonl", folder / "transcripts.jsonl")


# ------------------------------------------------------------------------------------------ validation

@torch.no_grad()
def validate_now(s: Session, step: int, phase: int) -> None:
    """Score the model as it would be judged now on the validation split, then put training back as it
    was (weights, masks): the learning curve does not change the run. Keeps the best checkpoint of the
    last phase when ``evaluation.keep_best``, among the points at the target sparsity (``at_target``)."""
    e, pruner = s.recipe.evaluation, s.pruner
    split = e.validation_split or s.recipe.dataset.eval_splits[0]
    weights = {n: p.detach().clone() for n, p in pruner.params.items()}
    state = pruner.state_dict()
    s.resolved.schedule.before_evaluate(pruner)
    t0 = time.time()
    rates = evaluate(s.resolved.backbone, s.resolved.dataset, s.model, s.validation, s.progress, f"validating at {step}",
                     s.device, e.batch_size, normalizer=e.normalizer, split=split)
    s.seconds["evaluate"] += time.time() - t0
    point = {"step": step, "phase": phase, "split": split, **rates, "sparsity": pruner.sparsity,
             "pool_sparsity": pruner.zero_fraction()}
    s.extra["curve"].append(point)
    s.log.write("validate", **point)
    key = next(iter(rates))  # wer (or per)
    best = s.extra["best"]
    if (e.keep_best and phase == len(s.phases) - 1 and at_target(s, pruner.sparsity)
            and (best is None or rates[key] < best["rates"][key])):
        s.extra["best"] = {"step": step, "rates": rates,
                           "weights": {k: v.detach().to("cpu", copy=True) for k, v in s.model.state_dict().items()}}
    for n, p in pruner.params.items():
        p.copy_(weights[n])
    pruner.load_state_dict(state)


def at_target(s: Session, sparsity: float) -> bool:
    """A learning-curve point may be the best checkpoint only when its masks are at the recipe's target
    sparsity (within one weight): a schedule that ramps (PARP-P, GMP) scores points below it on the way,
    and a sparser model is not comparable with them."""
    return abs(sparsity - s.recipe.pruning.sparsity) * s.pruner.size <= 1


# ------------------------------------------------------------------------------------------ judge

def judge(s: Session, stage: str) -> None:
    """Evaluate the model as it is now under ``stage`` on every evaluation split (main process only)."""
    if not s.main:
        return
    t0 = time.time()
    e = s.recipe.evaluation
    transcripts = s.rundir.path / f"transcripts_{stage}.jsonl"
    transcripts.unlink(missing_ok=True)
    rates = {split: evaluate(s.resolved.backbone, s.resolved.dataset, s.model, utts, s.progress,
                             stage if len(s.evals) == 1 else f"{stage} ({split})", s.device, e.batch_size, transcripts,
                             e.normalizer, split)
             for split, utts in s.evals.items()}
    s.seconds["evaluate"] += time.time() - t0
    record(s, stage, rates)


def record(s: Session, stage: str, rates: dict[str, dict[str, float]]) -> None:
    """A stage's scores; its top-level rates are the first split's, ``splits`` holds each split's."""
    with s.resolved.backbone.native(s.model):  # the model as judged (whisper: every position of its own window)
        model_sparsity = model_zero_fraction(s.model)
    s.stages[stage] = {**next(iter(rates.values())), "pool_sparsity": s.pruner.zero_fraction(),
                       "model_sparsity": model_sparsity, "splits": rates}
    s.log.write("evaluate", stage=stage, **s.stages[stage])


# ------------------------------------------------------------------------------------------ write

def mask_iou_initial(s: Session) -> float | None:
    """Intersection over union of the kept weights of the final and the first mask: how far the mask moved."""
    path = s.rundir.path / "masks_initial.safetensors"
    if s.pruner.masks is None or not path.exists():
        return None
    first = load_file(str(path))
    inter = sum(int((m.cpu() & first[n]).sum()) for n, m in s.pruner.masks.items())
    union = sum(int((m.cpu() | first[n]).sum()) for n, m in s.pruner.masks.items())
    return inter / union if union else 1.0


def write(s: Session) -> dict[str, Any]:
    """The run directory's results; returns the metrics (empty on other ranks than the main one)."""
    if not s.main:
        return {}
    r, pruner, rundir, backbone = s.recipe, s.pruner, s.rundir, s.resolved.backbone
    trained_at = backbone.settings(s.model)
    with backbone.native(s.model):  # the judged model, as it was judged (whisper: its own window)
        backbone.save(s.model, rundir.path / "model")
        judged_at = backbone.settings(s.model)
        parameters = sum(p.numel() for p in s.model.parameters())  # the saved model's, not the training window's
    if pruner.masks is not None:
        pruner.save_masks(rundir.path / "masks.safetensors")
    rows = pruner.per_tensor_rows()
    rundir.write_sparsity(rows)
    metrics = {
        "recipe": r.name,
        "plugins": {"backbone": r.backbone.name, "dataset": r.dataset.name,
                    "criterion": r.pruning.criterion.name, "schedule": r.pruning.schedule.name},
        "target_sparsity": r.pruning.sparsity, "scope": r.pruning.scope,
        "eval_split": r.dataset.eval_splits[0], "eval_utterances": len(next(iter(s.evals.values()))),
        "eval_splits": {k: len(v) for k, v in s.evals.items()}, "train_utterances": len(s.train),
        "model_parameters": parameters,
        "pool_parameters": pruner.size, "pool_tensors": len(s.pool),
        "pool_pruned": sum(row["zeros"] for row in rows),
        "dataset": s.resolved.dataset.report(),
        "phases": [{"name": p.name, "steps": p.steps} for p in s.phases],
        "steps": sum(p.steps for p in s.phases), "prunes": pruner.prune_count, "batch": batch_sizes(s),
        # the mean over every update trained (this run's or a shared phase's), in every sitting
        "train_loss": phase_loss(totals := {"sum": sum(v["sum"] for v in s.extra["loss"].values()),
                                            "updates": sum(v["updates"] for v in s.extra["loss"].values())}),
        "train_loss_updates": totals["updates"],
        "stages": s.stages,
        # what shapes the outputs: every stage was scored, and the model saved, at ``judged``; ``trained`` may
        # differ by speed settings only (whisper's encoder window)
        "backbone_settings": {"trained": trained_at, "judged": judged_at},
        "mask_iou_initial": mask_iou_initial(s),
        "curve": s.extra["curve"],
        "best": None if s.extra["best"] is None else {"step": s.extra["best"]["step"], **s.extra["best"]["rates"]},
        "shared_phases": s.extra.get("shared_phases", []),
        "distillation": None if r.distillation is None else {**r.distillation.model_dump(mode="json"), "teacher_loaded": False}
        if s.distiller is None else {
            **r.distillation.model_dump(mode="json"), "teacher_memory_mb": round(s.distiller.memory_mb, 1),
            "teacher_seconds": round(s.distiller.seconds, 4), "pseudo_labelled": s.pseudo_labelled},
        "wall_time_s": s.elapsed(),
        "environment": environment(),  # where it was scored (every attempt's: the log's "environment" events)
    }
    rundir.write_metrics(metrics)
    s.log.write("done", **metrics["wall_time_s"])
    return metrics
