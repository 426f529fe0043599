"""TIMIT (LDC93S1) from its LDC directory layout: TRAIN|TEST/DR1…DR8/<speaker>/<utt>.{WAV,TXT,PHN,WRD}.

Folder and file names may be in any case; audio is NIST SPHERE (or the RIFF ``.WAV.wav`` copies some
redistributions add). Targets: words (from .TXT, normalised), characters (the same text, for
character-level CTC vocabularies), or phones (61 labels from .PHN, scored after folding to 39).
Splits: ``train`` (462 speakers), ``dev`` (the standard 50 speakers), ``core_test`` (24 speakers) and
``test`` (all 168 test speakers); SA1/SA2 excluded unless ``include_sa``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from parpkit import AudioError, Dataset, ParpkitError, PluginOptions, Progress, Utterance, hookimpl, normalise, read_audio

CORE_TEST_SPEAKERS = frozenset("""mdab0 mwbt0 felc0 mtas1 mwew0 fpas0 mjmp0 mlnt0 fpkt0 mlll0 mtls0 fjlm0
mbpm0 mklt0 fnlp0 mcmj0 mjdh0 fmgd0 mgrt0 mnjm0 fdhc0 mjln0 mpam0 fmld0""".split())
DEV_SPEAKERS = frozenset("""faks0 fdac1 fjem0 mgwt0 mjar0 mmdb1 mmdm2 mpdf0 fcmh0 fkms0 mbdg0 mbwm0 mcsh0
fadg0 fdms0 fedw0 mgjf0 mglb0 mrtk0 mtaa0 mtdt0 mthc0 mwjg0 fnmr0 frew0 fsem0 mbns0 mmjr0 mdls0 mdlf0
mdvc0 mers0 fmah0 fdrw0 mrcs0 mrjm4 fcal1 mmwh0 fjsj0 majc0 mjsw0 mreb0 fgjd0 fjmg0 mroa0 mteb0 mjfc0
mrjr0 fmml0 mrws1""".split())

# Lee & Hon (1989) folding of the 61 TIMIT phones to 39 for scoring; q (glottal stop) is dropped.
FOLD_39 = {"ao": "aa", "ax": "ah", "ax-h": "ah", "axr": "er", "hv": "hh", "ix": "ih", "el": "l", "em": "m",
           "en": "n", "nx": "n", "eng": "ng", "zh": "sh", "ux": "uw", "pcl": "sil", "tcl": "sil", "kcl": "sil",
           "bcl": "sil", "dcl": "sil", "gcl": "sil", "h#": "sil", "pau": "sil", "epi": "sil", "q": ""}
SPLITS = ("train", "dev", "core_test", "test")


#: the files of one utterance (``.WAV.wav``: the RIFF copy some redistributions add)
_EXTENSIONS = ("wav", "wav.wav", "txt", "phn", "wrd")


class Damaged(ParpkitError):
    """An utterance's files are missing or malformed."""


class TimitOptions(PluginOptions):
    #: the folder holding ``TRAIN`` and ``TEST`` (any case)
    root: str = "data/TIMIT"
    #: words (.TXT, normalised), characters (the same text, for CTC models) or phones (61 labels from .PHN,
    #: scored by PER after folding to 39)
    targets: Literal["words", "characters", "phones"] = "words"
    #: include SA1 and SA2, which every speaker reads (excluded by default, as usual)
    include_sa: bool = False
    #: skip utterances whose audio is unreadable or whose files are missing, empty or malformed (each counted
    #: and named in metrics.json) instead of stopping at the first
    skip_unreadable: bool = False
    #: at most this many utterances per split (quick trials); null for all
    max_utterances: int | None = Field(default=None, gt=0)


def fold_phones(text: str) -> str:
    return " ".join(f for f in (FOLD_39.get(p, p) for p in text.split()) if f)


class Timit(Dataset):
    name = "timit"
    Options = TimitOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        self.unit = "phones" if self.options.targets == "phones" else "words"

    def split_names(self) -> list[str]:
        return list(SPLITS)

    def check(self) -> None:
        self._locate()

    def score_text(self, text: str) -> str:
        return fold_phones(text) if self.unit == "phones" else text

    # ------------------------------------------------------------------------------- layout
    def _part(self, root: Path, name: str) -> Path | None:
        for child in root.iterdir():
            if child.is_dir() and child.name.lower() == name:
                return child
        return None

    def _locate(self) -> dict[str, Path]:
        root = Path(self.options.root).expanduser()
        if not root.is_dir():
            raise ParpkitError(f"TIMIT root {root} does not exist; set dataset.options.root to the folder holding TRAIN and TEST")
        parts = {}
        for name in ("train", "test"):
            part = self._part(root, name)
            if part is None and (nested := self._part(root, "timit")) is not None:
                part = self._part(nested, name)
            if part is None or not any(c.is_dir() and re.fullmatch(r"dr[1-8]", c.name.lower()) for c in part.iterdir()):
                raise ParpkitError(f"{root} is not a TIMIT tree: looked for {name.upper()}/DR1…DR8 (any case) "
                                   "and found none; expected the LDC93S1 layout TRAIN|TEST/DR*/<speaker>/<utt>.WAV")
            parts[name] = part
        return parts

    def _utterance_files(self, split: str) -> list[tuple[str, str, dict[str, Path]]]:
        """Every utterance of the split with the files it has (a stem with any of .WAV, .TXT, .PHN, .WRD counts:
        one that lacks a file it needs is named when the split loads, not dropped)."""
        part = self._locate()["train" if split == "train" else "test"]
        out = []
        for dr in sorted(part.iterdir(), key=lambda p: p.name.lower()):
            if not (dr.is_dir() and re.fullmatch(r"dr[1-8]", dr.name.lower())):
                continue
            for spk in sorted(dr.iterdir(), key=lambda p: p.name.lower()):
                speaker = spk.name.lower()
                if not spk.is_dir() or not self._speaker_in(split, speaker):
                    continue
                files: dict[str, dict[str, Path]] = {}
                for f in spk.iterdir():
                    lower = f.name.lower()
                    stem, _, ext = lower.partition(".")
                    if stem and ext in _EXTENSIONS:
                        files.setdefault(stem, {})[ext] = f
                for stem in sorted(files):
                    if not self.options.include_sa and stem.startswith("sa"):
                        continue
                    out.append((f"{dr.name.lower()}_{speaker}_{stem}", speaker, files[stem]))
        return out

    def _speaker_in(self, split: str, speaker: str) -> bool:
        if split == "core_test":
            return speaker in CORE_TEST_SPEAKERS
        if split == "dev":
            return speaker in DEV_SPEAKERS
        return True  # train: the whole TRAIN part; test: the whole TEST part

    # ------------------------------------------------------------------------------- reading
    def _target(self, uid: str, files: dict[str, Path]) -> str:
        """The transcript: the .PHN phones (every line ``start end phone``) or the .TXT sentence (``start end
        sentence``), refused when the file is missing, malformed or empty (it would train and score as blank)."""
        kind = "phn" if self.options.targets == "phones" else "txt"
        if kind not in files:
            have = ", ".join(f".{e.upper()}" for e in sorted(files)) or "nothing"
            raise Damaged(f"TIMIT utterance {uid} has no .{kind.upper()} file (found {have}) beside its audio")
        path = files[kind]
        lines = path.read_text(errors="replace").splitlines()
        if kind == "phn":
            phones = []
            for n, line in enumerate(lines, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
                    raise Damaged(f"{path}:{n}: expected 'start end phone', got {line.strip()[:40]!r}")
                phones.append(parts[2])
            if not phones:
                raise Damaged(f"{path}: holds no phones")
            return " ".join(phones)
        first = next((line for line in lines if line.strip()), "")
        words = first.split(maxsplit=2)
        if len(words) < 2 or not (words[0].isdigit() and words[1].isdigit()):
            raise Damaged(f"{path}:1: expected 'start end sentence', got {first.strip()[:40]!r}")
        text = normalise(words[2] if len(words) == 3 else "")
        if not text:
            raise Damaged(f"{path}: holds no sentence ({first.strip()[:40]!r}); it would train and score as a blank transcript")
        return text

    def _audio(self, uid: str, files: dict[str, Path]):
        candidates = [files[k] for k in ("wav", "wav.wav") if k in files]
        if not candidates:
            have = ", ".join(f".{e.upper()}" for e in sorted(files))
            raise Damaged(f"TIMIT utterance {uid} has no .WAV file (found {have})")
        error = None
        for path in candidates:
            try:
                return read_audio(path)
            except AudioError as exc:
                error = exc
        raise error

    def load_split(self, split: str, progress: Progress) -> Sequence[Utterance]:
        if split not in SPLITS:
            raise ValueError(f"timit has no split {split!r}; splits: {', '.join(SPLITS)}")
        entries = self._utterance_files(split)
        if self.options.max_utterances:
            entries = entries[: self.options.max_utterances]
        if not entries:
            raise ParpkitError(f"TIMIT {split}: no utterances with .WAV and .TXT under {self.options.root}")
        out = []
        with progress.task(f"reading TIMIT {split}", total=len(entries)) as task:
            for uid, speaker, files in entries:
                try:
                    audio = self._audio(uid, files)
                    text = self._target(uid, files)
                except (AudioError, Damaged) as exc:
                    if not self.options.skip_unreadable:
                        raise ParpkitError(f"{exc}; set dataset.options.skip_unreadable: true to skip (and count) such "
                                           "utterances") from None
                    self.skipped.append(os.fspath(exc.path) if isinstance(exc, AudioError) else str(exc))
                    task.advance()
                    continue
                out.append(Utterance(uid, audio, 16000, text, speaker))
                task.advance()
        return out


@hookimpl
def register_datasets(register):
    register(Timit)
