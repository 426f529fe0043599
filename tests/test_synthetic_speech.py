import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from parpkit.progress import QUIET
from parpkit_plugins.datasets.synthetic_speech import SyntheticOptions, SyntheticSpeech
from tests.conftest import requires_offline

pytestmark = requires_offline

SMALL = dict(sizes={"train": 12, "validation": 4, "test": 6}, speakers={"train": 3, "validation": 2, "test": 2})


def _corpus(tmp_path, **kw):
    return SyntheticSpeech(SyntheticOptions(**{**SMALL, **kw}), cache_dir=tmp_path)


def test_splits_have_disjoint_speakers_and_sentences(tmp_path):
    d = _corpus(tmp_path)
    splits = {s: d.load_split(s, QUIET) for s in ("train", "validation", "test")}
    assert {s: len(u) for s, u in splits.items()} == SMALL["sizes"]
    speakers = {s: {u.speaker for u in us} for s, us in splits.items()}
    texts = {s: {u.text for u in us} for s, us in splits.items()}
    assert {s: len(v) for s, v in speakers.items()} == SMALL["speakers"]
    for a in splits:
        for b in splits:
            if a < b:
                assert not speakers[a] & speakers[b]
                assert not texts[a] & texts[b]
    for us in splits.values():
        for u in us:
            assert u.sample_rate == 16000 and u.audio.dtype == np.float32
            assert 0.5 < len(u.audio) / 16000 < 10 and 0.01 < np.abs(u.audio).max() <= 1.0
            assert u.text.endswith(".") and len(u.text.split()) >= 3


def test_corpus_is_deterministic_and_seeded(tmp_path):
    a = _corpus(tmp_path / "a").load_split("test", QUIET)
    b = _corpus(tmp_path / "b").load_split("test", QUIET)
    assert [u.text for u in a] == [u.text for u in b]
    assert all(np.array_equal(x.audio, y.audio) for x, y in zip(a, b, strict=True))
    c = _corpus(tmp_path / "c", seed=1).load_split("test", QUIET)
    assert [u.text for u in a] != [u.text for u in c]


def test_the_ood_split_is_out_of_domain_in_voice_prosody_and_text(tmp_path):
    from parpkit_plugins.datasets.synthetic_speech.prose import PROSE

    opts = dict(sizes={**SMALL["sizes"], "ood": 20}, speakers={**SMALL["speakers"], "ood": 5}, ood_noise=0.5, ood_reverb=0.5)
    d = _corpus(tmp_path, **opts)
    train = d.load_split("train", QUIET)
    ood = d.load_split("ood", QUIET)
    assert len(ood) == 20 and len({u.speaker for u in ood}) == 5
    # voices: variants the training split never uses; prosody: rates and pitches outside its ranges
    train_variants = {u.speaker.split("+")[1].split("@")[0] for u in train}
    for u in ood:
        variant, prosody = u.speaker.split("+")[1].split("@")
        rate, pitch, intonation = map(int, prosody.split("/"))
        assert variant not in train_variants and variant not in SyntheticOptions().variants
        assert not 140 <= rate <= 190 and not 30 <= pitch <= 70 and intonation != 50
    # text: public-domain prose and sentences with numbers and names, none from the training grammar
    kinds = {u.extra["kind"] for u in ood}
    assert kinds == {"prose", "numbers"}
    assert all(u.text in PROSE for u in ood if u.extra["kind"] == "prose")
    assert not {u.text for u in ood} & {u.text for u in train}
    assert any("noise_snr_db" in u.extra for u in ood) and any("reverb_rt60_s" in u.extra for u in ood)
    assert all(len(u.audio) / 16000 < 9.5 for u in ood)  # fits a 10 s whisper window
    # adding the ood split leaves the other splits' audio exactly as it was
    plain = _corpus(tmp_path / "plain").load_split("train", QUIET)
    assert all(np.array_equal(x.audio, y.audio) and x.text == y.text for x, y in zip(train, plain, strict=True))
    with pytest.raises(ValueError, match="ood_variants must differ from the training variants"):
        SyntheticOptions(ood_variants=["m1", "klatt"])


@pytest.mark.skipif(__import__("shutil").which("flite") is None, reason="needs the flite synthesiser (apt-get install flite)")
def test_the_flite_split_reads_other_sentences_with_another_synthesiser(tmp_path):
    d = _corpus(tmp_path, sizes={"train": 4, "ood": 6, "ood_flite": 8}, speakers={"train": 2, "ood": 3, "ood_flite": 4})
    flite, ood = d.load_split("ood_flite", QUIET), d.load_split("ood", QUIET)
    assert len(flite) == 8 and len({u.speaker for u in flite}) == 4
    assert all(u.speaker.startswith("flite:") for u in flite)
    assert not {u.text for u in flite} & {u.text for u in ood}
    again = _corpus(tmp_path / "again", sizes={"train": 4, "ood": 6, "ood_flite": 8},
                    speakers={"train": 2, "ood": 3, "ood_flite": 4}).load_split("ood_flite", QUIET)
    assert all(np.array_equal(x.audio, y.audio) for x, y in zip(flite, again, strict=True))  # deterministic


def test_an_unknown_ood_variant_is_refused_not_ignored(tmp_path):
    from parpkit.errors import ParpkitError

    d = _corpus(tmp_path, sizes={"train": 2, "ood": 2}, speakers={"train": 1, "ood": 1}, ood_variants=["klatt", "Mr_Serious"])
    with pytest.raises(ParpkitError, match="espeak-ng has no voice variant 'Mr_Serious'"):
        d.load_split("ood", QUIET)


@pytest.mark.parametrize("speakers, message", [({"train": 3}, r"speakers\.train: 3 speakers for 2 utterances"),
                                               ({"train": 1, "ood": -5}, r"speakers\.ood: -5; a split has 0 or more"),
                                               ({"train": -1}, r"speakers\.train: -1; a split has 0 or more")])
def test_speaker_counts_a_split_cannot_honour_are_refused(speakers, message):
    with pytest.raises(ValueError, match=message):
        SyntheticOptions(sizes={"train": 2}, speakers=speakers)


def test_sentences_use_a_real_vocabulary(tmp_path):
    d = SyntheticSpeech(SyntheticOptions(sizes={"train": 300}, speakers={"train": 10}), cache_dir=tmp_path)
    plan = d.plan()["train"]
    words = {w.strip(".").lower() for row in plan for w in row["text"].split()}
    assert len({row["text"] for row in plan}) == 300 and len(words) > 150


def test_cache_is_reused_and_a_damaged_one_rebuilt(tmp_path):
    d = _corpus(tmp_path)
    first = d.load_split("train", QUIET)
    directory = d.corpus_dir
    stamp = (directory / "COMPLETE").stat().st_mtime_ns
    d.load_split("train", QUIET)
    assert (directory / "COMPLETE").stat().st_mtime_ns == stamp  # reused, not rebuilt
    # a truncated audio file: detected by its recorded size, rebuilt
    data = (directory / "train.npy").read_bytes()
    (directory / "train.npy").write_bytes(data[: len(data) // 2])
    again = d.load_split("train", QUIET)
    assert all(np.array_equal(x.audio, y.audio) for x, y in zip(first, again, strict=True))
    # no completion marker: never trusted
    (directory / "COMPLETE").unlink()
    assert len(d.load_split("test", QUIET)) == 6 and (directory / "COMPLETE").exists()


def test_a_build_killed_midway_leaves_no_corpus_and_the_next_run_rebuilds(tmp_path):
    child = f"""
import time
from parpkit_plugins.datasets.synthetic_speech import SyntheticSpeech, SyntheticOptions
from parpkit_plugins.datasets.synthetic_speech.espeak import Espeak
from parpkit.progress import QUIET
synth = Espeak.synth
def slow(self, *a, **k):
    time.sleep(0.05)
    return synth(self, *a, **k)
Espeak.synth = slow
SyntheticSpeech(SyntheticOptions(**{SMALL!r}), cache_dir={str(tmp_path)!r}).load_split("train", QUIET)
"""
    proc = subprocess.Popen([sys.executable, "-c", child])
    d = _corpus(tmp_path)
    root = d.corpus_dir.parent
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".tmp-") and any(p.glob("*.jsonl")) for p in root.glob(".tmp-*")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not d.corpus_dir.exists()  # the half-written build never took the corpus's name
    utts = d.load_split("validation", QUIET)
    assert len(utts) == 4
    manifest = json.loads((d.corpus_dir / "COMPLETE").read_text())
    assert manifest["splits"]["train"]["utterances"] == 12


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="unknown split"):
        SyntheticOptions(sizes={"dev": 3})
    with pytest.raises(ValueError, match="no speakers"):
        SyntheticOptions(sizes={"train": 3}, speakers={"train": 0})


def _plan(tmp_path, **kw):
    return SyntheticSpeech(SyntheticOptions(**kw), cache_dir=tmp_path).plan()


REPORTED = dict(sizes={"train": 24, "validation": 8, "test": 12, "ood": 30, "ood_flite": 30},
                speakers={"train": 4, "validation": 2, "test": 3, "ood": 10, "ood_flite": 4})
WITH_VALIDATION = dict(sizes={**REPORTED["sizes"], "validation_ood": 30, "validation_flite": 30},
                       speakers={**REPORTED["speakers"], "validation_ood": 10, "validation_flite": 4})


def test_validation_splits_share_no_sentence_voice_or_seed_with_the_reported_ones(tmp_path):
    plan = _plan(tmp_path, **WITH_VALIDATION)
    assert {s: len(rows) for s, rows in plan.items()} == WITH_VALIDATION["sizes"]
    texts = {s: {r["text"] for r in rows} for s, rows in plan.items()}
    for a in plan:
        for b in plan:
            if a < b:
                assert not texts[a] & texts[b], (a, b)
    variant = lambda rows: {r["voice"].split("+")[1] for r in rows}  # noqa: E731 (the speaker of an espeak-ng voice)
    assert len(variant(plan["ood"])) >= 5 and len(variant(plan["validation_ood"])) == 10  # one voice per variant
    assert not variant(plan["ood"]) & variant(plan["validation_ood"])
    assert not variant(plan["validation_ood"]) & variant(plan["train"] + plan["test"] + plan["validation"])
    assert {r["voice"] for r in plan["ood_flite"]} == {"slt", "rms"}
    assert {r["voice"] for r in plan["validation_flite"]} == {"awb", "kal16"}
    seeds = {s: {r["seed"] for r in rows if "seed" in r} for s, rows in plan.items()}
    assert not seeds["validation_ood"] & (seeds["ood"] | seeds["test"] | seeds["train"])
    # adding the out-of-domain validation splits changes no other split
    assert all(_plan(tmp_path, **REPORTED)[s] == plan[s] for s in REPORTED["sizes"])


def test_validation_flite_voices_must_differ_from_the_reported_ones():
    with pytest.raises(ValueError, match=r"validation_flite_voices must differ from flite_voices.*\['awb'\]"):
        SyntheticOptions(sizes={"ood_flite": 4, "validation_flite": 4}, speakers={"ood_flite": 2, "validation_flite": 2},
                         flite_voices=["slt", "awb"])
    with pytest.raises(ValueError, match="the validation_flite split needs validation_flite_voices"):
        SyntheticOptions(sizes={"validation_flite": 4}, speakers={"validation_flite": 2}, validation_flite_voices=[])


def test_docs_text_gives_disjoint_plain_english_sentences_none_from_the_out_of_domain_sources(tmp_path):
    from parpkit_plugins.datasets.synthetic_speech.prose import PROSE
    from parpkit_plugins.datasets.synthetic_speech.sentences import docs_sentences

    pool = docs_sentences()
    assert len(pool) == 3611 and len({s.lower() for s in pool}) == len(pool)
    plan = _plan(tmp_path, text="docs", sizes={"train": 200, "validation": 20, "test": 40, "ood_flite": 20},
                 speakers={"train": 8, "validation": 2, "test": 3, "ood_flite": 2})
    texts = {s: [r["text"] for r in rows] for s, rows in plan.items()}
    assert all(t in pool for s in ("train", "validation", "test") for t in texts[s])
    assert not set(texts["train"]) & set(texts["test"]) and not set(texts["validation"]) & set(texts["test"] + texts["train"])
    assert not set(pool) & set(PROSE) and not set(texts["ood_flite"]) & set(pool)
    words = {w.strip(",.").lower() for t in texts["train"] for w in t.split()}
    assert len(words) > 600  # 200 sentences; the grammar's whole vocabulary is about 200 words
    with pytest.raises(ValueError, match="text docs has 3,611 sentences; the in-domain splits ask for 4,000"):
        _plan(tmp_path, text="docs", sizes={"train": 4000}, speakers={"train": 8})


def test_seconds_gives_in_domain_utterances_of_the_asked_length(tmp_path):
    """seconds [2, 4] (grid_v3's short utterances): every in-domain sentence is chosen for its speaker's rate,
    the splits stay disjoint, and the synthesised audio lands in the range (a little spill past it is the
    estimate's error; none reaches a 5 s training window). Without the option nothing changes, cache key
    included: corpora built before it are reused."""
    from parpkit_plugins.datasets.synthetic_speech import SECONDS_MARGIN, spoken_seconds

    sizes = {"train": 120, "validation": 20, "test": 40}
    speakers = {"train": 12, "validation": 4, "test": 6}
    for text in ("docs", "grammar"):
        plan = _plan(tmp_path, text=text, sizes=sizes, speakers=speakers, seconds=(2, 4))
        texts = {s: [r["text"] for r in rows] for s, rows in plan.items()}
        assert {s: len(t) for s, t in texts.items()} == sizes
        assert len({t for ts in texts.values() for t in ts}) == sum(sizes.values())  # disjoint, no repeats
        assert all(2 + SECONDS_MARGIN <= spoken_seconds(r["text"], r["rate"]) <= 4 - SECONDS_MARGIN
                   for rows in plan.values() for r in rows)
    d = _corpus(tmp_path, text="docs", sizes=sizes, speakers=speakers, seconds=(2, 4))
    lengths = np.array([len(u.audio) / 16000 for s in sizes for u in d.load_split(s, QUIET)])
    assert ((lengths >= 2) & (lengths <= 4)).mean() > 0.9
    assert lengths.min() > 1.4 and lengths.max() < 4.7
    # without seconds, the docs sentences run from about 1 s to past 7 s; the corpus and its key are as before
    plain = _plan(tmp_path, text="docs", sizes=sizes, speakers=speakers)
    assert max(spoken_seconds(r["text"], r["rate"]) for rows in plain.values() for r in rows) > 5
    assert SyntheticSpeech(SyntheticOptions(**SMALL), cache_dir=tmp_path)._key() == _corpus(tmp_path, seconds=None)._key()
    assert _corpus(tmp_path)._key() != _corpus(tmp_path, seconds=(2, 4))._key()
    before = SyntheticOptions(text="docs", sizes={"train": 240, "validation": 40, "validation_ood": 40, "validation_flite": 40},
                              speakers={"train": 24, "validation": 6, "validation_ood": 10, "validation_flite": 6})
    assert SyntheticSpeech(before, cache_dir=tmp_path)._key() == "962aa5f46623adb9"  # the key that corpus had before
    with pytest.raises(ValueError, match="seconds"):
        SyntheticOptions(seconds=(2, 2.5))
    with pytest.raises(ValueError, match=r"of 400 sentences fit 2-4 s .* no more are left"):
        _plan(tmp_path, text="grammar", sizes={"train": 400}, speakers={"train": 4}, seconds=(2, 4), rate=(100, 100))


@pytest.mark.parametrize("text", ["grammar", "docs"])
def test_the_extra_split_changes_no_other_split_and_shares_no_sentence_or_speaker(tmp_path, text):
    """``extra`` (a calibration set larger than the training split) is planned after everything else."""
    without = _plan(tmp_path, text=text, **WITH_VALIDATION)
    sizes, speakers = {**WITH_VALIDATION["sizes"], "extra": 40}, {**WITH_VALIDATION["speakers"], "extra": 5}
    plan = _plan(tmp_path, text=text, sizes=sizes, speakers=speakers)
    assert {s: rows for s, rows in plan.items() if s != "extra"} == without
    extra = plan["extra"]
    assert len(extra) == 40 and len({r["speaker"] for r in extra}) == 5
    others = [r for s, rows in without.items() for r in rows]
    assert not {r["text"] for r in extra} & {r["text"] for r in others}
    assert not {r["voice"] for r in extra} & {r["voice"] for s in ("train", "validation", "test") for r in without[s]}
    assert not {r["seed"] for r in extra} & {r.get("seed") for r in others}
    assert len({r["text"] for r in extra}) == 40
    with pytest.raises(ValueError, match="extra speakers asked for"):
        _plan(tmp_path, text=text, sizes={**sizes, "extra": 200}, speakers={**speakers, "extra": 200})


@pytest.mark.parametrize("text", ["grammar", "docs"])
def test_long_splits_are_passages_of_unread_sentences_that_change_no_other_split(tmp_path, text):
    """``test_long`` and ``validation_long`` join sentences no other split reads into passages of
    ``long_seconds``, by speakers of their own; asking for either changes no other split (nor the other), and
    corpora without them keep their cache key."""
    from parpkit_plugins.datasets.synthetic_speech import sentences_of

    with_extra = {"sizes": {**WITH_VALIDATION["sizes"], "extra": 20}, "speakers": {**WITH_VALIDATION["speakers"], "extra": 3}}
    without = _plan(tmp_path, text=text, **with_extra)
    sizes = {**with_extra["sizes"], "test_long": 10, "validation_long": 8}  # test_long larger: the sentence stream grows
    speakers = {**with_extra["speakers"], "test_long": 2, "validation_long": 3}
    plan = _plan(tmp_path, text=text, sizes=sizes, speakers=speakers)
    assert {s: rows for s, rows in plan.items() if not s.endswith("_long")} == without
    only_validation = _plan(tmp_path, text=text, sizes={k: v for k, v in sizes.items() if k != "test_long"},
                            speakers={k: v for k, v in speakers.items() if k != "test_long"})
    assert only_validation["validation_long"] == plan["validation_long"]
    short = {r["text"] for rows in without.values() for r in rows}
    pieces = {}
    for split in ("test_long", "validation_long"):
        rows = plan[split]
        assert len(rows) == sizes[split] and len({r["speaker"] for r in rows}) == speakers[split]
        pieces[split] = [p for r in rows for p in sentences_of(r["text"])]
        assert all(len(sentences_of(r["text"])) >= 2 for r in rows)  # passages, not sentences
        assert not set(pieces[split]) & short
        assert not {r["voice"] for r in rows} & {r["voice"] for s in ("train", "validation", "test", "extra") for r in without[s]}
    assert not set(pieces["test_long"]) & set(pieces["validation_long"])
    assert not {r["voice"] for r in plan["test_long"]} & {r["voice"] for r in plan["validation_long"]}
    assert _corpus(tmp_path)._key() == _corpus(tmp_path, long_seconds=(10, 20))._key()
    with pytest.raises(ValueError, match="long_seconds"):
        SyntheticOptions(long_seconds=(20, 31))


def test_long_passages_last_about_as_long_as_asked(tmp_path):
    """Synthesised, the passages fall in ``long_seconds`` (give or take the estimate's error, which grows with a
    passage's sentences), every one within whisper's 30 s window: one synthesised past it loses its last
    sentences (at the default range, validation_long-00018 of these 120 planned 30.3 s). Asking for test_long
    changes none of validation_long's audio."""
    from parpkit_plugins.datasets.synthetic_speech import LONG_MAX_SECONDS

    sizes, speakers = {"train": 2, "validation_long": 120}, {"train": 1, "validation_long": 12}
    d = _corpus(tmp_path, text="docs", sizes=sizes, speakers=speakers)
    planned = {r["id"]: r["text"] for r in d.plan()["validation_long"]}
    served = d.load_split("validation_long", QUIET)
    lengths = np.array([len(u.audio) / 16000 for u in served])
    assert lengths.min() > 13 and lengths.max() <= LONG_MAX_SECONDS
    assert lengths.mean() > 19  # spread over the range, not bunched at its low end
    shortened = [u for u in served if u.text != planned[u.id]]
    assert shortened and all(planned[u.id].startswith(u.text) for u in shortened)
    both = _corpus(tmp_path, text="docs", sizes={**sizes, "test_long": 4}, speakers={**speakers, "test_long": 2})
    for a, b in zip(served, both.load_split("validation_long", QUIET), strict=True):
        assert a.text == b.text and np.array_equal(a.audio, b.audio)
    # the other splits' audio is what it was without the long split (synthesised before it, in a fresh process)
    plain = _corpus(tmp_path, text="docs", sizes={"train": 2}, speakers={"train": 1})
    assert plain.corpus_dir != d.corpus_dir
    for a, b in zip(plain.load_split("train", QUIET), d.load_split("train", QUIET), strict=True):
        assert a.text == b.text and np.array_equal(a.audio, b.audio)
