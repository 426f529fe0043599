"""Statistics in reports: per-utterance errors as the rates count them, paired bootstrap intervals that cover a
known difference, and every seed's value in table.md."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from parpkit.cli import main
from parpkit.engine.evaluation import evaluate
from parpkit.interfaces import Utterance
from parpkit.progress import Progress
from parpkit.report import collect, compare, markdown
from parpkit.stats import edit_counts, paired_bootstrap, seed_bootstrap

WORDS = [f"w{i}" for i in range(10)]


def _fake_run(root: Path, name: str, schedule: str, seed: int, drops: list[int]) -> Path:
    """A finished run whose final transcripts drop ``drops[i]`` of utterance i's ten words."""
    run = root / name
    run.mkdir(parents=True)
    rows, edits, words = [], 0, 0
    for i, k in enumerate(drops):
        ref, hyp = " ".join(WORDS), " ".join(WORDS[k:])
        e, w = edit_counts(ref, hyp)
        edits, words = edits + e, words + w
        rows.append(json.dumps({"split": "test", "id": f"u{i}", "reference": ref, "hypothesis": hyp, "edits": e, "words": w}))
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
    assert rates["wer"] == pytest.approx(sum(r["edits"] for r in rows) / sum(r["words"] for r in rows))


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
    assert main(["report", str(tmp_path / "runs"), "--compare", "parp", "omp"]) == 2
    assert "no method 'omp'" in capsys.readouterr().err
