"""Evaluation: decode with the backbone (``generate`` for seq2seq models, never logits) at the model's native
settings (``Backbone.native``) and score."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from parpkit.interfaces import Backbone, Dataset, Utterance
from parpkit.metrics import error_rates, text_normaliser
from parpkit.stats import edit_counts
from parpkit.progress import Progress


def evaluate(backbone: Backbone, dataset: Dataset, model: torch.nn.Module, utterances: Sequence[Utterance],
             progress: Progress, label: str, device: torch.device, batch_size: int,
             transcripts: Path | None = None, normalizer: str = "basic", split: str | None = None) -> dict[str, float]:
    """Error rates of ``model`` on ``utterances``, decoding in batches; optionally every hypothesis
    appended to ``transcripts`` (JSONL: split, id, reference, hypothesis, and the utterance's edits and
    reference words (or phones) after normalisation, for paired comparisons)."""
    was_training = model.training
    model.eval()
    model.to(device)
    hyps: list[str] = []
    # at the settings the model was published with (whisper: its own window), whatever training used
    with backbone.native(model), progress.task(f"evaluating {label}", total=len(utterances)) as task:
        for i in range(0, len(utterances), batch_size):
            chunk = utterances[i:i + batch_size]
            hyps += backbone.transcribe(model, [u.audio for u in chunk])
            task.advance(len(chunk))
    if was_training:
        model.train()
    refs, scored = [dataset.score_text(u.text) for u in utterances], [dataset.score_text(h) for h in hyps]
    rates = error_rates(refs, scored, dataset.unit, normalizer)
    if transcripts is not None:  # with each utterance's edits and reference length as the rates count them, and speaker
        norm = text_normaliser(dataset.unit, normalizer)
        with transcripts.open("a") as f:
            for u, h, r, x in zip(utterances, hyps, refs, scored, strict=True):
                edits, words = edit_counts(norm(r), norm(x))
                f.write(json.dumps({"split": split, "id": u.id, "reference": u.text, "hypothesis": h, "edits": edits,
                                    "words": words, "speaker": u.speaker}) + "\n")
    return rates
