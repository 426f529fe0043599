"""One pruning run: dense evaluation, initial prune, fine-tuning under the schedule, final evaluation,
and a run directory other tools can read.

Training goes through the transformers ``Trainer`` (mixed precision, accumulation, DDP, LR schedules);
the schedule is driven from Trainer callbacks around each optimizer step. Evaluation decodes with the
backbone's ``transcribe`` (``generate`` for seq2seq models), never on logits.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from parpkit.errors import ParpkitError
from parpkit.interfaces import Utterance
from parpkit.masks import Pruner, model_zero_fraction
from parpkit.metrics import error_rates
from parpkit.progress import Progress
from parpkit.resolve import Resolved


class JsonlLog:
    def __init__(self, path: Path):
        self.path = path
        self.start = time.time()

    def write(self, event: str, **fields: Any) -> None:
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


def _training_arguments(resolved: Resolved, run_dir: Path):
    from transformers import TrainingArguments

    t, r = resolved.recipe.training, resolved.recipe
    return TrainingArguments(
        output_dir=str(run_dir / "trainer"), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, max_grad_norm=t.max_grad_norm,
        bf16=t.precision == "bf16", fp16=t.precision == "fp16", logging_steps=t.logging_steps,
        save_strategy="no", eval_strategy="no", report_to="none", seed=r.seed, data_seed=r.seed,
        dataloader_num_workers=t.dataloader_workers, dataloader_pin_memory=torch.cuda.is_available(),
        remove_unused_columns=False, disable_tqdm=True,
    )


def _callbacks_module():
    from transformers import TrainerCallback

    class ScheduleCallback(TrainerCallback):
        """Drives the schedule around optimizer steps and logs every (re-)prune."""

        def __init__(self, schedule, pruner: Pruner, log: JsonlLog):
            self.schedule, self.pruner, self.log = schedule, pruner, log

        def _logged(self, step: int, fn, *args) -> None:
            before = self.pruner.prune_count
            fn(*args)
            if self.pruner.prune_count != before:
                self.log.write("prune", step=step, sparsity=self.pruner.sparsity, pool_zero_fraction=self.pruner.zero_fraction())

        def on_pre_optimizer_step(self, args, state, control, **kw):
            self.schedule.on_pre_optimizer_step(state.global_step, self.pruner)

        def on_optimizer_step(self, args, state, control, **kw):
            # the Trainer counts this update only after the callback: pass the count including it
            self._logged(state.global_step + 1, self.schedule.on_optimizer_step, state.global_step + 1, self.pruner)

    class ProgressCallback(TrainerCallback):
        def __init__(self, task, log: JsonlLog):
            self.task, self.log = task, log

        def on_step_end(self, args, state, control, **kw):
            self.task.advance()

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            self.log.write("train", step=state.global_step, **logs)
            loss = logs.get("loss")
            if loss is not None:
                if not math.isfinite(loss):
                    raise ParpkitError(f"training loss became {loss} at step {state.global_step}; lower the learning rate")
                self.task.update(info=f"loss {loss:.3f}")

    return ScheduleCallback, ProgressCallback


def evaluate(resolved: Resolved, model: torch.nn.Module, utterances: Sequence[Utterance], progress: Progress,
             label: str, device: torch.device, transcripts: Path | None = None) -> dict[str, float]:
    """WER/CER of ``model`` on ``utterances``, decoding in batches."""
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
            for u, h in zip(utterances, hyps):
                f.write(json.dumps({"id": u.id, "reference": u.text, "hypothesis": h}) + "\n")
    return rates


def run(resolved: Resolved, progress: Progress, *, output_dir: Path | None = None,
        resolved_mapping: dict | None = None, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run a recipe end to end; returns the metrics also written to ``metrics.json``."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    recipe = resolved.recipe
    run_dir = Path(output_dir or recipe.run_dir())
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", "log.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)
    mapping = resolved_mapping if resolved_mapping is not None else recipe.model_dump(mode="json")
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))
    log = JsonlLog(run_dir / "log.jsonl")
    t0 = time.time()
    torch.manual_seed(recipe.seed)

    train = resolved.dataset.load_split(recipe.dataset.train_split, progress)
    test = resolved.dataset.load_split(recipe.dataset.eval_split, progress)
    log.write("data", train=len(train), eval=len(test), eval_split=recipe.dataset.eval_split, **resolved.dataset.report())
    resolved.backbone.prepare(train, resolved.dataset.unit)
    model = resolved.backbone.load()
    pool = resolved.select_pool(model)
    pruner = Pruner(model, pool, resolved.criterion, recipe.pruning.scope)
    args = _training_arguments(resolved, run_dir)
    device = args.device
    main = args.process_index == 0
    log.write("model", parameters=sum(p.numel() for p in model.parameters()), pool_tensors=len(pool), pool_parameters=pruner.size)

    stages: dict[str, dict] = {}
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

    if recipe.evaluation.dense:
        judge("dense")
    resolved.schedule.on_start(pruner)
    log.write("prune", step=0, sparsity=pruner.sparsity, pool_zero_fraction=pruner.zero_fraction())
    if recipe.evaluation.after_prune:
        judge("after_prune")

    ScheduleCallback, ProgressCallback = _callbacks_module()
    t_train = time.time()
    with progress.task("fine-tuning", total=recipe.training.max_steps) as task:
        trainer = Trainer(model=model, args=args, train_dataset=_ListDataset(train),
                          data_collator=resolved.backbone.collate,
                          callbacks=[ScheduleCallback(resolved.schedule, pruner, log), ProgressCallback(task, log), *callbacks])
        trainer.remove_callback(PrinterCallback)  # progress and the JSONL log report instead
        result = trainer.train()
    train_time = time.time() - t_train
    model = trainer.model
    resolved.schedule.before_evaluate(pruner)
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
            "steps": int(result.global_step), "prunes": pruner.prune_count, "train_loss": float(result.training_loss),
            "stages": stages,
            "wall_time_s": {"total": round(time.time() - t0, 1), "train": round(train_time, 1), "evaluate": round(eval_time, 1)},
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.write("done", **metrics["wall_time_s"])
    return metrics
