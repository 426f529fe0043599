"""Word and character error rates with one text normalisation shared by every backbone."""

from __future__ import annotations

import re
import unicodedata

import jiwer

_PUNCT = re.compile(r"[^\w\s']|_")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Lower case, no punctuation (apostrophes inside words kept), single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _PUNCT.sub(" ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    return _SPACE.sub(" ", text).strip()


def normalise_units(text: str) -> str:
    """For unit sequences (phones): lower case and single spaces; symbols like ``h#`` stay."""
    return _SPACE.sub(" ", text.lower()).strip()


def whisper_normaliser():
    """Whisper's English normaliser (numbers as words and as digits alike, "$", "%", ordinals …) followed
    by ``normalise``; without its British-to-American spelling table."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    english = EnglishTextNormalizer({})
    return lambda text: normalise(english(text))


def text_normaliser(unit: str = "words", normalizer: str = "basic"):
    """The normalisation scores use: unit sequences as they are (lower case, single spaces); words by the
    ``normalizer`` ("basic" or "whisper")."""
    if unit != "words":
        return normalise_units
    return whisper_normaliser() if normalizer == "whisper" else normalise


def error_rates(references: list[str], hypotheses: list[str], unit: str = "words", normalizer: str = "basic") -> dict[str, float]:
    """Over the whole set (errors summed over utterances, divided by reference length): WER and CER
    for ``unit="words"``; PER for ``unit="phones"`` (space-separated phone labels). ``normalizer``
    ("basic" or "whisper") applies to words."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    norm = text_normaliser(unit, normalizer)
    refs = [norm(r) for r in references]
    hyps = [norm(h) for h in hypotheses]
    keep = [i for i, r in enumerate(refs) if r]
    if not keep:
        raise ValueError("every reference transcript is empty after normalisation")
    refs = [refs[i] for i in keep]
    hyps = [hyps[i] for i in keep]
    if unit == "phones":
        return {"per": float(jiwer.wer(refs, hyps))}
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}
