"""Issue 33: data that used to be cut, dropped or counted silently (manifest rows, TIMIT damage, references that
normalise to nothing, audio of another shape or scale) is refused when the split loads, naming file, line or
utterance; utterances the model cannot take are named then too, not at the first training batch."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from parpkit.cli import main
from parpkit.errors import ParpkitError
from parpkit.interfaces import Utterance
from parpkit.progress import QUIET
from parpkit.splits import check_utterances
from parpkit.testing import check_dataset
from tests.conftest import requires_offline, tiny_ctc_recipe, tiny_recipe, write_recipe


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def _wav(path: Path, seconds: float = 0.5) -> str:
    sf.write(path, (np.random.default_rng(0).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32), 16000)
    return str(path)


def _manifest(tmp_path, name: str, text: str, **options):
    from parpkit_plugins.datasets.manifest import Manifest, ManifestOptions

    (tmp_path / name).write_text(text)
    return Manifest(ManifestOptions.model_validate({"splits": {"train": str(tmp_path / name)}, **options}), cache_dir=tmp_path)


# ------------------------------------------------------------------------------------ manifests

@pytest.mark.parametrize("name, text, message", [
    ("m.csv", "audio,text\n{a},hello\n{b},hello, world and more\n",
     r"m\.csv:3: row 2 has 3 fields, but the header has 2 columns \(a comma inside a transcript\? put the field in double quotes\)"),
    ("m.tsv", "audio\ttext\n{a}\thello\n{b}\thello\tworld\n", r"m\.tsv:3: row 2 has 3 fields, but the header has 2 columns \(a tab"),
    ("m.csv", "audio,text,speaker\n{a},hello,s1\n{b},hello\n", r"m\.csv:3: row 2 has 2 fields, but the header has 3 columns"),
])
def test_manifest_rows_with_more_or_fewer_fields_than_columns_are_refused_naming_file_and_line(tmp_path, name, text, message):
    a, b = _wav(tmp_path / "a.wav"), _wav(tmp_path / "b.wav")
    m = _manifest(tmp_path, name, text.format(a=a, b=b))
    with pytest.raises(ParpkitError, match=message):
        m.check()  # what validate runs
    with pytest.raises(ParpkitError, match=message):
        m.load_split("train", QUIET)


def test_a_quoted_comma_is_one_field(tmp_path):
    a = _wav(tmp_path / "a.wav")
    m = _manifest(tmp_path, "m.csv", f'audio,text\n{a},"hello, world and more"\n')
    assert [u.text for u in check_dataset(m, scored=["train"])["train"]] == ["hello, world and more"]


def test_a_misspelled_text_column_is_refused_by_validate(tmp_path, capsys):
    a = _wav(tmp_path / "a.wav", 1.0)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": a, "text": "hello there"}) + "\n")
    dataset = {"name": "manifest", "options": {"splits": {"train": str(tmp_path / "m.jsonl"), "test": str(tmp_path / "m.jsonl")},
                                               "text_column": "txet"}}
    path = write_recipe(tmp_path / "r.yaml", tiny_ctc_recipe(dataset=dataset))
    assert main(["validate", str(path)]) == 2
    assert re.search(r"dataset\.options: .*m\.jsonl: no column 'txet' \(text_column\); columns are audio, text \(did you mean "
                     r"'text'\?\)", _err(capsys))
    # left out, a missing text column is still unlabelled audio (for distillation)
    unlabelled = _manifest(tmp_path, "u.jsonl", json.dumps({"audio": a}) + "\n")
    assert [u.text for u in check_dataset(unlabelled, scored=[])["train"]] == [None]


# ------------------------------------------------------------------------------------ TIMIT

@pytest.fixture(scope="module")
def timit(tmp_path_factory):
    from tests.conftest import OFFLINE
    from tests.timit_tree import write_tree

    if not OFFLINE:
        pytest.skip("needs the offline extra")
    return write_tree(tmp_path_factory.mktemp("timit") / "TIMIT")


def _timit(root, **kw):
    from parpkit_plugins.datasets.timit import Timit, TimitOptions

    return Timit(TimitOptions(root=str(root), **kw), cache_dir=root.parent)


@requires_offline
@pytest.mark.parametrize("damage, targets, message", [
    (lambda spk: (spk / "SX108.WAV").unlink(), "words", r"TIMIT utterance dr1_mdab0_sx108 has no \.WAV file \(found \.PHN, \.TXT, \.WRD\)"),
    (lambda spk: (spk / "SX108.TXT").unlink(), "words", r"TIMIT utterance dr1_mdab0_sx108 has no \.TXT file"),
    (lambda spk: (spk / "SX108.TXT").write_text(""), "words", r"SX108\.TXT:1: expected 'start end sentence', got ''"),
    (lambda spk: (spk / "SX108.TXT").write_text("0 46797 ...\n"), "words", r"SX108\.TXT: holds no sentence"),
    (lambda spk: (spk / "SX108.PHN").write_text("0 2400 h#\n2400 sh\n"), "phones", r"SX108\.PHN:2: expected 'start end phone', got '2400 sh'"),
    (lambda spk: (spk / "SX108.PHN").unlink(), "phones", r"TIMIT utterance dr1_mdab0_sx108 has no \.PHN file"),
])
def test_timit_damage_is_refused_or_skipped_and_counted(timit, tmp_path, damage, targets, message):
    copy = tmp_path / "T"
    shutil.copytree(timit, copy)
    damage(copy / "TEST" / "DR1" / "MDAB0")
    with pytest.raises(ParpkitError, match=message + r".*set dataset\.options\.skip_unreadable: true to skip \(and count\)"):
        _timit(copy, targets=targets).load_split("core_test", QUIET)
    t = _timit(copy, targets=targets, skip_unreadable=True)
    assert [u.id for u in check_dataset(t, ["core_test"])["core_test"]] == ["dr1_mdab0_si648"]  # scored on 1 of 2: said
    assert t.report()["skipped_unreadable"] == 1 and re.search(message, t.report()["skipped_files"][0])


@requires_offline
def test_an_intact_timit_tree_passes_the_engines_checks(timit):
    loaded = check_dataset(_timit(timit, targets="phones"), ["train", "core_test"])
    assert len(loaded["train"]) == 6 and len(loaded["core_test"]) == 2


# ------------------------------------------------------------------------------------ references and audio

def test_a_reference_that_normalises_to_nothing_is_refused_when_the_split_loads(tmp_path, capsys):
    a, b = _wav(tmp_path / "a.wav", 1.0), _wav(tmp_path / "b.wav", 1.0)
    (tmp_path / "train.jsonl").write_text(json.dumps({"audio": a, "text": "hello there", "id": "t1"}) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"audio": a, "text": "hello there", "id": "u1"}) + "\n"
                                         + json.dumps({"audio": b, "text": "?!", "id": "u2"}) + "\n")
    dataset = {"name": "manifest", "options": {"splits": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
                                               "id_column": "id"}}
    path = write_recipe(tmp_path / "r.yaml", tiny_ctc_recipe(dataset=dataset, **{"training.max_steps": 1}))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert ("dataset.eval_split: split 'test': 1 of its 2 transcripts are empty once normalised ('u2' ('?!')): they would "
            "be counted but never scored") in _err(capsys)
    assert not (tmp_path / "out" / "transcripts_dense.jsonl").exists()


def _utt(audio, text="hello", **kw) -> Utterance:
    return Utterance(kw.pop("id", "u1"), audio, kw.pop("sample_rate", 16000), text, **kw)


@pytest.mark.parametrize("utterance, message", [
    (_utt(np.zeros((2, 8000), np.float32)), r"utterance 'u1' has audio of shape \(2, 8000\); expected mono"),
    (_utt((np.ones(8000) * 1000).astype(np.int16)), r"utterance 'u1' has int16 samples; expected floats in \[-1, 1\]"),
    (_utt(np.full(8000, 0.5e6, np.float32)), r"utterance 'u1' has samples up to 5e\+05; expected floats in \[-1, 1\]"),
    (_utt(np.zeros(8000, np.float32), text=5), r"utterance 'u1' has a transcript of type int \(5\); expected text"),
    (_utt(np.zeros(8000, np.float32), id=7), r"utterance 0 has the id 7; expected non-empty text"),
])
def test_audio_and_transcripts_of_another_shape_type_or_scale_are_refused(utterance, message):
    with pytest.raises(ParpkitError, match=r"dataset: split 'train': " + message):
        check_utterances([utterance], "train")


# ------------------------------------------------------------------------------------ lengths

@requires_offline
@pytest.mark.parametrize("scored", ["test", ["test", "train"]])  # the training split scored too: still checked as trained
@pytest.mark.parametrize("audio_s, words, message", [
    (7.0, "hello there", r"dataset: split 'train': whisper: utterance 'train-000001' lasts 7\.0 s, longer than the encoder "
                         r"window of 6 s; raise backbone\.options\.encoder_window_s"),
    (1.0, "word " * 70, r"dataset: split 'train': whisper: the transcript of utterance 'train-000001' is \d+ tokens; the "
                        r"decoder holds 64"),
])
def test_a_training_clip_or_transcript_the_model_cannot_take_is_named_before_any_evaluation(tmp_path, capsys, audio_s, words,
                                                                                            message, scored):
    ok, long = _wav(tmp_path / "a.wav", 1.0), _wav(tmp_path / "b.wav", audio_s)
    rows = [{"audio": ok, "text": "hello there"}, {"audio": long, "text": words.strip()}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps(rows[0]) + "\n")
    dataset = {"name": "manifest", "options": {"splits": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}}}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(dataset=dataset, **{"training.max_steps": 1, "dataset.eval_split": scored}))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert re.search(message, _err(capsys))
    assert not (tmp_path / "out" / "transcripts_dense.jsonl").exists()  # before the dense evaluation
