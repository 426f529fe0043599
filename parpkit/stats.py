"""Per-utterance errors, and intervals for a difference between two methods: how sure it is, and over what.

Every evaluation writes each utterance's edit count, reference length (after the same normalisation the
scores use) and speaker into ``transcripts_<stage>.jsonl``. Two methods scored on the same split are
compared on the same utterances, by the difference of their corpus-level error rates (errors summed over
utterances, divided by reference words), with intervals that answer different questions:

- ``paired_bootstrap``: utterances resampled with replacement, the trained models held fixed. How sure the
  difference is on other sentences like these, from independent utterances, for these training runs.
- ``seed_bootstrap``: the same, with each method's seeds resampled too (a two-level bootstrap), so that the
  spread between training runs counts. With three seeds a rough guide (resampling n values understates
  their variance, to (n − 1)/n of it, and draws only what the n seeds show).
- ``paired_t_interval``: one difference per seed that both methods ran (same data order), and a t-interval
  with n − 1 degrees of freedom over them: the training runs are the sample, as a claim "A is better than
  B when trained again" needs (on these utterances: it does not resample them). Needs two paired seeds;
  wide with few (t = 4.30 at three seeds, 2.78 at five).
- ``speaker_bootstrap``: speakers (clusters) resampled with replacement, each with all their utterances,
  models held fixed. Utterances of one voice go together; resampling them one by one overstates how much
  independent evidence a split holds.

Many comparisons in one table: ``holm`` adjusts a family of p-values so that the chance of any false
"different" in the family stays at most α.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import jiwer
import numpy as np

from parpkit.errors import ParpkitError


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


#: what a transcripts line that cannot be read is (cut off, or edited by hand)
_DAMAGED = "a damaged transcripts file"


def _split_rows(transcripts: Path, split: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) of one split of a ``transcripts_<stage>.jsonl``; a line that is not a JSON object with an
    utterance id (a file cut off or edited) is refused, naming the file and line."""
    try:
        lines = transcripts.read_text().split("\n")
    except UnicodeDecodeError as exc:
        raise ParpkitError(f"{transcripts}: not UTF-8 text ({exc.reason} at byte {exc.start}): {_DAMAGED}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ParpkitError(f"{transcripts}: line {n}: not JSON ({getattr(exc, 'msg', exc)}): {_DAMAGED}") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            what = ("not a JSON object" if not isinstance(row, dict) else "no utterance id" if "id" not in row
                    else f"id is {row['id']!r}, expected the utterance's name")
            raise ParpkitError(f"{transcripts}: line {n}: {what}: {_DAMAGED}")
        if row.get("split") == split:
            yield n, row


def read_utterance_errors(transcripts: Path, split: str) -> dict[str, tuple[int, int]]:
    """utterance id -> (edits, reference words) of one split of a ``transcripts_<stage>.jsonl``; rows
    without counts (written before parpkit recorded them) are left out, damaged ones refused (file and line)."""
    out = {}
    for n, row in _split_rows(transcripts, split):
        if "edits" in row:
            for key in ("edits", "words"):
                value = row.get(key)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ParpkitError(f"{transcripts}: line {n}: {key} is {value!r}, expected a whole number of 0 or "
                                       f"more: {_DAMAGED}")
            out[row["id"]] = (row["edits"], row["words"])
    return out


def read_speakers(transcripts: Path, split: str) -> dict[str, str]:
    """utterance id -> speaker of one split of a ``transcripts_<stage>.jsonl``; rows without one (written
    before parpkit recorded it, or from a dataset that names no speakers) are left out."""
    return {row["id"]: str(row["speaker"]) for _, row in _split_rows(transcripts, split)
            if row.get("speaker") is not None and row["speaker"] != ""}  # a speaker named 0 is a speaker


#: the most utterance draws held at once (resamples × utterances): 2**22 int64 indices, 32 MiB, with the floats
#: gathered from them; a report of 1,000,000 resamples over a 3,040-utterance corpus had asked for 22.6 GiB at once
DRAWS_AT_ONCE = 2**22


def _chunks(resamples: int, width: int):
    """(first row, rows) slices of ``resamples`` rows of ``width`` draws each, at most ``DRAWS_AT_ONCE`` draws a slice.
    numpy's generator gives the same numbers drawn in slices as at once, so the results do not depend on the size."""
    rows = max(1, DRAWS_AT_ONCE // max(width, 1))
    for start in range(0, resamples, rows):
        yield start, min(rows, resamples - start)


def paired_bootstrap(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]], *, resamples: int = 2000,
                     level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Difference of corpus error rates A − B over the same utterances (``a[i]`` and ``b[i]`` are one
    utterance's (edits, words) under each method), with a percentile interval over ``resamples`` draws of
    the utterances with replacement. ``p_a_worse``: the share of draws where A's rate is above B's; ``p``: the
    two-sided bootstrap p (``bootstrap_p``)."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired bootstrap needs the same utterances under both methods ({len(a)} and {len(b)})")
    ea, wa = np.array(a, dtype=np.float64).T
    eb, wb = np.array(b, dtype=np.float64).T
    if not np.array_equal(wa, wb):
        raise ValueError("the two methods' reference lengths differ: they were not scored on the same utterances")
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for start, rows in _chunks(resamples, len(a)):  # drawn in slices: the same draws, in bounded memory
        idx = rng.integers(0, len(a), size=(rows, len(a)))
        diffs[start:start + rows] = (ea[idx].sum(1) - eb[idx].sum(1)) / np.maximum(wa[idx].sum(1), 1)
    tail = (1 - level) / 2
    return {"difference": float((ea.sum() - eb.sum()) / max(wa.sum(), 1)), "low": float(np.quantile(diffs, tail)),
            "high": float(np.quantile(diffs, 1 - tail)), "p_a_worse": float((diffs > 0).mean()), "p": bootstrap_p(diffs),
            "utterances": len(a), "resamples": resamples, "level": level}


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
    seeds_a, seeds_b, words = np.empty((resamples, len(ea))), np.empty((resamples, len(eb))), np.empty(resamples)
    for start, rows in _chunks(resamples, n):  # drawn in slices: the same draws, in bounded memory
        counts = np.zeros((rows, n))  # how often each utterance is drawn, per resample
        np.add.at(counts, (np.arange(rows)[:, None], rng.integers(0, n, size=(rows, n))), 1)
        chunk = slice(start, start + rows)
        seeds_a[chunk], seeds_b[chunk], words[chunk] = counts @ ea.T, counts @ eb.T, counts @ w  # summed edits per seed

    def total(per_seed: np.ndarray, drawn: np.ndarray) -> np.ndarray:  # each resample's summed edits, averaged over its drawn seeds
        return np.take_along_axis(per_seed, drawn, axis=1).mean(1)

    drawn_a = rng.integers(0, len(ea), size=(resamples, len(ea)))
    drawn_b = drawn_a if paired else rng.integers(0, len(eb), size=(resamples, len(eb)))
    diffs = (total(seeds_a, drawn_a) - total(seeds_b, drawn_b)) / np.maximum(words, 1)
    tail = (1 - level) / 2
    return {"difference": float((ea.mean(0).sum() - eb.mean(0).sum()) / max(w.sum(), 1)),
            "seed_low": float(np.quantile(diffs, tail)), "seed_high": float(np.quantile(diffs, 1 - tail)),
            "seed_p_a_worse": float((diffs > 0).mean())}


# ------------------------------------------------------------------------------------------ seeds, speakers, many tests

def t_cdf_abs(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with a whole number ``df`` of degrees of freedom, in closed form
    (Abramowitz & Stegun 26.7.3 and 26.7.4): exact, no special functions."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a whole number >= 1, got {df!r}")
    if math.isinf(t):
        return 1.0
    t = abs(t)
    theta = math.atan(t / math.sqrt(df))
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # 1, 3, 5 …: (2/π)(θ + sin θ (cos θ + 2/3 cos³θ + … + (2·4…(df−3))/(1·3…(df−2)) cos^(df−2) θ))
        if df == 1:
            return 2 * theta / math.pi
        term = total = math.cos(theta)
        for k in range(3, df - 1, 2):
            term *= cos2 * (k - 1) / k
            total += term
        return min(1.0, 2 / math.pi * (theta + sin * total))
    term = total = 1.0  # 2, 4, 6 …: sin θ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + … + (1·3…(df−3))/(2·4…(df−2)) cos^(df−2) θ)
    for k in range(2, df - 1, 2):
        term *= cos2 * (k - 1) / k
        total += term
    return min(1.0, sin * total)


def t_quantile(level: float, df: int) -> float:
    """The t value with P(|T| <= t) = ``level`` (two-sided: 4.303 for level 0.95 and 2 degrees of freedom)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    lo, hi = 0.0, 1.0
    while t_cdf_abs(hi, df) < level:
        hi *= 2
    for _ in range(200):  # bisection to machine precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf_abs(mid, df) < level else (lo, mid)
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def paired_t_interval(differences: Sequence[float], *, level: float = 0.95) -> dict[str, float]:
    """A t-interval for the mean of per-seed differences (method A's error rate minus B's, one per seed both
    ran): mean ± t(n−1) · sd / √n, and the two-sided p of the paired t-test that the mean is 0. It treats
    the n training runs as a sample of training runs (data order, dropout, calibration batches), which is
    what a claim "A is better than B" is about; with n = 3 the t quantile is 4.30 (not the 1.96 a bootstrap
    of three values implicitly leans on). Needs at least two differences. Where they do not spread (every seed
    gave the same difference, to rounding) there is nothing to scale by: ``low``, ``high`` and ``p`` are None
    (a zero-width interval and p = 0 would claim certainty that two or three equal values do not give)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"a paired t-interval needs at least two paired seeds, got {len(d)}")
    n, mean = len(d), float(d.mean())
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    q = t_quantile(level, n - 1)
    if sd <= 1e-12 * max(1.0, abs(mean)):  # no spread (float noise of equal values included): nothing to scale by
        return {"difference": mean, "low": None, "high": None, "p": None, "seeds": n, "sd": sd, "t_quantile": q,
                "level": level}
    p = 1.0 - t_cdf_abs(mean / se, n - 1)
    return {"difference": mean, "low": mean - q * se, "high": mean + q * se, "p": max(0.0, p), "seeds": n, "sd": sd,
            "t_quantile": q, "level": level}


def bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p that the difference is 0: twice the smaller share of draws on either side of 0,
    each counted as (k + 1) / (draws + 1), so that it is never 0 (at least 2 / (draws + 1))."""
    n = len(diffs)
    below, above = int((diffs <= 0).sum()), int((diffs >= 0).sum())
    return float(min(1.0, 2 * (min(below, above) + 1) / (n + 1)))


def speaker_bootstrap(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]], speakers: Sequence[str], *,
                      resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Difference of corpus error rates A − B over the same utterances, with a percentile interval that
    resamples speakers (clusters) with replacement, each drawn speaker bringing all of their utterances:
    ``a[i]``, ``b[i]`` are utterance i's (edits, words) under each method, ``speakers[i]`` who said it.
    Utterances of one speaker share voice, rate and pitch, so their errors go together; resampling
    utterances one by one treats them as independent and gives too narrow an interval when they do. With
    few speakers the interval is rough (a percentile bootstrap of G clusters understates their spread, to
    (G − 1)/G of the variance, and it cannot reach outside what the G speakers show); it needs at least two.
    ``p``: the two-sided bootstrap p (``bootstrap_p``)."""
    if not (len(a) == len(b) == len(speakers)) or not len(a):
        raise ValueError(f"speaker bootstrap needs the same utterances under both methods and a speaker for each "
                         f"({len(a)}, {len(b)}, {len(speakers)})")
    ea, wa = np.array(a, dtype=np.float64).T
    eb, wb = np.array(b, dtype=np.float64).T
    if not np.array_equal(wa, wb):
        raise ValueError("the two methods' reference lengths differ: they were not scored on the same utterances")
    order = {name: i for i, name in enumerate(sorted({str(s) for s in speakers}))}  # not np.unique: numpy's strings
    index = np.array([order[str(s)] for s in speakers])                            # drop trailing NULs ("v" == "v\0")
    g = len(order)
    if g < 2:
        raise ValueError(f"a speaker bootstrap needs at least two speakers, got {g}")
    per = np.zeros((3, g))
    for row, values in enumerate((ea, eb, wa)):
        np.add.at(per[row], index, values)
    rng = np.random.default_rng(seed)
    counts = np.zeros((resamples, g))  # how often each speaker is drawn, per resample
    np.add.at(counts, (np.arange(resamples)[:, None], rng.integers(0, g, size=(resamples, g))), 1)
    diffs = (counts @ per[0] - counts @ per[1]) / np.maximum(counts @ per[2], 1)
    tail = (1 - level) / 2
    return {"difference": float((ea.sum() - eb.sum()) / max(wa.sum(), 1)), "low": float(np.quantile(diffs, tail)),
            "high": float(np.quantile(diffs, 1 - tail)), "p_a_worse": float((diffs > 0).mean()), "p": bootstrap_p(diffs),
            "speakers": g, "resamples": resamples, "level": level}


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (1979) of a family of p-values (None: not tested, left out of the family
    and returned as None): sorted ascending, the i-th smallest (from 1) is multiplied by (m − i + 1), and the
    adjusted values are made non-decreasing in that order and capped at 1. Rejecting every adjusted p below α
    keeps the chance of any false rejection in the family at most α, whatever the dependence between tests."""
    present = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    m = len(present)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(present)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out
