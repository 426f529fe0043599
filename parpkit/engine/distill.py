"""Distillation from the dense teacher: the loss mixes the task loss with the divergence between the
student's and the teacher's output distributions (whisper: the decoder's token distributions under
teacher forcing; CTC: the frame posteriors), optionally with hidden states matched layer by layer over
their real positions (``Backbone.hidden_mask``: padding left out).

The teacher is the pretrained model as loaded, before the first prune, or a model directory (or hub id)
that the backbone loads shaped as the student (``Backbone.load_teacher``: the same encoder window,
prompt …) after checking it can teach it (``Backbone.check_teacher``); frozen, in eval mode, in the
training precision, on the training device. It also transcribes training audio that comes without
transcripts, so that unlabelled recordings can be trained on.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from parpkit.engine.rundir import atomic_write
from parpkit.errors import ParpkitError, RecipeError
from parpkit.interfaces import Backbone, Utterance
from parpkit.progress import Progress
from parpkit.recipe import DistillationSection


@dataclass
class Distiller:
    teacher: torch.nn.Module
    backbone: Backbone
    settings: DistillationSection
    seconds: float = 0.0  # spent in teacher forward passes

    @property
    def memory_mb(self) -> float:
        tensors = list(self.teacher.parameters()) + list(self.teacher.buffers())
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values()) / 2**20

    def loss(self, task: torch.Tensor, student: Any, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(1 - w) * task + w * T^2 * KL(teacher || student) over real output positions, plus the hidden-state
        term. With w = 1 the task loss is left out altogether."""
        d = self.settings
        if d.weight == 0 and d.hidden_weight == 0:  # the teacher is here only to transcribe unlabelled audio
            return task
        started = time.perf_counter()
        with torch.no_grad():
            teacher = self.teacher(**self.backbone.model_inputs(inputs), output_hidden_states=d.hidden_weight > 0)
        self.seconds += time.perf_counter() - started
        t = d.temperature
        mask = self.backbone.output_mask(inputs, student.logits).to(student.logits.device)
        log_s = F.log_softmax(student.logits.float() / t, dim=-1)
        log_t = F.log_softmax(teacher.logits.float() / t, dim=-1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
        divergence = (kl * mask).sum() / mask.sum().clamp(min=1) * t * t
        loss = divergence if d.weight == 1 else (1 - d.weight) * task + d.weight * divergence
        if d.hidden_weight > 0:
            pairs = [(name, a, b) for name in ("hidden_states", "encoder_hidden_states", "decoder_hidden_states")
                     for a, b in zip(getattr(student, name, None) or (), getattr(teacher, name, None) or (), strict=True)]
            if not pairs:
                raise ParpkitError("distillation.hidden_weight: the model returns no hidden states to match")
            loss = loss + d.hidden_weight * sum(self.hidden_term(inputs, *pair) for pair in pairs) / len(pairs)
        return loss

    def hidden_term(self, inputs: Mapping[str, torch.Tensor], kind: str, student: torch.Tensor,
                    teacher: torch.Tensor) -> torch.Tensor:
        """Mean squared difference of one layer's hidden states over its real positions (the backbone's
        ``hidden_mask``: padded frames and tokens left out) and its features."""
        squared = (student.float() - teacher.float()).pow(2).mean(-1)  # (batch, positions)
        real = self.backbone.hidden_mask(inputs, kind, squared.shape[1])
        if real is None:
            return squared.mean()
        real = real.to(squared.device, squared.dtype)
        return (squared * real).sum() / real.sum().clamp(min=1)


def teacher_error(exc: ParpkitError, file: str | None) -> RecipeError:
    """A backbone's word on a teacher, located at the recipe's ``distillation.teacher``."""
    return RecipeError(str(exc), file=file, key="distillation.teacher")


def check_teacher(settings: DistillationSection | None, backbone: Backbone, file: str | None = None) -> None:
    """Refuse a ``teacher`` the backbone says cannot teach its model (configs only: for ``parpkit validate``
    and before a run loads anything), and a null teacher (the pretrained model as loaded) where the backbone
    says that model cannot teach (``Backbone.needs_teacher_dir``). Nothing to check without distillation."""
    if settings is None:
        return
    if settings.teacher is None:
        if (why := backbone.needs_teacher_dir()) is not None:
            raise RecipeError(f"null (the pretrained model as loaded) cannot teach: {why}", file=file, key="distillation.teacher")
        return
    try:
        backbone.check_teacher(settings.teacher, hidden_states=settings.hidden_weight > 0)
    except RecipeError:
        raise
    except ParpkitError as exc:
        raise teacher_error(exc, file) from None


def make_teacher(settings: DistillationSection, model: torch.nn.Module, backbone: Backbone, device: torch.device,
                 precision: str, file: str | None = None) -> Distiller:
    """The frozen teacher: a copy of ``model`` (the pretrained one, before any prune) or the model at
    ``settings.teacher``, loaded by the backbone shaped as ``model`` (``Backbone.load_teacher``)."""
    if settings.teacher is None:
        teacher = copy.deepcopy(model)
    else:
        try:
            teacher = backbone.load_teacher(settings.teacher, model)
        except RecipeError:
            raise
        except ParpkitError as exc:
            raise teacher_error(exc, file) from None
    teacher.requires_grad_(False)
    teacher.eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    teacher.to(device=device, dtype=dtype)
    return Distiller(teacher, backbone, settings)


def pseudo_label(distiller: Distiller, utterances: Sequence[Utterance], progress: Progress, batch_size: int,
                 cache: Path | None) -> list[Utterance]:
    """Utterances without a transcript get the teacher's (greedy decoding); kept in ``cache`` (JSONL)
    so that a resumed run trains on exactly the same targets without decoding again."""
    missing = [u for u in utterances if u.text is None]
    known: dict[str, str] = {}
    if cache is not None and cache.is_file():
        known = {row["id"]: row["text"] for row in map(json.loads, cache.read_text().splitlines())}
    todo = [u for u in missing if u.id not in known]
    if todo:
        # the teacher as published (whisper: its own window), whatever window training uses
        with distiller.backbone.native(distiller.teacher), \
                progress.task("teacher transcribing unlabelled audio", total=len(todo)) as task:
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                hyps = distiller.backbone.transcribe(distiller.teacher, [u.audio for u in chunk])
                known.update({u.id: h for u, h in zip(chunk, hyps, strict=True)})
                task.advance(len(chunk))
        if cache is not None:
            atomic_write(cache, "".join(json.dumps({"id": u.id, "text": known[u.id]}) + "\n" for u in missing))
    return [replace(u, text=known[u.id]) if u.text is None else u for u in utterances]
