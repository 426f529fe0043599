"""Your own data with no manifest to write: a folder of recordings with transcripts.txt or an audiofolder
metadata.csv (the audio_folder dataset), and the manifest's text_column checked like its audio_column."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf

from parpkit.cli import main
from parpkit.errors import ParpkitError
from parpkit.progress import QUIET
from parpkit_plugins.datasets.audio_folder import AudioFolder, AudioFolderOptions
from tests.conftest import requires_offline, tiny_recipe, write_recipe

WORDS = ["hello there", "good morning", "see you soon", "thank you", "how are you", "fine thanks", "well done", "goodbye now"]


def _wav(path, seconds=0.6, rate=22050, stereo=True, seed=0):
    """Noise at another rate and in stereo: the dataset resamples and mixes to 16 kHz mono."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = (np.random.default_rng(seed).standard_normal(int(rate * seconds)) * 0.1).astype(np.float32)
    sf.write(path, np.stack([x, x], axis=1) if stereo else x, rate)
    return path


def _transcribed_folder(folder, names, words=WORDS):
    for i, name in enumerate(names):
        _wav(folder / f"{name}.wav", seed=i)
    (folder / "transcripts.txt").write_text("".join(f"{n} {w}\n" for n, w in zip(names, words, strict=False)))
    return folder


def _dataset(path, **options) -> AudioFolder:
    return AudioFolder(AudioFolderOptions(path=str(path), **options), cache_dir=path)


@requires_offline
def test_a_folder_of_wavs_with_transcripts_trains_the_tiny_whisper_end_to_end(tmp_path):
    root = tmp_path / "my_wavs"
    _transcribed_folder(root / "train", [f"utt{i:02d}" for i in range(6)])
    _transcribed_folder(root / "test", ["a", "b"], ["hello there", "thank you"])
    mapping = tiny_recipe(**{"dataset": {"name": "audio_folder", "options": {"path": str(root)}}, "training.max_steps": 2,
                             "evaluation.dense": False, "evaluation.after_prune": False})
    path = write_recipe(tmp_path / "r.yaml", mapping)
    assert main(["validate", str(path)]) == 0
    out = tmp_path / "run"
    assert main(["run", str(path), "--output-dir", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_utterances"] == 6 and metrics["eval_utterances"] == 2
    hyps = [json.loads(line) for line in (out / "transcripts_final.jsonl").open()]
    assert sorted((h["id"], h["reference"]) for h in hyps) == [("a", "hello there"), ("b", "thank you")]


def test_splits_are_subfolders_and_audio_is_resampled_to_16k_mono(tmp_path):
    _transcribed_folder(tmp_path / "train", ["x1", "x2", "x3"])
    _transcribed_folder(tmp_path / "dev", ["y1"])
    (tmp_path / ".cache").mkdir()  # hidden folders are not splits
    d = _dataset(tmp_path)
    assert d.split_names() == ["dev", "train"]
    utts = d.load_split("train", QUIET)
    assert [(u.id, u.text) for u in utts] == [("x1", WORDS[0]), ("x2", WORDS[1]), ("x3", WORDS[2])]
    assert all(u.sample_rate == 16000 and u.audio.ndim == 1 and abs(len(u.audio) - 9600) <= 1 for u in utts)


def test_one_folder_is_split_by_seeded_fractions_from_an_audiofolder_metadata_csv(tmp_path):
    rows = []
    for i in range(20):
        _wav(tmp_path / "clips" / f"c{i:02d}.flac", stereo=False, rate=16000, seed=i)
        rows.append({"file_name": f"clips/c{i:02d}.flac", "transcription": f"sentence {i}", "speaker": f"s{i % 3}"})
    with (tmp_path / "metadata.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file_name", "transcription", "speaker"])
        w.writeheader()
        w.writerows(rows)
    d = _dataset(tmp_path, fractions={"train": 0.7, "validation": 0.1, "test": 0.2}, speaker_column="speaker")
    assert d.split_names() == ["train", "validation", "test"]
    parts = {s: d.load_split(s, QUIET) for s in d.split_names()}
    assert {s: len(u) for s, u in parts.items()} == {"train": 14, "validation": 2, "test": 4}
    ids = [u.id for us in parts.values() for u in us]
    assert sorted(ids) == sorted(f"clips/c{i:02d}" for i in range(20))  # disjoint, and every recording used
    assert all(u.text == f"sentence {int(u.id[-2:])}" and u.speaker == f"s{int(u.id[-2:]) % 3}" for u in parts["test"])
    again = _dataset(tmp_path, fractions={"train": 0.7, "validation": 0.1, "test": 0.2})
    assert [u.id for u in again.load_split("test", QUIET)] == [u.id for u in parts["test"]]  # the same seed, the same split
    other = _dataset(tmp_path, fractions={"train": 0.7, "validation": 0.1, "test": 0.2}, seed=1)
    assert [u.id for u in other.load_split("test", QUIET)] != [u.id for u in parts["test"]]
    default = _dataset(tmp_path)  # 90/10 unless told otherwise
    assert (len(default.load_split("train", QUIET)), len(default.load_split("test", QUIET))) == (18, 2)


def test_librispeech_style_trans_txt_in_nested_folders(tmp_path):
    chapter = tmp_path / "train" / "19" / "198"
    for i in range(2):
        _wav(chapter / f"19-198-000{i}.flac", stereo=False, rate=16000, seed=i)
    (chapter / "19-198.trans.txt").write_text("19-198-0000 NORTHANGER ABBEY\n19-198-0001 CHAPTER ONE\n")
    utts = _dataset(tmp_path).load_split("train", QUIET)
    assert [(u.id, u.text) for u in utts] == [("19-198-0000", "NORTHANGER ABBEY"), ("19-198-0001", "CHAPTER ONE")]


def test_recordings_without_any_transcript_file_are_unlabelled_audio(tmp_path):
    for i in range(2):
        _wav(tmp_path / "train" / f"u{i}.wav", seed=i)
    _transcribed_folder(tmp_path / "test", ["t"])
    d = _dataset(tmp_path)
    assert [(u.id, u.text) for u in d.load_split("train", QUIET)] == [("u0", None), ("u1", None)]


def test_what_is_refused_and_what_skip_unreadable_skips(tmp_path):
    folder = _transcribed_folder(tmp_path / "data" / "train", ["a", "b"])
    with (folder / "transcripts.txt").open("a") as f:
        f.write("ghost where is my audio\n")
    _wav(folder / "extra.wav", seed=9)  # a recording nobody transcribed
    (folder / "broken.wav").write_bytes(b"RIFF not really")
    with (folder / "transcripts.txt").open("a") as f:
        f.write("broken it does not open\n")
    with pytest.raises(ParpkitError, match=r"extra\.wav has no transcript; fix it, or set dataset.options.skip_unreadable: true"):
        _dataset(tmp_path / "data").check()
    (folder / "extra.wav").rename(tmp_path / "extra.wav")
    with pytest.raises(ParpkitError, match=r"transcripts\.txt:3: no recording for id 'ghost' \(expected a file named ghost"):
        _dataset(tmp_path / "data").check()
    (tmp_path / "extra.wav").rename(folder / "extra.wav")
    lenient = _dataset(tmp_path / "data", skip_unreadable=True)
    utts = lenient.load_split("train", QUIET)
    assert [u.id for u in utts] == ["a", "b"]
    assert len(lenient.skipped) == 3 and lenient.report()["skipped_unreadable"] == 3  # ghost, extra.wav, broken.wav

    with pytest.raises(ParpkitError, match="does not exist; set dataset.options.path"):
        _dataset(tmp_path / "nowhere").check()
    assert _dataset(tmp_path / "nowhere").split_names() == ["train", "test"]  # a recipe still resolves
    with pytest.raises(ParpkitError, match=r"has split subfolders \(train\), which are the splits; remove dataset.options.fractions"):
        _dataset(tmp_path / "data", fractions={"train": 1.0}).check()
    (tmp_path / "meta").mkdir()
    _wav(tmp_path / "meta" / "a.wav")
    (tmp_path / "meta" / "metadata.csv").write_text("file_name,sentence\na.wav,hello\n")
    assert _dataset(tmp_path / "meta", fractions={"train": 1.0}).load_split("train", QUIET)[0].text == "hello"
    with pytest.raises(ParpkitError, match=r"metadata\.csv: no column 'transcript' \(text_column\); columns are file_name, sentence"):
        _dataset(tmp_path / "meta", text_column="transcript", fractions={"train": 1.0}).check()
    with pytest.raises(ParpkitError, match=r"split 'test' gets none of the 1 recordings"):
        _dataset(tmp_path / "meta").load_split("test", QUIET)
    with pytest.raises(ValueError, match="add up to 1.2"):
        AudioFolderOptions(path=".", fractions={"train": 0.9, "test": 0.3})


def test_a_misspelled_manifest_text_column_is_an_error_not_unlabelled_audio(tmp_path):
    from parpkit_plugins.datasets.manifest import Manifest, ManifestOptions

    a = _wav(tmp_path / "a.wav")
    (tmp_path / "m.csv").write_text(f"audio,sentence\n{a},hello\n")
    m = Manifest(ManifestOptions(splits={"train": str(tmp_path / "m.csv")}, text_column="sentance"), cache_dir=tmp_path)
    for call in (m.check, lambda: m.load_split("train", QUIET)):
        with pytest.raises(ParpkitError, match=r"no column 'sentance' \(text_column\); columns are audio, sentence \(did you mean 'sentence'\?\)"):
            call()
    # a manifest of only audio (and id, speaker) columns is still unlabelled audio, for distillation
    (tmp_path / "u.csv").write_text(f"audio,who\n{a},me\n")
    m = Manifest(ManifestOptions(splits={"train": str(tmp_path / "u.csv")}, speaker_column="who"), cache_dir=tmp_path)
    m.check()
    assert [u.text for u in m.load_split("train", QUIET)] == [None]


def _metadata(path, rows, columns=("file_name", "transcription")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    return path


def test_split_subfolders_stay_the_splits_with_a_file_at_the_top(tmp_path):
    # an audiofolder metadata.csv at the top naming files in train/ and test/ labels those splits
    hf = tmp_path / "hf"
    for i in range(4):
        _wav(hf / "train" / f"train_{i:02d}.wav", seed=i)
    for i in range(2):
        _wav(hf / "test" / f"test_{i:02d}.wav", seed=10 + i)
    _metadata(hf / "metadata.csv", [[f"train/train_{i:02d}.wav", f"train {i}"] for i in range(4)]
              + [[f"test/test_{i:02d}.wav", f"test {i}"] for i in range(2)])
    d = _dataset(hf)
    assert d.split_names() == ["test", "train"]
    assert [(u.id, u.text) for u in d.load_split("test", QUIET)] == [("test_00", "test 0"), ("test_01", "test 1")]
    assert [u.id for u in d.load_split("train", QUIET)] == [f"train_{i:02d}" for i in range(4)]
    with pytest.raises(ParpkitError, match=r"has split subfolders \(test, train\), which are the splits; remove dataset.options.fractions"):
        _dataset(hf, fractions={"train": 0.5, "test": 0.5}).check()

    # split subfolders with their own transcripts and a stray (here empty) transcripts.txt at the top: refused
    both = tmp_path / "both"
    _transcribed_folder(both / "train", ["a", "b"])
    _transcribed_folder(both / "test", ["c"])
    (both / "transcripts.txt").write_text("")
    for call in (lambda: _dataset(both).split_names(), lambda: _dataset(both).load_split("train", QUIET)):
        with pytest.raises(ParpkitError, match=r"both: has split subfolders with their own transcripts \(test, train\) and "
                                               r"transcripts\.txt at its top; .*move transcripts\.txt into a split subfolder"):
            call()

    # transcripts at the top for recordings in subfolders named like splits: refused, not divided by fractions
    top = tmp_path / "top"
    for name in ("train/a", "train/b", "test/c"):
        _wav(top / f"{name}.wav")
    (top / "transcripts.txt").write_text("a hello there\nb thank you\nc good morning\n")
    with pytest.raises(ParpkitError, match=r"top: has transcripts\.txt at its top and recordings in subfolders named like "
                                           r"splits \(test, train\)"):
        _dataset(top).check()

    # recordings in subfolders that are not splits (one per speaker), transcribed at the top: one collection
    (top / "train").rename(top / "anna")
    (top / "test").rename(top / "ben")
    d = _dataset(top, fractions={"train": 0.5, "test": 0.5})
    assert d.split_names() == ["train", "test"]
    assert sorted(u.id for s in ("train", "test") for u in d.load_split(s, QUIET)) == ["a", "b", "c"]
    # … and so with an audiofolder metadata.csv at the top naming them (they are speakers, not splits)
    (top / "transcripts.txt").unlink()
    _metadata(top / "metadata.csv", [["anna/a.wav", "hello there"], ["anna/b.wav", "thank you"], ["ben/c.wav", "good morning"]])
    for d in (_dataset(top), _dataset(top, fractions={"train": 0.5, "test": 0.5})):
        assert d.split_names() == ["train", "test"]
        assert sorted(u.id for s in ("train", "test") for u in d.load_split(s, QUIET)) == ["anna/a", "anna/b", "ben/c"]


def test_empty_transcript_files_are_named_and_labels_are_known_without_reading_audio(tmp_path):
    _transcribed_folder(tmp_path / "train", ["a", "b"])
    _wav(tmp_path / "test" / "c.wav")
    assert _dataset(tmp_path).labelled("train") and not _dataset(tmp_path).labelled("test")  # no transcript file: unlabelled
    (tmp_path / "test" / "transcripts.txt").write_text("\n  \n")
    with pytest.raises(ParpkitError, match=r"test/transcripts\.txt: no transcripts in it \(empty\); write one '<id> <text>' "
                                           r"line per recording, or remove it"):
        _dataset(tmp_path).check()
    (tmp_path / "test" / "transcripts.txt").unlink()
    for text in ("", "file_name,transcription\n"):
        (tmp_path / "test" / "metadata.csv").write_text(text)
        with pytest.raises(ParpkitError, match=r"test/metadata\.csv: no rows in it \(empty, or only a header\)"):
            _dataset(tmp_path).check()


@requires_offline
def test_validate_refuses_unlabelled_splits_a_run_could_not_use_without_reading_audio(tmp_path, capsys):
    _transcribed_folder(tmp_path / "wavs" / "train", ["a", "b"])
    _wav(tmp_path / "wavs" / "test" / "c.wav")  # no transcript file: unlabelled
    recipe = tiny_recipe(**{"dataset": {"name": "audio_folder", "options": {"path": str(tmp_path / "wavs")},
                                        "train_split": "train", "eval_split": "test"}})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["validate", str(path)]) == 2
    assert ("dataset.eval_split: split 'test' has utterances without transcripts; an evaluation split needs them all"
            in " ".join(capsys.readouterr().err.split()))
    path = write_recipe(tmp_path / "r.yaml", {**recipe, "dataset": {**recipe["dataset"], "train_split": "test", "eval_split": "train"}})
    assert main(["validate", str(path)]) == 2
    assert ("dataset.train_split: some of the utterances of 'test' have no transcript; unlabelled audio trains only with "
            "distillation") in " ".join(capsys.readouterr().err.split())
    assert main(["validate", str(write_recipe(tmp_path / "r.yaml", {**recipe, "dataset": {**recipe["dataset"], "train_split": "test",
                 "eval_split": "train"}, "distillation": {"weight": 1.0}}))]) == 0
    capsys.readouterr()
    curve = {**recipe, "dataset": {**recipe["dataset"], "eval_split": "train"},  # the learning curve's split too, by its key
             "evaluation": {"every_steps": 2, "validation_split": "test"}}
    assert main(["validate", str(write_recipe(tmp_path / "c.yaml", curve))]) == 2
    assert "evaluation.validation_split: split 'test' has utterances without transcripts" in " ".join(capsys.readouterr().err.split())
    (tmp_path / "wavs" / "transcripts.txt").write_text("")  # a layout error, read when the recipe is resolved: the key named
    assert main(["validate", str(path)]) == 2
    assert f"{path}: dataset.options: " in capsys.readouterr().err.replace("\n", "")


def test_an_id_or_file_name_with_or_without_the_extension_is_named_as_such(tmp_path):
    folder = tmp_path / "train"
    for name in ("a", "b"):
        _wav(folder / f"{name}.wav")
    (folder / "transcripts.txt").write_text("a.wav hello there\nb.wav thank you\n")
    with pytest.raises(ParpkitError, match=r"transcripts\.txt:1: id 'a\.wav' carries the extension of .*train/a\.wav; an id is "
                                           r"the file's name without its extension \(a\)"):
        _dataset(tmp_path).check()
    (folder / "transcripts.txt").unlink()
    _metadata(folder / "metadata.csv", [["a", "hello there"], ["b", "thank you"]])
    with pytest.raises(ParpkitError, match=r"metadata\.csv: row 1: file_name 'a' names no file, but .*train/a\.wav is there; "
                                           r"file_name is the recording's path with its extension"):
        _dataset(tmp_path).check()
    _metadata(folder / "metadata.csv", [["a.flac", "hello there"], ["b.wav", "thank you"]])
    with pytest.raises(ParpkitError, match=r"row 1: file_name 'a\.flac' names no file, but .*train/a\.wav is there"):
        _dataset(tmp_path).check()
