import numpy as np
import pytest
import soundfile as sf

from parpkit.errors import ParpkitError
from parpkit.metrics import error_rates
from parpkit.progress import QUIET
from parpkit_plugins.datasets.timit import Timit, TimitOptions, fold_phones
from tests.timit_tree import PHONES, write_tree
from tests.conftest import requires_offline

pytestmark = requires_offline


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("timit") / "TIMIT")


def _timit(tree, **kw):
    return Timit(TimitOptions(root=str(tree), **kw), cache_dir=tree.parent)


def test_split_membership_and_sa_exclusion(tree):
    t = _timit(tree)
    speakers = {s: sorted({u.speaker for u in t.load_split(s, QUIET)}) for s in ("train", "dev", "core_test", "test")}
    assert speakers == {"train": ["fcjf0", "maeb0", "mbgt0"], "dev": ["faks0"], "core_test": ["mdab0"],
                        "test": ["faks0", "mbom0", "mdab0"]}
    train = t.load_split("train", QUIET)
    assert len(train) == 3 * 2 and not any("_sa" in u.id for u in train)
    with_sa = _timit(tree, include_sa=True).load_split("train", QUIET)
    assert len(with_sa) == 3 * 4 and sum("_sa1" in u.id for u in with_sa) == 3


def test_audio_and_normalised_word_transcripts(tree):
    u = _timit(tree).load_split("core_test", QUIET)[0]
    assert u.id == "dr1_mdab0_si648" and u.sample_rate == 16000 and u.audio.dtype == np.float32
    raw = (tree / "TEST" / "DR1" / "MDAB0" / "SI648.TXT").read_text().split(maxsplit=2)[2]
    assert u.text == raw.strip().rstrip(".").lower() and "." not in u.text and u.text == u.text.lower()
    pcm, sr = sf.read(tree / "TEST" / "DR1" / "MDAB0" / "SI648.WAV", dtype="int16")
    assert sr == 16000 and len(u.audio) == len(pcm)


def test_phone_targets_and_folding(tree):
    t = _timit(tree, targets="phones")
    assert t.unit == "phones"
    u = t.load_split("dev", QUIET)[0]
    assert u.text.split() == PHONES
    folded = fold_phones(u.text).split()
    assert "q" not in folded and folded.count("sil") == 5  # h# x2, dcl x2, kcl
    assert fold_phones("ao ax-h ix zh en") == "aa ah ih sh n"
    # scoring folds first: a 61-label confusion inside a 39-class is no error
    ref, hyp = "h# ao ix q n", "pau aa ih n"
    assert error_rates([t.score_text(ref)], [t.score_text(hyp)], "phones") == {"per": 0.0}
    assert error_rates([t.score_text(ref)], [t.score_text("sil aa n")], "phones")["per"] == pytest.approx(0.25)


def test_riff_copies_and_unreadable_audio(tree, tmp_path):
    import shutil

    copy = tmp_path / "T"
    shutil.copytree(tree, copy)
    spk = copy / "TEST" / "DR1" / "MDAB0"
    good = spk / "SI648.WAV"
    pcm, _ = sf.read(good, dtype="int16")
    sf.write(spk / "SI648.WAV.wav", pcm, 16000)  # the RIFF copy some redistributions add
    good.write_bytes(b"not audio at all")
    assert len(_timit(copy).load_split("core_test", QUIET)) == 2  # read from the RIFF copy
    (spk / "SX108.WAV").write_bytes(b"\x00" * 10)
    with pytest.raises(ParpkitError, match=r"SX108\.WAV: unreadable audio .*skip_unreadable"):
        _timit(copy).load_split("core_test", QUIET)
    t = _timit(copy, skip_unreadable=True)
    assert len(t.load_split("core_test", QUIET)) == 1
    assert t.report()["skipped_unreadable"] == 1 and t.report()["skipped_files"][0].endswith("SX108.WAV")


def test_missing_root_and_not_a_timit_tree(tmp_path):
    with pytest.raises(ParpkitError, match=r"TIMIT root .*nowhere does not exist"):
        _timit(tmp_path / "nowhere").load_split("train", QUIET)
    (tmp_path / "other" / "TRAIN" / "stuff").mkdir(parents=True)
    with pytest.raises(ParpkitError, match=r"is not a TIMIT tree: looked for TRAIN/DR1…DR8"):
        _timit(tmp_path / "other").load_split("train", QUIET)
