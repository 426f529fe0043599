"""One pruning run: dense evaluation, initial prune, fine-tuning phases under the schedule, final
evaluation, and a run directory other tools can read.

Training goes through the transformers ``Trainer`` (mixed precision, accumulation, DDP, LR schedules);
the schedule is driven from Trainer callbacks around each optimizer step. Evaluation decodes with the
backbone's ``transcribe`` (``generate`` for seq2seq models), never on logits.

Nothing is lost on a crash: checkpoints (every ``training.save_steps``) hold the Trainer's state plus the
masks, the schedule's state and the stages evaluated so far, and count only once their ``COMPLETE``
marker is written; the end of every phase is kept the same way. Re-running into the same directory
resumes from the newest complete one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from parpkit.errors import ParpkitError
from parpkit.interfaces import Utterance
from parpkit.masks import Pruner, load_donor_masks, model_zero_fraction
from parpkit.metrics import error_rates
from parpkit.progress import Progress
from parpkit.resolve import Resolved
from parpkit.structure import restrict

MARKER = "COMPLETE"


class JsonlLog:
    """One JSON object per line; only the main process writes."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.start = time.time()

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        row = {"event": event, "time_s": round(time.time() - self.start, 3), **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[Utterance]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Utterance:
        return self.items[i]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _training_arguments(resolved: Resolved, output_dir: Path, steps: int):
    from transformers import TrainingArguments

    t, r = resolved.recipe.training, resolved.recipe
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=min(t.warmup_steps, steps), weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, max_grad_norm=t.max_grad_norm,
        bf16=t.precision == "bf16", fp16=t.precision == "fp16", logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500, save_total_limit=None,
        eval_strategy="no", report_to="none", seed=r.seed, data_seed=r.seed,
        dataloader_num_workers=t.dataloader_workers, dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False, disable_tqdm=True,
        # several CPU processes (torchrun without GPUs): accelerate sets up gloo DDP only when told "cpu"
        use_cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
    )


class _State:
    """What a checkpoint adds to the Trainer's: masks, schedule state, stages, phase, step offset."""

    def __init__(self, pruner: Pruner, schedule, stages: dict):
        self.pruner, self.schedule, self.stages = pruner, schedule, stages

    def write(self, directory: Path, *, phase: int, offset: int, weights: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MARKER).unlink(missing_ok=True)
        masks, info = self.pruner.state()
        if masks:
            save_file(masks, str(directory / "parpkit_masks.safetensors"))
        if weights:
            state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.pruner.model.state_dict().items()}
            save_file(state, str(directory / "weights.safetensors"))
        (directory / "parpkit_state.json").write_text(json.dumps({
            "phase": phase, "offset": offset, "pruner": info, "schedule": self.schedule.state_dict(), "stages": self.stages}))
        _atomic_write(directory / MARKER, "ok\n")  # last: a checkpoint without it is never used

    def read(self, directory: Path) -> dict:
        meta = json.loads((directory / "parpkit_state.json").read_text())
        masks_path = directory / "parpkit_masks.safetensors"
        self.pruner.load_state(load_file(str(masks_path)) if masks_path.exists() else {}, meta["pruner"])
        self.schedule.load_state_dict(meta["schedule"])
        self.stages.clear()
        self.stages.update(meta["stages"])
        if (directory / "weights.safetensors").exists():
            self.pruner.model.load_state_dict(load_file(str(directory / "weights.safetensors")))
        return meta


def _complete(directory: Path) -> bool:
    return (directory / MARKER).is_file()


def _checkpoints(phase_dir: Path) -> list[Path]:
    found = [p for p in phase_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _rotate(phase_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older and incomplete ones before them."""
    ckpts = _checkpoints(phase_dir)
    complete = [p for p in ckpts if _complete(p)]
    if len(complete) <= keep:
        return
    cutoff = int(complete[-keep].name.split("-")[-1])
    for p in ckpts:
        if int(p.name.split("-")[-1]) < cutoff:
            shutil.rmtree(p, ignore_errors=True)


def _trainer_class():
    from transformers import Trainer

    class ParpTrainer(Trainer):
        """The Trainer, plus parpkit state in every checkpoint and a stop on a non-finite loss."""

        parp_state: _State
        parp_phase: int
        parp_offset: int
        parp_keep: int

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                phase_dir = Path(self._get_output_dir(trial=trial))
                self.parp_state.write(phase_dir / f"checkpoint-{self.state.global_step}", phase=self.parp_phase,
                                      offset=self.parp_offset)
                _rotate(phase_dir, self.parp_keep)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                step = self.parp_offset + self.state.global_step + 1
                raise NonFiniteLoss(step, float(loss))
            return loss

    return ParpTrainer


class NonFiniteLoss(ParpkitError):
    def __init__(self, step: int, value: float):
        self.step, self.value = step, value
        super().__init__(f"the training loss became {value} at step {step}")


def _callbacks(schedule, pruner: Pruner, log: JsonlLog, task, offset: int):
    from transformers import TrainerCallback

    class ScheduleCallback(TrainerCallback):
        """Drives the schedule around optimizer steps and logs every (re-)prune."""

        def on_pre_optimizer_step(self, args, state, control, **kw):
            schedule.on_pre_optimizer_step(offset + state.global_step, pruner)

        def on_optimizer_step(self, args, state, control, **kw):
            # the Trainer counts this update only after the callback: pass the count including it
            step = offset + state.global_step + 1
            before = pruner.prune_count
            schedule.on_optimizer_step(step, pruner)
            if pruner.prune_count != before:
                log.write("prune", step=step, sparsity=pruner.sparsity, pool_zero_fraction=pruner.zero_fraction())

    class ProgressCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            task.advance()

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            log.write("train", step=offset + state.global_step, **logs)
            if isinstance(logs.get("loss"), float) and math.isfinite(logs["loss"]):
                task.update(info=f"loss {logs['loss']:.3f}")

    return [ScheduleCallback(), ProgressCallback()]


def evaluate(resolved: Resolved, model: torch.nn.Module, utterances: Sequence[Utterance], progress: Progress,
             label: str, device: torch.device, transcripts: Path | None = None) -> dict[str, float]:
    """Error rates of ``model`` on ``utterances``, decoding in batches."""
    batch_size = resolved.recipe.evaluation.batch_size
    was_training = model.training
    model.eval()
    model.to(device)
    hyps: list[str] = []
    with progress.task(f"evaluating {label}", total=len(utterances)) as task:
        for i in range(0, len(utterances), batch_size):
            chunk = utterances[i:i + batch_size]
            hyps += resolved.backbone.transcribe(model, [u.audio for u in chunk])
            task.advance(len(chunk))
    if was_training:
        model.train()
    ds = resolved.dataset
    rates = error_rates([ds.score_text(u.text) for u in utterances], [ds.score_text(h) for h in hyps], ds.unit)
    if transcripts is not None:
        with transcripts.open("w") as f:
            for u, h in zip(utterances, hyps, strict=True):
                f.write(json.dumps({"id": u.id, "reference": u.text, "hypothesis": h}) + "\n")
    return rates


def _find_resume_point(ckpt_root: Path, n_phases: int) -> tuple[int, Path | None, Path | None]:
    """(first phase to train, its checkpoint to resume or None, phase boundary to restore or None)."""
    boundary, start = None, 0
    for i in range(n_phases):
        end = ckpt_root / f"phase-{i}" / "end"
        if _complete(end):
            boundary, start = end, i + 1
    if start < n_phases:
        complete = [p for p in _checkpoints(ckpt_root / f"phase-{start}") if _complete(p)]
        if complete:
            return start, complete[-1], boundary
    return start, None, boundary


def run(resolved: Resolved, progress: Progress, *, output_dir: Path | None = None, resolved_mapping: dict | None = None,
        callbacks: Sequence[Any] = (), fresh: bool = False, resume: bool = False) -> dict[str, Any]:
    """Run a recipe end to end (or resume it); returns the metrics also written to ``metrics.json``."""
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    recipe = resolved.recipe
    run_dir = Path(output_dir or recipe.run_dir())
    mapping = resolved_mapping if resolved_mapping is not None else recipe.model_dump(mode="json")
    recipe_text = yaml.safe_dump(mapping, sort_keys=False)
    ckpt_root = run_dir / "checkpoints"
    probe = _training_arguments(resolved, run_dir, 1)  # sets up the process group under torchrun/accelerate
    device, main = probe.device, probe.process_index == 0
    if fresh and main:
        for stale in ("metrics.json", "log.jsonl", "recipe.yaml"):
            (run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(ckpt_root, ignore_errors=True)
    elif not fresh and (run_dir / "recipe.yaml").exists() and (run_dir / "recipe.yaml").read_text() != recipe_text:
        raise ParpkitError(f"{run_dir} holds a run of a different recipe; pass --fresh to start it over, or --output-dir "
                           "for a new directory")
    elif not fresh and (run_dir / "metrics.json").exists():
        progress.console.print(f"{run_dir}: this run is complete (pass --fresh to run it again)", soft_wrap=True, markup=False)
        return json.loads((run_dir / "metrics.json").read_text()) if main else {}
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.yaml").write_text(recipe_text)
    log = JsonlLog(run_dir / "log.jsonl", enabled=main)
    t0 = time.time()
    torch.manual_seed(recipe.seed)

    train = resolved.dataset.load_split(recipe.dataset.train_split, progress)
    test = resolved.dataset.load_split(recipe.dataset.eval_split, progress)
    log.write("data", train=len(train), eval=len(test), eval_split=recipe.dataset.eval_split, **resolved.dataset.report())
    resolved.backbone.prepare(train, resolved.dataset.unit)
    model = resolved.backbone.load()
    pool = resolved.select_pool(model)
    groups = restrict(resolved.backbone.structured_groups(model), set(pool)) if resolved.criterion.structured else []
    donor = None
    if recipe.pruning.mask_from:
        if not resolved.schedule.accepts_mask_from:
            raise ParpkitError(f"schedule {recipe.pruning.schedule.name!r} finds its own masks; pruning.mask_from "
                               "works with parp, parp_progressive and fixed")
        params = dict(model.named_parameters())
        donor = load_donor_masks(recipe.pruning.mask_from, {n: params[n] for n in pool}, file=resolved.file)
    pruner = Pruner(model, pool, resolved.criterion, recipe.pruning.scope, groups=groups, donor_masks=donor)
    pruner.snapshot("pretrained")
    schedule = resolved.schedule
    phases = schedule.phases(recipe.training.max_steps)
    log.write("model", parameters=sum(p.numel() for p in model.parameters()), pool_tensors=len(pool), pool_parameters=pruner.size)

    stages: dict[str, dict] = {}
    state = _State(pruner, schedule, stages)
    eval_time = 0.0

    def judge(stage: str) -> None:
        nonlocal eval_time
        if not main:
            return
        t = time.time()
        rates = evaluate(resolved, model, test, progress, stage, device, run_dir / f"transcripts_{stage}.jsonl")
        eval_time += time.time() - t
        stages[stage] = {**rates, "pool_sparsity": pruner.zero_fraction(), "model_sparsity": model_zero_fraction(model)}
        log.write("evaluate", stage=stage, **stages[stage])

    start, resume_ckpt, boundary = (0, None, None) if fresh else _find_resume_point(ckpt_root, len(phases))
    resuming = boundary is not None or resume_ckpt is not None
    if resume and not resuming:
        raise ParpkitError(f"--resume: {run_dir} holds no complete checkpoint to resume from "
                           "(set training.save_steps to write them)")
    if resuming:
        for snap in sorted(ckpt_root.glob("snapshot-*.safetensors")):  # rewind points taken before the crash
            pruner.snapshots[snap.stem.removeprefix("snapshot-")] = load_file(str(snap))
        for directory in (boundary, resume_ckpt):
            if directory is not None:
                state.read(directory)
    pruner.on_snapshot = lambda name, tensors: main and save_file(tensors, str(_mkdir(ckpt_root) / f"snapshot-{name}.safetensors"))
    if not resuming:
        if main:
            shutil.rmtree(ckpt_root, ignore_errors=True)
        if recipe.evaluation.dense:
            judge("dense")
        schedule.on_start(pruner)
        if pruner.masks is not None:
            log.write("prune", step=0, sparsity=pruner.sparsity, pool_zero_fraction=pruner.zero_fraction())
            if recipe.evaluation.after_prune:
                judge("after_prune")
    else:
        log.write("resume", phase=start, checkpoint=str(resume_ckpt or boundary))
        progress.console.print(f"resuming from {resume_ckpt or boundary}", soft_wrap=True, markup=False)

    offset = sum(p.steps for p in phases[:start])
    total_loss, total_steps, train_time = 0.0, 0, 0.0
    Trainer = _trainer_class()
    for index in range(start, len(phases)):
        phase = phases[index]
        if resume_ckpt is None:
            schedule.on_phase_start(index, pruner)
        phase_dir = ckpt_root / f"phase-{index}"
        args = _training_arguments(resolved, phase_dir, phase.steps)
        t_train = time.time()
        label = "fine-tuning" if len(phases) == 1 else f"fine-tuning ({phase.name})"
        with progress.task(label, total=phase.steps) as task:
            trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(train), data_collator=resolved.backbone.collate,
                              callbacks=[*_callbacks(schedule, pruner, log, task, offset), *callbacks])
            trainer.remove_callback(PrinterCallback)  # progress and the JSONL log report instead
            trainer.parp_state, trainer.parp_phase, trainer.parp_offset = state, index, offset
            trainer.parp_keep = recipe.training.keep_checkpoints
            if resume_ckpt is not None:
                task.advance(int(resume_ckpt.name.split("-")[-1]))
            try:
                result = trainer.train(resume_from_checkpoint=str(resume_ckpt) if resume_ckpt else None)
            except NonFiniteLoss as exc:
                last = [p for p in _checkpoints(phase_dir) if _complete(p)]
                keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
                log.write("error", step=exc.step, message=str(exc))
                raise ParpkitError(f"{exc}; stopped, {keep}. Lower the learning rate or raise max_grad_norm "
                                   "limits, then rerun into this directory to resume") from None
        resume_ckpt = None
        train_time += time.time() - t_train
        total_loss += float(result.training_loss) * phase.steps
        total_steps += int(result.global_step)
        model = trainer.model
        if phase.stage:
            schedule.before_evaluate(pruner)
            judge(phase.stage)
        before = pruner.prune_count
        schedule.on_phase_end(index, pruner)
        if pruner.prune_count != before:
            log.write("prune", step=offset + phase.steps, sparsity=pruner.sparsity, pool_zero_fraction=pruner.zero_fraction())
            if main and index < len(phases) - 1:
                pruner.save_masks(run_dir / f"masks_{phase.name}.safetensors")
        offset += phase.steps
        if main and index < len(phases) - 1:
            state.write(phase_dir / "end", phase=index, offset=offset, weights=True)
    schedule.before_evaluate(pruner)
    judge("final")

    metrics: dict[str, Any] = {}
    if main:
        resolved.backbone.save(model, run_dir / "model")
        if pruner.masks is not None:
            pruner.save_masks(run_dir / "masks.safetensors")
        rows = pruner.per_tensor_rows()
        with (run_dir / "sparsity.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        metrics = {
            "recipe": recipe.name,
            "plugins": {"backbone": recipe.backbone.name, "dataset": recipe.dataset.name,
                        "criterion": recipe.pruning.criterion.name, "schedule": recipe.pruning.schedule.name},
            "target_sparsity": recipe.pruning.sparsity, "scope": recipe.pruning.scope,
            "eval_split": recipe.dataset.eval_split, "eval_utterances": len(test), "train_utterances": len(train),
            "model_parameters": sum(p.numel() for p in model.parameters()),
            "pool_parameters": pruner.size, "pool_tensors": len(pool),
            "pool_pruned": sum(r["zeros"] for r in rows),
            "dataset": resolved.dataset.report(),
            "phases": [{"name": p.name, "steps": p.steps} for p in phases],
            "steps": sum(p.steps for p in phases), "prunes": pruner.prune_count,
            "train_loss": total_loss / max(1, sum(p.steps for p in phases[start:])),
            "stages": stages,
            "wall_time_s": {"total": round(time.time() - t0, 1), "train": round(train_time, 1), "evaluate": round(eval_time, 1)},
        }
        _atomic_write(run_dir / "metrics.json", json.dumps(metrics, indent=2))
        log.write("done", **metrics["wall_time_s"])
    return metrics


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
