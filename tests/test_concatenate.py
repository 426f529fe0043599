"""``dataset.concatenate``: training passages joined from several utterances of a speaker, so that a model
fine-tuned on single sentences keeps transcribing recordings as long as its window."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import parpkit
from parpkit.augment import AUGMENTED, AugmentedDataset, Concatenator, joins_any
from parpkit.errors import ParpkitError
from parpkit.interfaces import Utterance
from parpkit.recipe import ConcatenateSection
from tests.conftest import requires_offline, tiny_recipe


def _items(n: int = 12, speakers: int = 3, rate: int = 100) -> list[Utterance]:
    """Utterances of 1-3 s whose samples say which utterance they are (value i + 1), at a toy rate."""
    return [Utterance(id=f"u{i}", audio=np.full(rate * (1 + i % 3), i + 1, np.float32), sample_rate=rate,
                      text=f"word{i}", speaker=f"s{i % speakers}") for i in range(n)]


def _pieces(audio: np.ndarray) -> list[int]:
    """The utterances a joined passage holds, in order (silence between them is 0)."""
    values = [int(v) - 1 for v in audio if v != 0]
    return [v for k, v in enumerate(values) if k == 0 or values[k - 1] != v]


def test_a_passage_joins_utterances_of_one_speaker_within_max_seconds_with_silence_between():
    items = _items()
    options = ConcatenateSection(p=1.0, max_seconds=7.0, gap_seconds=(0.2, 0.5))
    c = Concatenator(items, options, seed=0)
    joined = 0
    for i, first in enumerate(items):
        u = c(i, epoch=0)
        ids = _pieces(u.audio)
        assert ids[0] == i and u.id == first.id
        assert len(u.audio) <= 7.0 * 100
        assert {items[j].speaker for j in ids} == {first.speaker} and len(set(ids)) == len(ids)
        assert u.text == " ".join(items[j].text for j in ids)
        if len(ids) > 1:
            joined += 1
            assert u.extra[AUGMENTED] and u.extra["concatenated"] == [items[j].id for j in ids]
            gaps = len(u.audio) - sum(len(items[j].audio) for j in ids)
            assert 0.2 * 100 * (len(ids) - 1) <= gaps <= 0.5 * 100 * (len(ids) - 1)
        else:
            assert u is first
    assert joined >= len(items) - 2  # every speaker has 4 utterances of 1-3 s: nearly all join something


def test_draws_follow_seed_utterance_and_epoch_and_p_is_the_share_joined():
    items = _items(n=200, speakers=4)
    options = ConcatenateSection(p=0.3, max_seconds=6.0)
    c = Concatenator(items, options, seed=0)
    assert all(np.array_equal(c(i, 1).audio, Concatenator(items, options, seed=0)(i, 1).audio) for i in range(50))
    epochs = [[_pieces(c(i, e).audio) for i in range(200)] for e in (0, 1)]
    assert epochs[0] != epochs[1]
    assert [_pieces(Concatenator(items, options, seed=1)(i, 0).audio) for i in range(200)] != epochs[0]
    share = np.mean([len(p) > 1 for p in epochs[0]])
    assert 0.2 < share < 0.4
    # across speakers when asked; an unlabelled utterance is served as it is, and never joined to another
    mixed = Concatenator(items, ConcatenateSection(p=1.0, max_seconds=9.0, same_speaker=False), seed=0)
    assert any(len({items[j].speaker for j in _pieces(mixed(i, 0).audio)}) > 1 for i in range(20))
    items[5] = Utterance(id="u5", audio=items[5].audio, sample_rate=100, text=None, speaker=items[5].speaker)
    c = Concatenator(items, ConcatenateSection(p=1.0, max_seconds=9.0), seed=0)
    assert c(5, 0) is items[5]
    assert all(5 not in _pieces(c(i, 0).audio) for i in range(200) if i != 5)


def test_the_dataset_joins_then_augments_and_follows_the_epoch():
    items = _items()
    ds = AugmentedDataset(items, [], 0, ConcatenateSection(p=1.0, max_seconds=7.0))
    first = [_pieces(ds[i].audio) for i in range(len(ds))]
    ds.set_epoch(3)
    assert [_pieces(ds[i].audio) for i in range(len(ds))] != first
    pytest.importorskip("audiomentations")
    gain = [{"name": "Gain", "min_gain_db": -6.0, "max_gain_db": -6.0, "p": 1.0}]  # halves every sample, gaps stay 0
    items = [dataclasses.replace(u, audio=u.audio / 100) for u in items]  # under full scale, which augment keeps
    louder = AugmentedDataset(items, [], 0, ConcatenateSection(p=1.0, max_seconds=7.0))
    softer = AugmentedDataset(items, gain, 0, ConcatenateSection(p=1.0, max_seconds=7.0))
    for i in range(len(items)):
        a, b = louder[i], softer[i]
        assert len(b.audio) == len(a.audio) > len(items[i].audio) or len(a.extra.get("concatenated", [])) < 2
        assert np.allclose(b.audio, a.audio * 10 ** (-6 / 20), atol=1e-4)  # the whole passage augmented
    with pytest.raises(ValueError, match="gap_seconds"):
        ConcatenateSection(gap_seconds=(0.5, 0.1))
    with pytest.raises(ValueError, match=r"gap_seconds \[5.0, 6.0\]: every gap is at least max_seconds \(5\), so no passage"):
        ConcatenateSection(max_seconds=5, gap_seconds=(5, 6))
    assert ConcatenateSection(max_seconds=5, gap_seconds=(1, 5)).gap_seconds == (1, 5)  # some gaps leave room


def test_joins_any_says_whether_two_utterances_fit_a_passage():
    """The check behind a run's "joins no passage" warning: the two shortest labelled utterances of a speaker
    (of the split, without same_speaker) and the shortest gap against max_seconds."""
    def utt(i, seconds, speaker, text="a."):
        return Utterance(id=f"u{i}", audio=np.zeros(int(seconds * 100), np.float32), sample_rate=100, text=text,
                         speaker=speaker)
    items = [utt(0, 2.0, "a"), utt(1, 3.0, "b"), utt(2, 2.5, "a"), utt(3, 1.0, "c", text=None)]
    fits = ConcatenateSection(max_seconds=4.8, gap_seconds=(0.3, 0.5))    # a's two: 2.0 + 0.3 + 2.5 = 4.8
    assert joins_any(items, fits)
    assert not joins_any(items, ConcatenateSection(max_seconds=4.7, gap_seconds=(0.3, 0.5)))
    # across speakers a's 2.0 and b's 3.0 are no shorter; the unlabelled 1.0 s one is never joined
    assert not joins_any(items, ConcatenateSection(max_seconds=4.7, gap_seconds=(0.3, 0.5), same_speaker=False))
    assert joins_any(items[:2], ConcatenateSection(max_seconds=5.3, gap_seconds=(0.3, 0.5), same_speaker=False))
    assert not joins_any(items[:2], ConcatenateSection(max_seconds=5.3, gap_seconds=(0.3, 0.5)))  # one each


@requires_offline
def test_a_run_trains_on_joined_passages_and_refuses_ones_longer_than_its_window(tmp_path, monkeypatch):
    """Passages change training only (the scored splits are as they were), the collated batches hold joined
    transcripts, and a max_seconds past the training window is refused before anything trains."""
    base = {"training.max_steps": 4, "training.batch_size": 4, "pruning.schedule": {"name": "fixed"},
            "training.learning_rate": 3e-3, "dataset.options.speakers": {"train": 1, "test": 2}}
    plain = parpkit.run(tiny_recipe(**base), output_dir=tmp_path / "plain", progress=False)
    served: list[Utterance] = []
    call = Concatenator.__call__
    monkeypatch.setattr(Concatenator, "__call__", lambda self, i, e: (u := call(self, i, e), served.append(u))[0])
    joined = parpkit.run(tiny_recipe(**base, **{"dataset.concatenate": {"p": 1.0, "max_seconds": 5.9}}),
                         output_dir=tmp_path / "joined", progress=False)
    metrics = {k: json.loads((r.run_dir / "metrics.json").read_text()) for k, r in (("plain", plain), ("joined", joined))}
    assert metrics["plain"]["stages"]["dense"] == metrics["joined"]["stages"]["dense"]
    assert metrics["plain"]["train_loss"] != metrics["joined"]["train_loss"]
    passages = [u for u in served if "concatenated" in u.extra]
    assert len(served) == 16 and len(passages) >= 2  # 2-3 s sentences: two fit 5.9 s now and then
    assert all(u.text.count(".") == len(u.extra["concatenated"]) >= 2 for u in passages)
    assert all(len(u.audio) <= 5.9 * u.sample_rate for u in served)
    log = (joined.run_dir / "log.jsonl").read_text()
    assert '"event": "warning"' not in log
    # 2-3 s sentences: no two fit 3.5 s, and the run says so (it still trains, on the utterances alone)
    alone = parpkit.run(tiny_recipe(**base, **{"dataset.concatenate": {"p": 1.0, "max_seconds": 3.5}}),
                        output_dir=tmp_path / "alone", progress=False)
    warnings = [json.loads(line)["message"] for line in (alone.run_dir / "log.jsonl").read_text().splitlines()
                if json.loads(line)["event"] == "warning"]
    assert [w.split(":")[0] for w in warnings] == ["dataset.concatenate joins no passage"]
    assert "fit max_seconds 3.5 s with the shortest gap (0.2 s)" in warnings[0] and "same_speaker: false" in warnings[0]
    # refused by validation (no data read, no model loaded), so before the run claims its directory
    with pytest.raises(ParpkitError, match=r"dataset\.concatenate\.max_seconds: 10 s: the longest passage must fit the "
                                           r"training window of 6 s"):
        parpkit.run(tiny_recipe(**base, **{"dataset.concatenate": {"max_seconds": 10}}), output_dir=tmp_path / "long",
                    progress=False)
    assert not (tmp_path / "long").exists()
