"""Statistics in reports: per-utterance errors as the rates count them, paired bootstrap intervals that cover a
known difference, and every seed's value in table.md."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from parpkit.cli import main
from parpkit.engine.evaluation import evaluate
from parpkit.errors import ParpkitError
from parpkit.interfaces import Utterance
from parpkit.progress import Progress
from parpkit.report import collect, compare, markdown
from parpkit.stats import (edit_counts, holm, paired_bootstrap, paired_t_interval, seed_bootstrap, speaker_bootstrap,
                           t_cdf_abs, t_quantile)

WORDS = [f"w{i}" for i in range(10)]


def _fake_run(root: Path, name: str, schedule: str, seed: int, drops: list[int], speakers: list[str] | None = None) -> Path:
    """A finished run whose final transcripts drop ``drops[i]`` of utterance i's ten words (said by
    ``speakers[i]``; no speaker field without them, as transcripts written before parpkit recorded it)."""
    run = root / name
    run.mkdir(parents=True)
    rows, edits, words = [], 0, 0
    for i, k in enumerate(drops):
        ref, hyp = " ".join(WORDS), " ".join(WORDS[k:])
        e, w = edit_counts(ref, hyp)
        edits, words = edits + e, words + w
        row = {"split": "test", "id": f"u{i}", "reference": ref, "hypothesis": hyp, "edits": e, "words": w}
        rows.append(json.dumps(row if speakers is None else {**row, "speaker": speakers[i]}))
    (run / "transcripts_final.jsonl").write_text("\n".join(rows) + "\n")
    wer = edits / words
    (run / "recipe.yaml").write_text(f"name: {name}\nseed: {seed}\n")
    (run / "metrics.json").write_text(json.dumps({
        "plugins": {"backbone": "whisper", "dataset": "synthetic_speech", "criterion": "magnitude", "schedule": schedule},
        "scope": "global", "target_sparsity": 0.5, "eval_split": "test", "steps": 10, "wall_time_s": {"total": 1.0},
        "mask_iou_initial": None, "curve": [],
        "stages": {"final": {"wer": wer, "pool_sparsity": 0.5, "model_sparsity": 0.2, "splits": {"test": {"wer": wer}}}}}))
    return run


def test_edit_counts_sum_to_the_corpus_rate():
    pairs = [("a b c d", "a x c d"), ("a b", ""), ("a b c", "a b c d e"), ("", "noise")]
    counts = [edit_counts(r, h) for r, h in pairs]
    assert counts == [(1, 4), (2, 2), (2, 3), (0, 0)]  # an empty reference counts nothing, as the rates leave it out


def test_evaluation_records_each_utterance_as_the_rates_count_it(tmp_path):
    from parpkit import Backbone as ParpkitBackbone

    class Backbone:
        said = iter(["The cat sat", "twenty one dogs", ""])

        def transcribe(self, model, audios):
            return [next(self.said) for _ in audios]

        native = ParpkitBackbone.native  # the interface's default: the model as it is

    class Dataset:
        unit = "words"

        def score_text(self, text):
            return text

    utts = [Utterance(f"u{i}", np.zeros(10, np.float32), 16000, t) for i, t in
            enumerate(["the cat sat down", "21 dogs", "hello there"])]
    out = tmp_path / "t.jsonl"
    rates = evaluate(Backbone(), Dataset(), torch.nn.Linear(1, 1), utts, Progress(enabled=False), "x", torch.device("cpu"), 2,
                     out, "whisper", "test")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["edits"], r["words"]) for r in rows] == [(1, 4), (0, 2), (2, 2)]  # whisper's normaliser: 21 == twenty one
    assert [r["speaker"] for r in rows] == ["", "", ""]  # each utterance's speaker, for the speaker bootstrap (none here)
    assert rates["wer"] == pytest.approx(sum(r["edits"] for r in rows) / sum(r["words"] for r in rows))


def test_bootstraps_draw_in_slices_of_bounded_memory_and_give_the_same_intervals(monkeypatch):
    import tracemalloc

    import parpkit.stats as stats

    rng = np.random.default_rng(3)
    n = 3000  # a corpus-sized split: drawn at once, 2,000 resamples held 6M indices and their gathered floats
    a, b = ([(int(k), 10) for k in rng.binomial(10, p, n)] for p in (0.3, 0.25))
    ea, eb = rng.binomial(10, 0.3, (3, n)), rng.binomial(10, 0.25, (3, n))
    whole = paired_bootstrap(a, b), seed_bootstrap(ea, eb, [10] * n), seed_bootstrap(ea, eb, [10] * n, paired=True)
    monkeypatch.setattr(stats, "DRAWS_AT_ONCE", 2**15)
    tracemalloc.start()
    try:
        sliced = paired_bootstrap(a, b), seed_bootstrap(ea, eb, [10] * n), seed_bootstrap(ea, eb, [10] * n, paired=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sliced == whole  # the same draws, in slices of 10 resamples (2**15 draws of 3,000)
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB: the draws were not held a slice at a time"
    assert whole[0]["low"] < 0.05 < whole[0]["high"] and whole[1]["seed_low"] < 0.05 < whole[1]["seed_high"]


def test_paired_bootstrap_intervals_cover_a_known_difference_and_zero_when_there_is_none(tmp_path):
    rng = np.random.default_rng(0)
    n = 400
    worse = [rng.binomial(10, 0.3, n).tolist() for _ in range(2)]  # two seeds of a method dropping 30% of the words
    better = rng.binomial(10, 0.2, n).tolist()                    # one dropping 20%: the true difference is 0.1
    for s, drops in enumerate(worse):
        _fake_run(tmp_path, f"parp-{s}", "parp", s, drops)
    _fake_run(tmp_path, "fixed-0", "fixed", 0, better)
    rows, _ = collect([tmp_path])
    [pair] = compare(rows, "parp", "fixed")
    assert pair["seeds_a"] == 2 and pair["utterances"] == n and pair["split"] == "test"
    observed = (np.mean(worse, axis=0).sum() - sum(better)) / (10 * n)
    assert pair["difference"] == pytest.approx(observed)
    assert 0 < pair["low"] < 0.1 < pair["high"] and pair["p_a_worse"] == 1.0
    assert pair["seed_low"] is None  # one seed of fixed: no spread between its training runs to resample
    assert pair["t_low"] is None and pair["speaker_low"] is None  # one paired seed; transcripts without speakers
    assert pair["notes"] == ("no t-interval: 1 seed(s) ran by both (A: 0, 1; B: 0); it needs two; no speaker interval: the "
                             "transcripts name no speaker for 400 of 400 utterances (written before parpkit recorded "
                             "speakers, or the dataset names none)")
    # the same method against itself on other draws of one rate: the interval holds 0
    same = paired_bootstrap([(k, 10) for k in rng.binomial(10, 0.2, n)], [(k, 10) for k in rng.binomial(10, 0.2, n)])
    assert same["low"] < 0 < same["high"]
    # every seed's value is in the table, beside mean and half range
    table = markdown(rows)
    a, b = (np.sum(d) / (10 * n) for d in worse)
    assert f"({a:.3f}, {b:.3f})" in table


def test_resampling_seeds_too_widens_the_interval_by_the_spread_between_training_runs(tmp_path):
    rng = np.random.default_rng(2)
    n = 400
    # A's three seeds drop 10%, 30% and 50% of the words, B's three 20% each: on average A is worse by 0.1,
    # but one of A's training runs is better than B. Over utterances alone the difference looks certain.
    for s, p in enumerate((0.1, 0.3, 0.5)):
        _fake_run(tmp_path, f"parp-{s}", "parp", s, rng.binomial(10, p, n).tolist())
    for s in range(3):
        _fake_run(tmp_path, f"fixed-{s}", "fixed", s, rng.binomial(10, 0.2, n).tolist())
    rows, _ = collect([tmp_path])
    [pair] = compare(rows, "parp", "fixed")
    assert (pair["seeds_a"], pair["seeds_b"]) == (3, 3) and pair["difference"] == pytest.approx(0.1, abs=0.01)
    assert 0.07 < pair["low"] < 0.1 < pair["high"] < 0.13 and pair["p_a_worse"] == 1.0
    # with the seeds resampled: 1 draw in 27 takes A's best run three times (A − B = −0.1), 3 in 27 twice with
    # the middle one (about −0.03), so the interval reaches below zero and A is not surely worse
    assert pair["seed_low"] < -0.05 and 0.1 < pair["seed_high"] < 0.35 and 0.7 < pair["seed_p_a_worse"] < 0.95
    # seeds that agree: the interval is about the utterances' one
    same = [rng.binomial(10, 0.3, n) for _ in range(2)]
    other = [rng.binomial(10, 0.2, n) for _ in range(2)]
    both = seed_bootstrap(same, other, [10] * n)
    alone = paired_bootstrap([(k, 10) for k in np.mean(same, 0)], [(k, 10) for k in np.mean(other, 0)])
    assert both["difference"] == pytest.approx(alone["difference"])
    assert both["seed_low"] == pytest.approx(alone["low"], abs=0.01) and both["seed_high"] == pytest.approx(alone["high"], abs=0.01)
    with pytest.raises(ValueError, match="at least two seeds"):
        seed_bootstrap(same[:1], other, [10] * n)


def test_matched_seeds_are_resampled_in_pairs(tmp_path):
    rng = np.random.default_rng(3)
    n = 400
    # seed s shifts both methods alike (the same data order): 10%, 30%, 50% of the words dropped, and A drops
    # 3 points more than B under every seed. Drawn independently the seeds' spread swamps the difference;
    # drawn in pairs it cancels.
    for s, p in enumerate((0.1, 0.3, 0.5)):
        _fake_run(tmp_path, f"parp-{s}", "parp", s, rng.binomial(10, p + 0.03, n).tolist())
        _fake_run(tmp_path, f"fixed-{s}", "fixed", s, rng.binomial(10, p, n).tolist())
    rows, _ = collect([tmp_path])
    [pair] = compare(rows, "parp", "fixed")
    assert pair["seeds_paired"] is True
    assert pair["difference"] == pytest.approx(0.03, abs=0.015)
    assert 0 < pair["seed_low"] < pair["difference"] < pair["seed_high"] < pair["difference"] + 0.025
    assert pair["seed_p_a_worse"] > 0.975
    per = {m: [[json.loads(line)["edits"] for line in (tmp_path / f"{m}-{s}" / "transcripts_final.jsonl").read_text().splitlines()]
               for s in range(3)] for m in ("parp", "fixed")}
    alone = seed_bootstrap(per["parp"], per["fixed"], [10] * n)  # the same runs, seeds drawn on their own
    assert alone["seed_low"] < -0.1 and alone["seed_high"] > 0.15
    with pytest.raises(ValueError, match="same seeds"):
        seed_bootstrap(per["parp"], per["fixed"][:2], [10] * n, paired=True)
    # other seeds: not paired
    _fake_run(tmp_path, "fixed-3", "fixed", 3, rng.binomial(10, 0.3, n).tolist())
    rows, _ = collect([tmp_path])
    [pair] = compare(rows, "parp", "fixed")
    assert pair["seeds_paired"] is False and pair["seeds_b"] == 4


def test_report_compare_prints_and_writes_the_intervals(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for name, schedule, p in (("a", "parp", 0.3), ("b", "fixed", 0.1)):
        _fake_run(tmp_path / "runs", name, schedule, 0, rng.binomial(10, p, 200).tolist())
    assert main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "rep"), "--compare", "parp", "fixed"]) == 0
    out = capsys.readouterr().out
    assert "paired bootstrap" in out and "parp" in out
    written = (tmp_path / "rep" / "compare.md").read_text()
    assert "| parp | fixed | 0.5 | test | 1 | 1 | +0.2" in written
    with (tmp_path / "rep" / "compare.csv").open(newline="") as f:
        [pair] = list(csv.DictReader(f))
    assert (pair["a"], pair["b"], float(pair["sparsity"]), pair["split"], int(pair["utterances"])) == ("parp", "fixed", 0.5, "test", 200)
    assert float(pair["low"]) < float(pair["difference"]) < float(pair["high"]) and f"{float(pair['difference']):+.4f}" in written
    assert "printed only" not in capsys.readouterr().err
    # without an output folder (runs that are no sweep) nothing is written, and the report says how to keep it
    assert main(["report", str(tmp_path / "runs"), "--compare", "parp", "fixed"]) == 0
    assert "printed only: --output-dir DIR writes table.md, table.csv and the plots, compare.md and compare.csv" in _err(capsys)
    # a method that is not among the runs, or one against itself, is refused before anything is written or printed
    for names, message in ((["parp", "omp"], "no method 'omp'"), (["parp", "parp"], "'parp' against itself")):
        assert main(["report", str(tmp_path / "runs"), "--compare", *names, "--output-dir", str(tmp_path / "refused")]) == 2
        printed = capsys.readouterr()
        assert message in " ".join(printed.err.split()) and printed.out == ""
        assert not (tmp_path / "refused").exists()


# ------------------------------------------------------------------------------------------ t, speakers, Holm

def test_t_distribution_in_closed_form_matches_known_values():
    assert t_quantile(0.95, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.95, 2) == pytest.approx(4.3027, abs=1e-4)  # three seeds: the README's t₂
    assert t_quantile(0.95, 4) == pytest.approx(2.7764, abs=1e-4)  # five seeds
    assert t_quantile(0.95, 9) == pytest.approx(2.2622, abs=1e-4)
    assert t_quantile(0.99, 5) == pytest.approx(4.0321, abs=1e-4)
    assert t_quantile(0.95, 400) == pytest.approx(1.9659, abs=1e-3)
    for x in (0.1, 1.0, 3.0):
        assert t_cdf_abs(x, 1) == pytest.approx(2 * np.arctan(x) / np.pi)  # Cauchy
        assert t_cdf_abs(x, 2) == pytest.approx(x / np.sqrt(2 + x * x))


def test_paired_t_interval_is_the_textbook_one_and_covers_a_known_difference():
    t = paired_t_interval([0.01, 0.03, 0.02])
    half = 4.302653 * 0.01 / np.sqrt(3)
    assert (t["difference"], t["low"], t["high"]) == pytest.approx((0.02, 0.02 - half, 0.02 + half))
    assert t["seeds"] == 3 and t["p"] == pytest.approx(1 - 2 * np.sqrt(3) / np.sqrt(14))  # t = 2√3 on 2 degrees of freedom: p 0.074
    with pytest.raises(ValueError, match="at least two paired seeds"):
        paired_t_interval([0.02])
    # coverage: 2,000 draws of n seeds whose differences scatter around a true +0.03 hold it about 95% of the time,
    # at three seeds as at five; a percentile bootstrap of the same three values holds it far less often
    rng = np.random.default_rng(0)
    for n in (3, 5):
        draws = rng.normal(0.03, 0.02, size=(2000, n))
        hits = [paired_t_interval(d)["low"] <= 0.03 <= paired_t_interval(d)["high"] for d in draws]
        assert 0.93 < np.mean(hits) < 0.97
    draws = rng.normal(0.03, 0.02, size=(500, 3))
    boot = []
    for d in draws:
        means = d[rng.integers(0, 3, size=(400, 3))].mean(1)
        boot.append(np.quantile(means, 0.025) <= 0.03 <= np.quantile(means, 0.975))
    assert np.mean(boot) < 0.85


def _clustered(rng, speakers: int, per: int, delta_sd: float, mean: float = 0.05) -> tuple[list, list, list[str]]:
    """Utterances of ten words by ``speakers`` voices: each voice has its own difficulty and its own A − B
    (around a true ``mean``, spread ``delta_sd``), so its utterances' errors go together."""
    a, b, who = [], [], []
    for g in range(speakers):
        base = rng.uniform(0.1, 0.4)
        delta = rng.normal(mean, delta_sd)
        pa, pb = np.clip(base + delta, 0, 1), base
        a += [(k, 10) for k in rng.binomial(10, pa, per)]
        b += [(k, 10) for k in rng.binomial(10, pb, per)]
        who += [f"spk{g}"] * per
    return a, b, who


def test_the_speaker_bootstrap_covers_a_known_difference_where_the_utterance_bootstrap_does_not():
    rng = np.random.default_rng(4)
    hits = {"speakers": [], "utterances": []}
    widths = {"speakers": [], "utterances": []}
    for rep in range(150):
        a, b, who = _clustered(rng, speakers=20, per=40, delta_sd=0.08)
        s = speaker_bootstrap(a, b, who, resamples=500, seed=rep)
        u = paired_bootstrap(a, b, resamples=500, seed=rep)
        for name, r in (("speakers", s), ("utterances", u)):
            hits[name].append(r["low"] <= 0.05 <= r["high"])
            widths[name].append(r["high"] - r["low"])
        assert s["speakers"] == 20 and s["difference"] == pytest.approx(u["difference"])
    # the true difference is the mean over voices; utterances resampled one by one treat 800 utterances as 800
    # independent pieces of evidence when they are 20 voices' worth: too narrow, and it misses the truth about
    # half the time (measured: 0.93 against 0.51 of the 150 draws, the speaker interval 2.5 times as wide)
    assert np.mean(hits["speakers"]) > 0.88
    assert np.mean(hits["utterances"]) < 0.65
    assert np.median(widths["speakers"]) > 2 * np.median(widths["utterances"])
    # without voice-to-voice spread of the difference the two agree (the speaker one a little wider: its
    # voices still differ in difficulty, which shifts the words' weight)
    a, b, who = _clustered(rng, speakers=16, per=25, delta_sd=0.0)
    s, u = speaker_bootstrap(a, b, who, seed=1), paired_bootstrap(a, b, seed=1)
    assert 0.7 < (s["high"] - s["low"]) / (u["high"] - u["low"]) < 1.6
    with pytest.raises(ValueError, match="at least two speakers"):
        speaker_bootstrap(a[:25], b[:25], who[:25])


def test_the_speaker_bootstrap_is_too_narrow_with_few_speakers():
    rng = np.random.default_rng(9)

    def coverage(speakers: int) -> float:  # how often a 95% interval holds a true difference of 0 (voices spread 0.05)
        hits = []
        for rep in range(400):
            a, b, who = _clustered(rng, speakers=speakers, per=10, delta_sd=0.05, mean=0.0)
            s = speaker_bootstrap(a, b, who, resamples=500, seed=rep)
            hits.append(s["low"] <= 0 <= s["high"])
        return float(np.mean(hits))

    # far too narrow at 2 speakers, still narrow at 4, near its 95% only with tens of speakers (400 draws each;
    # in the same model, another run: 0.56 at 2, 0.85 at 4, 0.87 at 8, 0.90 at 10, 0.91 at 20, 0.95 at 40);
    # (compare's thresholds, MIN_SPEAKERS and FEW_SPEAKERS, are a judgment on this trend; their behaviour is
    # tested in test_report_compare_says_where_its_intervals_cannot_hold)
    c2, c4, c20 = coverage(2), coverage(4), coverage(20)
    assert c2 < 0.7 and c4 < 0.88 and c20 > 0.89 and c2 < c4 < c20, (c2, c4, c20)


def test_holm_adjusts_known_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> kept non-decreasing: 0.06
    assert holm([0.01, 0.04, 0.03, None, 0.005]) == pytest.approx([0.03, 0.06, 0.06, None, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert holm([0.04]) == [0.04] and holm([None, None]) == [None, None]
    # at a family-wise 5%, four tests at p = 0.02 are not all shown, one at p = 0.001 is
    assert [p < 0.05 for p in holm([0.001, 0.02, 0.02, 0.02])] == [True, False, False, False]


def test_report_compare_gives_a_paired_t_interval_a_speaker_interval_and_holm_p(tmp_path, capsys):
    rng = np.random.default_rng(5)
    n, voices = 200, [f"v{i // 20}" for i in range(200)]  # ten voices of twenty utterances
    rates = {}
    for s in range(5):  # seed s moves both alike; A drops about 4 points more words than B under every seed
        shift = 0.05 * s
        for method, schedule, p in (("parp", "parp", 0.24), ("fixed", "fixed", 0.2)):
            drops = rng.binomial(10, p + shift, n).tolist()
            _fake_run(tmp_path / "runs", f"{method}-{s}", schedule, s, drops, voices)
            rates[(method, s)] = sum(drops) / (10 * n)
    _fake_run(tmp_path / "runs", "omp-0", "omp", 0, rng.binomial(10, 0.2, n).tolist())  # one seed, no speakers
    rows, _ = collect([tmp_path / "runs"])
    [pair] = compare(rows, "parp", "fixed")
    t = paired_t_interval([rates[("parp", s)] - rates[("fixed", s)] for s in range(5)])
    assert pair["t_seeds"] == 5 and pair["t_difference"] == pytest.approx(pair["difference"])
    assert (pair["t_low"], pair["t_high"], pair["t_p"]) == pytest.approx((t["low"], t["high"], t["p"]))
    assert pair["t_low"] < 0.04 < pair["t_high"] and pair["t_low"] > 0  # covers the known +0.04, excludes 0
    assert pair["speakers"] == 10 and pair["speaker_low"] < pair["difference"] < pair["speaker_high"]
    assert pair["comparisons"] == 1 and pair["t_p_holm"] == pytest.approx(pair["t_p"]) and pair["notes"] == ""
    [other] = compare(rows, "omp", "fixed")  # omp's transcripts name no speakers; fixed's do: an utterance's speaker
    assert other["t_seeds"] == 1 and other["t_low"] is None and other["speakers"] == 10
    assert other["notes"] == "no t-interval: 1 seed(s) ran by both (A: 0; B: 0, 1, 2, 3, 4); it needs two"
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path / "runs"), "--output", str(out), "--compare", "parp", "fixed",
                 "--compare", "omp", "fixed", "--compare", "parp", "omp"]) == 0
    printed = capsys.readouterr().out
    assert "3 comparisons in this table" in printed
    with (out / "compare.csv").open(newline="") as f:
        pairs = list(csv.DictReader(f))
    assert [int(p["comparisons"]) for p in pairs] == [3, 3, 3]
    # Holm over the table's three utterance-bootstrap p and its one t p (the rows without one are not counted)
    expected = holm([float(p["p"]) for p in pairs])
    assert [float(p["p_holm"]) for p in pairs] == pytest.approx(expected)
    assert [p["t_p_holm"] != "" for p in pairs] == [True, False, False]
    assert float(pairs[0]["t_p_holm"]) == pytest.approx(float(pairs[0]["t_p"]))
    md = (out / "compare.md").read_text()
    assert "3 comparisons in this table" in md and "Notes (a missing or rough interval, seeds, splits left out):" in md and "no t-interval" in md
    assert f"[{pair['t_low']:+.4f}, {pair['t_high']:+.4f}]" in md and f"[{pair['speaker_low']:+.4f}, {pair['speaker_high']:+.4f}]" in md


def test_speaker_pattern_groups_the_names_of_one_voice_before_the_speaker_bootstrap(tmp_path, capsys):
    # six voices, each synthesised at four rates named apart (as the synthetic corpora name them: voice@rate):
    # 24 names, and a bootstrap over them would resample one voice's utterances as if four voices had said them
    rng = np.random.default_rng(11)
    names = [f"v{i // 20}@{100 + 10 * ((i // 5) % 4)}" for i in range(120)]
    runs = tmp_path / "runs"
    a, b = rng.binomial(10, 0.3, 120).tolist(), rng.binomial(10, 0.2, 120).tolist()
    _fake_run(runs, "a0", "parp", 0, a, names)
    _fake_run(runs, "b0", "fixed", 0, b, [n.split("@")[0] for n in names])  # written with the voice alone
    rows, _ = collect([runs])
    [apart] = compare(rows, "parp", "fixed")  # the runs disagree on every name: no speaker interval
    assert apart["speakers"] is None and "no speaker interval: the runs name different speakers" in apart["notes"]
    [pair] = compare(rows, "parp", "fixed", speaker_pattern="^[^@]+")
    expected = speaker_bootstrap([(k, 10) for k in a], [(k, 10) for k in b], [f"v{i // 20}" for i in range(120)])
    assert pair["speakers"] == 6 and pair["speaker_pattern"] == "^[^@]+"
    assert (pair["speaker_low"], pair["speaker_high"]) == pytest.approx((expected["low"], expected["high"]))
    assert "30 speaker names grouped into 6 speakers by --speaker-pattern" in pair["notes"]  # both runs' 24 + 6
    # a group, where the pattern has one, is the speaker; a name the pattern finds nothing in is refused, named
    [grouped] = compare(rows, "parp", "fixed", speaker_pattern=r"^(v\d)")
    assert grouped["speakers"] == 6 and grouped["speaker_low"] == pytest.approx(pair["speaker_low"])
    with pytest.raises(ParpkitError, match=r"a0/transcripts_final.jsonl, split test, utterance 'u0': --speaker-pattern "
                                           r"'\^w' does not match the speaker name 'v0@100'"):
        compare(rows, "parp", "fixed", speaker_pattern="^w")
    with pytest.raises(ParpkitError, match=r"--speaker-pattern '\(x\?\)' matches only an empty first group in the speaker"):
        compare(rows, "parp", "fixed", speaker_pattern="(x?)")
    out = tmp_path / "rep"
    assert main(["report", str(runs), "--output-dir", str(out), "--compare", "parp", "fixed",
                 "--speaker-pattern", "^[^@]+"]) == 0
    capsys.readouterr()
    [row] = list(csv.DictReader((out / "compare.csv").open(newline="")))
    assert row["speakers"] == "6" and row["speaker_pattern"] == "^[^@]+"
    assert "grouped into speakers by the regular expression `^[^@]+` (--speaker-pattern)" in (out / "compare.md").read_text()
    assert main(["report", str(runs), "--compare", "parp", "fixed", "--speaker-pattern", r"^(w\d)"]) == 2
    assert r"--speaker-pattern '^(w\d)' does not match" in _err(capsys)  # as typed, not a Python repr doubling "\"
    assert main(["report", str(runs), "--compare", "parp", "fixed", "--speaker-pattern", "v(["]) == 2
    assert "--speaker-pattern 'v([' is not a regular expression" in _err(capsys)
    assert main(["report", str(runs), "--speaker-pattern", "^[^@]+"]) == 2
    assert "--speaker-pattern goes with --compare" in _err(capsys)


def test_speaker_names_count_as_written_a_speaker_named_0_and_names_apart_only_by_nul_included(tmp_path):
    from parpkit.stats import read_speakers

    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"split": "test", "id": f"u{i}", "speaker": who})
                              for i, who in enumerate([0, "", None, "v", "v\0", False])) + "\n")
    assert read_speakers(path, "test") == {"u0": "0", "u3": "v", "u4": "v\0", "u5": "False"}  # "": no speaker, as None
    # numpy's string arrays drop trailing NULs ("v" and "v\0" became one speaker, and two names one: refused)
    both = speaker_bootstrap([(1, 10), (5, 10)], [(2, 10), (2, 10)], ["v", "v\0"], resamples=200)
    assert both["speakers"] == 2 and both["low"] < both["high"]


def test_report_compare_says_where_its_intervals_cannot_hold(tmp_path, capsys):
    runs = tmp_path / "runs"
    four = [f"v{i % 4}" for i in range(40)]
    for seed in (0, 1):  # A drops one word more than B, at the same utterance, under both seeds: no spread
        base = [1 + (i + seed) % 3 for i in range(40)]
        _fake_run(runs, f"a{seed}", "parp", seed, [base[0] + 1, *base[1:]], four)
        _fake_run(runs, f"b{seed}", "fixed", seed, base, four)
    rows, _ = collect([runs])
    [pair] = compare(rows, "parp", "fixed")
    assert pair["t_seeds"] == 2 and pair["t_low"] is None and pair["t_p"] is None
    assert pair["t_difference"] == pytest.approx(1 / 400)
    assert "no t-interval: every paired seed gave the same difference (+0.0025)" in pair["notes"]
    assert pair["speakers"] == 4 and pair["speaker_low"] is None and pair["speaker_p"] is None
    assert "no speaker interval: 4 speakers; a speaker bootstrap needs 5 or more" in pair["notes"]
    # six speakers: an interval, called rough; a third seed of A alone: the t-interval's own A − B is said
    six = [f"v{i % 6}" for i in range(40)]
    _fake_run(tmp_path / "r6", "a0", "parp", 0, [2] * 40, six)
    _fake_run(tmp_path / "r6", "a1", "parp", 1, [3] * 20 + [2] * 20, six)
    _fake_run(tmp_path / "r6", "a2", "parp", 2, [9] * 40, six)
    _fake_run(tmp_path / "r6", "b0", "fixed", 0, [1] * 40, six)
    _fake_run(tmp_path / "r6", "b1", "fixed", 1, [1] * 40, six)
    rows, _ = collect([tmp_path / "r6"])
    [pair] = compare(rows, "parp", "fixed")
    assert pair["speakers"] == 6 and pair["speaker_low"] is not None
    assert "speaker interval over 6 speakers: too narrow with under 10" in pair["notes"]
    assert pair["difference"] == pytest.approx((2 + 2.5 + 9) / 30 - 0.1)  # every seed of each arm
    assert pair["t_difference"] == pytest.approx(0.125)  # seeds 0 and 1: (0.2 - 0.1 + 0.25 - 0.1) / 2
    assert "t-interval over the 2 seeds both ran (0, 1), whose A − B is +0.1250" in pair["notes"]
    # a split only some runs scored: named once, not dropped silently
    metrics = json.loads((tmp_path / "r6" / "b1" / "metrics.json").read_text())
    metrics["stages"]["final"]["splits"]["ood"] = {"wer": 0.5}
    (tmp_path / "r6" / "b1" / "metrics.json").write_text(json.dumps(metrics))
    [again] = compare(collect([tmp_path / "r6"])[0], "parp", "fixed")
    assert again["split"] == "test" and "split ood left out: not scored by " in again["notes"]
    assert str(tmp_path / "r6" / "a0") in again["notes"] and str(tmp_path / "r6" / "b1") not in again["notes"]
    # a split every run scored but none wrote per-utterance errors for (older transcripts): named, not dropped silently
    for run in (tmp_path / "r6").iterdir():
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["stages"]["final"]["splits"]["ood"] = {"wer": 0.5}
        (run / "metrics.json").write_text(json.dumps(metrics))
    [unscored] = compare(collect([tmp_path / "r6"])[0], "parp", "fixed")
    assert unscored["split"] == "test" and "split ood left out: no run of the pair has per-utterance errors on it" in unscored["notes"]
    # a pair given twice (either way round) would count twice in Holm's family
    assert main(["report", str(tmp_path / "r6"), "--compare", "parp", "fixed", "--compare", "fixed", "parp"]) == 2
    assert "--compare fixed parp given twice (parp fixed before)" in _err(capsys)
    # many rows: the bootstrap's resolution floors every Holm p of a bootstrap column; the table says so
    assert main(["report", str(tmp_path / "r6"), "--output-dir", str(tmp_path / "rep"), "--compare", "parp", "fixed",
                 "--resamples", "100"]) == 0
    assert "With 100 resamples no bootstrap p is below 0.0198" not in (tmp_path / "rep" / "compare.md").read_text()
    from parpkit.report import family_note
    note = family_note([{**pair, "resamples": 100}] * 4)
    assert "With 100 resamples no bootstrap p is below 0.0198, so no Holm p falls below 0.079 in the utterance " \
           "bootstrap's column (4 rows) or 0.079 in the speaker bootstrap's column (4 rows): raise --resamples (at " \
           "least 800 for a floor of 0.01)" in note


# ------------------------------------------------------------------------------------------ inputs --compare refuses

def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def _rewrite(transcripts: Path, line: int, text: str) -> None:
    """Replace one line (from 1) of a transcripts file."""
    lines = transcripts.read_text().splitlines()
    lines[line - 1] = text
    transcripts.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("damage, problem", [
    (lambda row: json.dumps(row)[:40], "not JSON (Unterminated string"),  # cut off
    (lambda row: json.dumps({**row, "edits": None}), "edits is None, expected a whole number of 0 or more"),
    (lambda row: json.dumps({k: v for k, v in row.items() if k != "words"}), "words is None, expected a whole number"),
    (lambda row: json.dumps({k: v for k, v in row.items() if k != "id"}), "no utterance id"),
    (lambda row: "[1, 2]", "not a JSON object"),
])
def test_report_compare_names_a_damaged_transcripts_file_and_its_line(tmp_path, capsys, damage, problem):
    runs = tmp_path / "runs"
    _fake_run(runs, "a", "parp", 0, [1, 2, 3])
    bad = _fake_run(runs, "b", "fixed", 0, [2, 2, 2]) / "transcripts_final.jsonl"
    _rewrite(bad, 3, damage(json.loads(bad.read_text().splitlines()[2])))
    assert main(["report", str(runs), "--compare", "parp", "fixed", "--output-dir", str(tmp_path / "rep")]) == 2
    err = _err(capsys)
    assert f"error: {bad}: line 3: {problem}" in err and "Traceback" not in err
    assert not (tmp_path / "rep").exists()  # refused before any report file was written


def test_report_compare_refuses_runs_that_count_reference_words_differently_naming_them(tmp_path, capsys):
    runs = tmp_path / "runs"
    for s in range(2):
        _fake_run(runs, f"parp-{s}", "parp", s, [1, 2, 3])
        _fake_run(runs, f"fixed-{s}", "fixed", s, [2, 2, 2])
    # one seed of one method scored with another normaliser: the same utterances and references, other word counts
    odd = runs / "fixed-1" / "transcripts_final.jsonl"
    row = json.loads(odd.read_text().splitlines()[0])
    _rewrite(odd, 1, json.dumps({**row, "words": 9}))
    assert main(["report", str(runs), "--compare", "parp", "fixed"]) == 2
    err = _err(capsys)
    assert "count the reference words of split 'test' differently" in err and "evaluation.normalizer" in err
    assert str(runs / "fixed-1") in err and str(runs / "parp-0") in err and "Traceback" not in err


def test_report_compare_names_the_runs_without_per_utterance_errors(tmp_path, capsys):
    runs = tmp_path / "runs"
    for s in range(2):
        _fake_run(runs, f"parp-{s}", "parp", s, [1, 2, 3])
        _fake_run(runs, f"fixed-{s}", "fixed", s, [2, 2, 2])
    (runs / "fixed-1" / "transcripts_final.jsonl").unlink()
    assert main(["report", str(runs), "--compare", "parp", "fixed", "--output-dir", str(tmp_path / "rep")]) == 2
    err = _err(capsys)
    assert f"{runs / 'fixed-1'} has no per-utterance errors on 'test'" in err and "parp-0" not in err
    assert not (tmp_path / "rep").exists()


def test_report_compare_escapes_a_bar_in_method_labels(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "a", "parp", 0, [1, 2, 3])
    _fake_run(runs, "b", "fixed", 0, [2, 2, 2])
    (runs / "sweep.json").write_text(json.dumps({"points": [{"name": "a", "axes": {"method": "parp|magnitude"}},
                                                            {"name": "b", "axes": {"method": "fixed"}}]}))
    assert main(["report", str(runs), "--compare", "parp|magnitude", "fixed", "--output-dir", str(tmp_path / "rep")]) == 0
    for name, row in (("table.md", "| parp\\|magnitude | 0.5 |"), ("compare.md", "| parp\\|magnitude | fixed | 0.5 |")):
        lines = (tmp_path / "rep" / name).read_text().splitlines()
        assert row in (tmp_path / "rep" / name).read_text()
        cells = [len(re.split(r"(?<!\\)\|", line)) for line in lines[:3]]  # header, rule, first row
        assert cells[0] == cells[1] == cells[2]


def test_the_plot_draws_a_zero_shot_line_only_where_the_runs_share_one(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from parpkit.report import plot_sparsity

    labels = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: labels.append(fig.axes[0].get_legend_handles_labels()[1]))
    for name, seed in (("a0", 0), ("a1", 1)):
        run = _fake_run(tmp_path / "runs", name, "parp", seed, [1] * 10)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["stages"]["dense"] = {"wer": 0.3, "splits": {"test": {"wer": 0.3}}}
        (run / "metrics.json").write_text(json.dumps(metrics))
    plot_sparsity(collect([tmp_path / "runs"])[0], tmp_path / "one.png")
    assert sorted(labels[-1]) == ["parp", "zero-shot (0.300)"]
    metrics["stages"]["dense"] = {"wer": 0.4, "splits": {"test": {"wer": 0.4}}}  # a1's zero-shot differs (another model)
    (tmp_path / "runs" / "a1" / "metrics.json").write_text(json.dumps(metrics))
    plot_sparsity(collect([tmp_path / "runs"])[0], tmp_path / "two.png")
    assert labels[-1] == ["parp"]  # not the first run's line as if both shared it


def test_two_sweeps_points_of_one_name_get_a_heatmap_each(tmp_path):
    from parpkit.report import write_report

    sheet = ("name,shape,numel,zeros,sparsity\nmodel.encoder.layers.0.fc1.weight,4x4,16,{z},{s}\n"
             "model.encoder.layers.1.fc1.weight,4x4,16,8,0.5\n")
    for sweep, zeros in (("sweep_a", 4), ("sweep_b", 12)):  # the same point name in two sweeps
        run = _fake_run(tmp_path / sweep, "method-parp_seed-0", "parp", 0 if sweep == "sweep_a" else 1, [1] * 10)
        (run / "sparsity.csv").write_text(sheet.format(z=zeros, s=zeros / 16))
    rows, _ = collect([tmp_path / "sweep_a", tmp_path / "sweep_b"])
    write_report(rows, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "heatmaps").iterdir()) == [
        "sweep_a__method-parp_seed-0.png", "sweep_b__method-parp_seed-0.png"]  # had been one, the second over the first
