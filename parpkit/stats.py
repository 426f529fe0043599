"""Per-utterance errors and paired bootstrap intervals: how sure a difference between two methods is.

Every evaluation writes each utterance's edit count and reference length (after the same normalisation the
scores use) into ``transcripts_<stage>.jsonl``. Two methods scored on the same split are compared on the same
utterances: resampling utterances with replacement, the difference of their corpus-level error rates
(errors summed over utterances, divided by reference words) gives a percentile confidence interval.

That interval holds the trained models fixed: it says how sure the difference is on other sentences, not on
other training runs. Where both methods have several seeds, ``seed_bootstrap`` also resamples the seeds of
each method (a two-level bootstrap), so the interval carries the spread between training runs as well.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import jiwer
import numpy as np


def edit_counts(reference: str, hypothesis: str) -> tuple[int, int]:
    """(word edits, reference words) of one normalised pair; an empty hypothesis is all deletions, an empty
    reference counts nothing (the rates leave such utterances out)."""
    words = len(reference.split())
    if not words:
        return 0, 0
    if not hypothesis.strip():
        return words, words
    out = jiwer.process_words(reference, hypothesis)
    return out.substitutions + out.deletions + out.insertions, words


def read_utterance_errors(transcripts: Path, split: str) -> dict[str, tuple[int, int]]:
    """utterance id -> (edits, reference words) of one split of a ``transcripts_<stage>.jsonl``; rows
    without counts (written before parpkit recorded them) are left out."""
    out = {}
    with transcripts.open() as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == split and "edits" in row:
                out[row["id"]] = (int(row["edits"]), int(row["words"]))
    return out


def paired_bootstrap(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]], *, resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Difference of corpus error rates A − B over the same utterances (``a[i]`` and ``b[i]`` are one
    utterance's (edits, words) under each method), with a percentile interval over ``resamples`` draws of
    the utterances with replacement. ``p_a_worse``: the share of draws where A's rate is above B's."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired bootstrap needs the same utterances under both methods ({len(a)} and {len(b)})")
    ea, wa = np.array(a, dtype=np.float64).T
    eb, wb = np.array(b, dtype=np.float64).T
    if not np.array_equal(wa, wb):
        raise ValueError("the two methods' reference lengths differ: they were not scored on the same utterances")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    words = wa[idx].sum(1)
    diffs = (ea[idx].sum(1) - eb[idx].sum(1)) / np.maximum(words, 1)
    tail = (1 - level) / 2
    return {"difference": float((ea.sum() - eb.sum()) / max(wa.sum(), 1)), "low": float(np.quantile(diffs, tail)),
            "high": float(np.quantile(diffs, 1 - tail)), "p_a_worse": float((diffs > 0).mean()), "utterances": len(a),
            "resamples": resamples, "level": level}


def seed_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], words: Sequence[float], *,
                   paired: bool = False, resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Difference of corpus error rates A − B with an interval over training runs and utterances: ``a[s][i]``
    is utterance i's edit count under seed s of method A (``b`` likewise; the seeds of A and B need not
    match), ``words[i]`` its reference length. Each draw resamples the utterances (the same for A and B)
    and, independently, each method's seeds, with replacement, and averages each method over its drawn
    seeds. With few seeds the interval is a rough guide: resampling n seeds understates their variance (to
    (n − 1)/n of it). ``paired``: the seeds are matched (row s of A and of B ran with the same seed, so the
    same data order), and each draw takes the same seed rows of both, as a paired bootstrap over seeds; the
    interval then leaves out what the two methods' runs of one seed share. ``seed_p_a_worse``: the share of
    draws where A's rate is above B's."""
    ea, eb, w = (np.asarray(x, dtype=np.float64) for x in (a, b, words))
    if ea.ndim != 2 or eb.ndim != 2 or ea.shape[1] != eb.shape[1] or ea.shape[1] != len(w) or not len(w):
        raise ValueError(f"seed bootstrap needs seeds × utterances edits over the same utterances for both methods "
                         f"({ea.shape} and {eb.shape}, {len(w)} reference lengths)")
    if min(len(ea), len(eb)) < 2:
        raise ValueError(f"seed bootstrap needs at least two seeds of each method ({len(ea)} and {len(eb)})")
    if paired and len(ea) != len(eb):
        raise ValueError(f"a paired seed bootstrap needs the same seeds for both methods ({len(ea)} and {len(eb)})")
    rng = np.random.default_rng(seed)
    n = len(w)
    counts = np.zeros((resamples, n))  # how often each utterance is drawn, per resample
    np.add.at(counts, (np.arange(resamples)[:, None], rng.integers(0, n, size=(resamples, n))), 1)

    def total(edits: np.ndarray, drawn: np.ndarray) -> np.ndarray:  # each resample's summed edits, averaged over its drawn seeds
        per_seed = counts @ edits.T  # resamples × seeds
        return np.take_along_axis(per_seed, drawn, axis=1).mean(1)

    drawn_a = rng.integers(0, len(ea), size=(resamples, len(ea)))
    drawn_b = drawn_a if paired else rng.integers(0, len(eb), size=(resamples, len(eb)))
    diffs = (total(ea, drawn_a) - total(eb, drawn_b)) / np.maximum(counts @ w, 1)
    tail = (1 - level) / 2
    return {"difference": float((ea.mean(0).sum() - eb.mean(0).sum()) / max(w.sum(), 1)),
            "seed_low": float(np.quantile(diffs, tail)), "seed_high": float(np.quantile(diffs, 1 - tail)),
            "seed_p_a_worse": float((diffs > 0).mean())}
