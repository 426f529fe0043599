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


class TimitOptions(PluginOptions):
    #: the folder holding ``TRAIN`` and ``TEST`` (any case)
    root: str = "data/TIMIT"
    #: words (.TXT, normalised), characters (the same text, for CTC models) or phones (61 labels from .PHN,
    #: scored by PER after folding to 39)
    targets: Literal["words", "characters", "phones"] = "words"
    #: include SA1 and SA2, which every speaker reads (excluded by default, as usual)
    include_sa: bool = False
    #: skip unreadable audio files (counted in metrics.json) instead of stopping
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
                    files.setdefault(stem, {})[ext] = f
                for stem in sorted(files):
                    if not self.options.include_sa and stem.startswith("sa"):
                        continue
                    if "txt" in files[stem] and ("wav" in files[stem] or "wav.wav" in files[stem]):
                        out.append((f"{dr.name.lower()}_{speaker}_{stem}", speaker, files[stem]))
        return out

    def _speaker_in(self, split: str, speaker: str) -> bool:
        if split == "core_test":
            return speaker in CORE_TEST_SPEAKERS
        if split == "dev":
            return speaker in DEV_SPEAKERS
        return True  # train: the whole TRAIN part; test: the whole TEST part

    # ------------------------------------------------------------------------------- reading
    def _target(self, files: dict[str, Path]) -> str:
        if self.options.targets == "phones":
            if "phn" not in files:
                raise ParpkitError(f"{files['txt'].with_suffix('.PHN')}: phone targets need the .PHN file")
            return " ".join(line.split()[2] for line in files["phn"].read_text().splitlines() if len(line.split()) == 3)
        words = files["txt"].read_text().split(maxsplit=2)
        return normalise(words[2] if len(words) == 3 else "")

    def _audio(self, files: dict[str, Path]):
        candidates = [files[k] for k in ("wav", "wav.wav") if k in files]
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
                    audio = self._audio(files)
                except AudioError as exc:
                    if not self.options.skip_unreadable:
                        raise ParpkitError(f"{exc}; set dataset.options.skip_unreadable: true to skip such files") from None
                    self.skipped.append(os.fspath(exc.path))
                    task.advance()
                    continue
                out.append(Utterance(uid, audio, 16000, self._target(files), speaker))
                task.advance()
        return out


@hookimpl
def register_datasets(register):
    register(Timit)
