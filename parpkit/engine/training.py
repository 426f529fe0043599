"""Trainer glue: one fine-tuning phase through the transformers ``Trainer`` (mixed precision, accumulation,
DDP, LR schedules, reporting integrations), with the schedule and criterion driven around each update.

Around one optimizer update: gradients ready (``ParpTrainer.training_step``, after the last micro-batch)
→ ``criterion.observe`` (gradients unscaled under fp16; not on an overflow step the scaler skips)
→ ``schedule.on_gradients`` → the Trainer clips → ``on_pre_optimizer_step`` →
update → ``on_optimizer_step``. Checkpoints add parpkit's state in the public ``on_save`` callback.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parpkit.engine.checkpoints import RunState, rotate
from parpkit.engine.rundir import JsonlLog
from parpkit.errors import ParpkitError
from parpkit.interfaces import Criterion, Schedule, Utterance
from parpkit.masks import PoolPruner
from parpkit.progress import Task
from parpkit.recipe import Recipe


class NonFiniteLoss(ParpkitError):
    def __init__(self, step: int, value: float):
        self.step, self.value = step, value
        super().__init__(f"the training loss became {value} at step {step}")


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Utterance]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Utterance:
        return self.items[i]


def effective_precision(precision: str) -> str:
    """``auto``: bf16 where a CUDA device computes in it, fp32 elsewhere (on a CPU without native bf16,
    autocast to bf16 is many times slower than fp32); the other settings as they are."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def training_arguments(recipe: Recipe, output_dir: Path, steps: int, group_by_length: bool = False):
    from transformers import TrainingArguments

    t = recipe.training
    precision = effective_precision(t.precision)
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        # tri_stage is built by ParpTrainer.create_scheduler; the name given here is never used
        lr_scheduler_type="constant" if t.lr_scheduler == "tri_stage" else t.lr_scheduler,
        lr_scheduler_kwargs={} if t.lr_scheduler == "tri_stage" else dict(t.lr_scheduler_kwargs),
        warmup_steps=min(t.warmup_steps, steps), weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, max_grad_norm=t.max_grad_norm,
        bf16=precision == "bf16", fp16=precision == "fp16", logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500, save_total_limit=None,
        eval_strategy="no", report_to=t.report_to, seed=recipe.seed, data_seed=recipe.seed,
        dataloader_num_workers=t.dataloader_workers, dataloader_pin_memory=torch.cuda.is_available(),
        # workers keep their state (feature caches) across epochs; not with augmentation, whose draws follow the
        # epoch the Trainer tells the dataset (set_epoch), which only workers started after it hear
        dataloader_persistent_workers=t.dataloader_workers > 0 and not (recipe.dataset.augment or recipe.dataset.concatenate),
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        remove_unused_columns=False, disable_tqdm=True,
        # several CPU processes (torchrun without GPUs): accelerate sets up gloo DDP only when told "cpu"; bf16
        # on a CPU (autocast): transformers refuses it unless told "cpu"
        use_cpu=not torch.cuda.is_available() and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or precision == "bf16"),
    )


@dataclass
class PhaseDriver:
    """What one phase's Trainer calls into: the schedule, criterion and pruner, the log and progress."""

    schedule: Schedule
    criterion: Criterion
    pruner: PoolPruner
    log: JsonlLog
    task: Task
    offset: int  # updates done in earlier phases
    training: Any = None  # the recipe's training section
    validate: Callable[[int], None] | None = None  # scores a learning-curve point at a step
    every: int | None = None  # … every this many steps
    distiller: Any = None  # parpkit.engine.distill.Distiller, when the recipe distils
    backbone: Any = None  # turns a batch on the device into model inputs (Backbone.model_inputs); None: as it is
    loss: dict | None = None  # the phase's running loss, {"sum", "updates"}, kept in the checkpoints (extra_defaults)
    loss_pending: float = 0.0  # this process's losses since the last settle_loss
    warn: Callable[[str], None] | None = None  # a warning for the log and the console (the main process only)
    reach_checked: bool = False  # the first re-prune that measured its reach was looked at (check_reach)

    def settle_loss(self, accelerator: Any) -> None:
        """Add the losses this process summed since the last call to the phase's, averaged over the processes
        (each saw micro-batches of its own): at each checkpoint and at the phase's end, where every process calls
        it, so that a checkpoint holds the same total a run left alone would have there."""
        if self.loss is None:
            return
        pending = self.loss_pending
        if accelerator.num_processes > 1:
            pending = float(accelerator.reduce(torch.tensor([pending], device=accelerator.device), reduction="mean")[0])
        self.loss["sum"] += pending
        self.loss_pending = 0.0

    def gradients_ready(self, done: int, scaler: Any = None, others: Iterable[torch.nn.Parameter] = ()) -> None:
        """``done``: updates of this phase finished before the coming one. ``scaler``: the fp16 loss scaler
        (None without one); ``others``: every parameter the optimizer updates (the scaler checks them all).
        The criterion sees the gradients unscaled, and nothing of an update the scaler will skip."""
        step = self.offset + done
        with unscaled_gradients(self.pruner.params, scaler, others) as finite:
            if finite:
                self.criterion.observe(step, self.pruner.params)
            else:
                self.log.write("overflow", step=step + 1, scale=float(scaler.get_scale()))
        self.schedule.on_gradients(step, self.pruner)

    def log_prune(self, step: int) -> None:
        event = self.pruner.prune_event()
        self.log.write("prune", step=step, **event)
        self.check_reach(step, event)

    def check_reach(self, step: int, event: Mapping[str, Any]) -> None:
        """At the phase's first re-prune that measured how near the mask came to moving (global magnitude
        ranking) and whose pruned weights were free to grow back: where it let nothing back and an interval as
        long at the peak learning rate reaches under half the smallest kept weight, warn that re-pruning will
        likely keep the first mask. Adam moves a weight by about the learning rate an update at most, so nothing
        zeroed can pass that weight before the next re-prune; the run is then a fixed-mask run with noise
        (docs/explanation/methods.md)."""
        kept, lr_sum, updates = event.get("kept_min"), event.get("lr_sum"), self.pruner.reach_updates
        if self.reach_checked or kept is None or lr_sum is None or not updates or self.training is None:
            return
        if not event.get("pruned_max"):  # pruned weights were held at zero (gmp, a fixed mask): none could come back
            return
        self.reach_checked = True
        peak = self.training.learning_rate
        if event.get("regrown") != 0 or updates * peak >= kept / 2 or self.warn is None:
            return
        self.warn(f"the re-prune at update {step} let no weight back, and the mask is unlikely to move: the largest "
                  f"pruned weight grew to {event.get('pruned_max'):.2g} against a smallest kept weight of {kept:.2g}. "
                  f"Adam moves a weight by about the learning rate an update at most (these {updates} updates' rates "
                  f"sum to {lr_sum:.2g}), so {updates} updates at the peak rate, {peak:g}, reach about "
                  f"{updates * peak:.2g}, under half of it: re-prunes will likely keep the first mask, as a fixed "
                  "mask would. A larger learning rate or re-prune interval lets weights back (docs/explanation/methods.md)")


@contextlib.contextmanager
def unscaled_gradients(params: Mapping[str, torch.nn.Parameter], scaler: Any,
                       others: Iterable[torch.nn.Parameter] = ()) -> Iterator[bool]:
    """Gradients as the loss gives them, for criteria. Under fp16 the Trainer's loss scaler has multiplied
    every gradient by its scale and unscales them only when it clips, after criteria have looked: for the
    duration, ``params``' gradients are divided by the scale (and multiplied back after, exactly: the
    scaler's scales are powers of two). Yields False, touching nothing, when any gradient (of ``params``
    or ``others``) is not finite: the scaler skips that update and lowers its scale, and no criterion
    should count it. Without a scaler (fp32, bf16): yields True, touching nothing."""
    if scaler is None or not scaler.is_enabled():
        yield True
        return
    unique = lambda ps: list({id(p): p for p in ps if p.grad is not None}.values())  # noqa: E731
    pool = unique(params.values())
    grads = [p.grad for p in unique([*pool, *others])]
    if grads and not bool(torch.stack([g.isfinite().all() for g in grads]).all()):
        yield False
        return
    scale = float(scaler.get_scale())
    for p in pool:
        p.grad.div_(scale)
    try:
        yield True
    finally:
        for p in pool:
            p.grad.mul_(scale)


def trainer_class():
    from transformers import Trainer

    class ParpTrainer(Trainer):
        """The Trainer, plus the gradient hooks and a stop on a non-finite loss before the bad update."""

        parp: PhaseDriver

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Every backbone's loss (whisper's, CTC's, the distillation's) is a mean over its micro-batch. A model
            # whose forward takes **kwargs would be handed the accumulated batch's token count, and the Trainer
            # would take its loss as already divided by it and sum the micro-batches' means: the gradient, its
            # clipping and the logged loss all times the accumulation steps. So the Trainer counts no tokens and
            # divides by the accumulation steps itself.
            self.model_accepts_loss_kwargs = False

        def _get_train_sampler(self, train_dataset=None):
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            from transformers.trainer_pt_utils import LengthGroupedSampler

            dataset = train_dataset or self.train_dataset  # utterances: their lengths are their audio's
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps, dataset=dataset,
                                        lengths=[len(u.audio) for u in dataset.items])

        def create_scheduler(self, num_training_steps, optimizer=None):
            t = self.parp.training
            if t.lr_scheduler == "tri_stage" and self.lr_scheduler is None:
                from parpkit.lr import make_tri_stage

                self.lr_scheduler = make_tri_stage(optimizer or self.optimizer, num_training_steps, t.lr_scheduler_kwargs)
                return self.lr_scheduler
            return super().create_scheduler(num_training_steps, optimizer)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            distiller, backbone = self.parp.distiller, self.parp.backbone
            # on the training device: the backbone drops its extras and finishes the inputs (whisper's log-mel
            # features where they are computed on the device), once for the student and the teacher
            model_inputs = backbone.model_inputs(inputs) if backbone is not None else dict(inputs)
            if distiller is None:
                return super().compute_loss(model, model_inputs, return_outputs, num_items_in_batch)
            student_inputs = {**model_inputs, "output_hidden_states": True} if distiller.settings.hidden_weight else model_inputs
            task, outputs = super().compute_loss(model, student_inputs, return_outputs=True)  # a mean over the batch
            extras = {k: v for k, v in inputs.items() if k in getattr(backbone, "batch_extras", ())}
            loss = distiller.loss(task, outputs, {**model_inputs, **extras})  # output_mask may read the extras
            return (loss, outputs) if return_outputs else loss

        def _save_checkpoint(self, model, trial):
            self.parp.settle_loss(self.accelerator)  # every process, before the callbacks write parpkit's state
            return super()._save_checkpoint(model, trial)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                raise NonFiniteLoss(self.parp.offset + self.state.global_step + 1, float(loss))
            if self.parp.loss is not None:  # a micro-batch's loss, divided by the accumulation steps: summed per update
                self.parp.loss_pending += float(loss)
                self.parp.loss["updates"] += int(self.accelerator.sync_gradients)
            self.parp.pruner.optimizer = self.optimizer
            if self.accelerator.sync_gradients:  # the last micro-batch: gradients are complete (and all-reduced)
                scaler = getattr(self.accelerator, "scaler", None)  # fp16 only: the other parameters matter to it alone
                optimized = [p for g in self.optimizer.param_groups for p in g["params"]] if scaler is not None else ()
                self.parp.gradients_ready(self.state.global_step, scaler, optimized)
            return loss

    return ParpTrainer


def callbacks(driver: PhaseDriver, state: RunState, phase: int, keep_checkpoints: int) -> list:
    from transformers import TrainerCallback

    class ScheduleCallback(TrainerCallback):
        """Drives the schedule around optimizer steps and logs every (re-)prune."""

        def on_train_begin(self, args, st, control, **kw):
            # a resumed Trainer takes its logging and checkpoint intervals from the checkpoint's state: the
            # recipe's own apply (a run may resume with checkpoints written more often: recipe.BOOKKEEPING)
            st.compute_steps(args, st.max_steps)

        def on_pre_optimizer_step(self, args, st, control, **kw):
            driver.schedule.on_pre_optimizer_step(driver.offset + st.global_step, driver.pruner)

        def on_optimizer_step(self, args, st, control, **kw):
            # the Trainer counts this update only after the callback: pass the count including it
            step = driver.offset + st.global_step + 1
            optimizer = driver.pruner.optimizer  # set by training_step before every update
            if optimizer is not None:  # the rate of the update just made (the LR scheduler steps after this)
                driver.pruner.note_update(max(g["lr"] for g in optimizer.param_groups))
            before = driver.pruner.prune_count
            driver.schedule.on_optimizer_step(step, driver.pruner)
            if driver.pruner.prune_count != before:
                driver.log_prune(step)

        def on_train_end(self, args, st, control, **kw):
            driver.pruner.optimizer = None

    class FrozenStart(TrainerCallback):
        """``training.freeze_transformer_steps``: only the output layer trains for the phase's first updates.
        Frozen after the optimizer is built (so it holds every weight), thawed after the last frozen update and
        at the end of the phase, whatever happens (the next phase's optimizer takes only trainable weights)."""

        def __init__(self):
            self.frozen: list[torch.nn.Parameter] = []

        def on_train_begin(self, args, st, control, **kw):
            steps = driver.training.freeze_transformer_steps
            if st.global_step < steps:  # a resumed phase past its frozen start trains everything
                model = driver.pruner.model
                head = driver.backbone.output_layer(model) if driver.backbone is not None else model.get_output_embeddings()
                self.frozen = freeze_all_but(model, head)
                driver.log.write("freeze", step=driver.offset + st.global_step, until=driver.offset + steps,
                                 frozen=sum(p.numel() for p in self.frozen))

        def thaw(self, step: int) -> None:
            if self.frozen:
                for p in self.frozen:
                    p.requires_grad_(True)
                driver.log.write("thaw", step=step, thawed=sum(p.numel() for p in self.frozen))
                self.frozen = []

        def on_optimizer_step(self, args, st, control, **kw):
            if st.global_step + 1 >= driver.training.freeze_transformer_steps:  # the update just made counts
                self.thaw(driver.offset + st.global_step + 1)

        def on_train_end(self, args, st, control, **kw):
            self.thaw(driver.offset + st.global_step)

    class ProgressCallback(TrainerCallback):
        def on_step_end(self, args, st, control, **kw):
            driver.task.advance()
            step = driver.offset + st.global_step
            if driver.validate is not None and step % driver.every == 0:
                driver.validate(step)

        def on_log(self, args, st, control, logs=None, **kw):
            logs = dict(logs or {})
            driver.log.write("train", step=driver.offset + st.global_step, **logs)
            if isinstance(logs.get("loss"), float) and math.isfinite(logs["loss"]):
                driver.task.update(info=f"loss {logs['loss']:.3f}")

    class CheckpointCallback(TrainerCallback):
        """After the Trainer saved ``checkpoint-N``: add parpkit's state, mark it complete, rotate."""

        def on_save(self, args, st, control, **kw):
            if args.should_save:
                phase_dir = Path(args.output_dir)
                state.write(phase_dir / f"checkpoint-{st.global_step}", phase=phase, offset=driver.offset)
                rotate(phase_dir, keep_checkpoints)

    frozen = [FrozenStart()] if driver.training is not None and driver.training.freeze_transformer_steps else []
    return [ScheduleCallback(), ProgressCallback(), CheckpointCallback(), *frozen]


def freeze_all_but(model: torch.nn.Module, head: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    """Stop gradients to every trainable weight of ``model`` but ``head``'s (the output layer, with any weight
    tied to it: whisper's token embedding); returns the weights it froze, to thaw them later."""
    if head is None:
        raise ParpkitError(f"training.freeze_transformer_steps: {type(model).__name__} names no output layer to train "
                           "alone")
    keep = {id(p) for p in head.parameters()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


@contextlib.contextmanager
def tensorboard_dir(report_to: Any, directory: Path) -> Iterator[None]:
    """TensorBoard's Trainer integration writes under the phase's output folder unless told otherwise:
    point it at the run directory's ``tensorboard/<phase>`` (a user's TENSORBOARD_LOGGING_DIR wins)."""
    wanted = report_to in ("all", "tensorboard") or (isinstance(report_to, list) and {"all", "tensorboard"} & set(report_to))
    if not wanted or "TENSORBOARD_LOGGING_DIR" in os.environ:
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(directory)
    try:
        yield
    finally:
        os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
