"""A folder of recordings and their transcripts, with no manifest to write.

Transcripts come in either of two files (both may be used, in any subfolder):

- ``transcripts.txt`` (or LibriSpeech's ``*.trans.txt``): one ``<id> <text>`` line per recording, the id being
  the audio file's name without its extension (``hello_01.wav`` -> ``hello_01 hello there``);
- the Hugging Face audiofolder ``metadata.csv`` (or ``metadata.jsonl``): a ``file_name`` column (paths
  relative to that file) and the transcript in ``text_column`` (by default the first of ``transcription``,
  ``text``, ``sentence`` it has).

Splits are the folder's subfolders (``train/``, ``test/`` …). A folder holding recordings or transcripts
itself, with no split subfolders, is one collection, divided by ``fractions`` with a seeded shuffle. With both,
a ``metadata.csv`` at the top naming files in several subfolders named like splits labels them; subfolders of
recordings only, not named like a split of ``fractions``, belong to the one collection; anything else is
refused. A split with recordings and no transcript file at all is unlabelled audio (only distillation trains
on it); an empty transcript file is an error. Any audio libsndfile reads
(WAV, FLAC, OGG, MP3, NIST SPHERE …) at any rate and channel count: mixed to mono, resampled to 16 kHz.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from parpkit import AudioError, Dataset, ParpkitError, PluginOptions, Progress, Utterance, hookimpl, read_audio

from .manifest import read_rows

AUDIO = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".sph", ".nist", ".au", ".w64", ".caf"}
METADATA = ("metadata.csv", "metadata.jsonl")
TEXT_COLUMNS = ("transcription", "text", "sentence")


class AudioFolderOptions(PluginOptions):
    #: the folder: subfolders as splits (train/, test/ …), or recordings and transcripts in the folder itself
    path: str
    #: a folder without split subfolders: split name -> its share of the utterances (at most 1 in all),
    #: drawn by a shuffle with ``seed``; a folder with subfolders takes its splits from them instead
    fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.9, "test": 0.1}, min_length=1)
    #: the shuffle of ``fractions`` (not the recipe's seed: runs with different seeds share one split)
    seed: int = 0
    #: metadata files: the transcript column; null: the first of transcription, text, sentence
    text_column: str | None = None
    #: metadata files: a speaker column (optional)
    speaker_column: str | None = None
    #: words (WER/CER) or phones (space-separated labels, PER)
    unit: Literal["words", "phones"] = "words"
    #: skip (and count in metrics.json) recordings that cannot be read or have no transcript, and transcripts
    #: without a recording, instead of stopping at the first
    skip_unreadable: bool = False

    @field_validator("fractions")
    @classmethod
    def _shares(cls, v: dict[str, float]) -> dict[str, float]:
        if any(isinstance(f, bool) or not 0 < f <= 1 for f in v.values()):
            raise ValueError(f"each share must be in (0, 1], got {v}")
        if sum(v.values()) > 1 + 1e-9:
            raise ValueError(f"the shares add up to {sum(v.values()):g}; at most 1")
        return v


@dataclass
class Entry:
    id: str
    audio: Path | None  # None: a transcript whose recording is missing
    text: str | None    # None: a recording without a transcript
    speaker: str = ""
    where: str = ""     # the transcript's file and line, for errors


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO and p.is_file())


def _transcript_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and (p.name == "transcripts.txt" or p.name.endswith(".trans.txt")))


def _metadata_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name in METADATA)


#: subfolder names a metadata file at the top labels as splits (Hugging Face audiofolder's, and fractions' own)
SPLIT_NAMES = frozenset({"train", "training", "validation", "valid", "dev", "test", "eval", "evaluation"})


def _top_files(folder: Path) -> list[Path]:
    """Recordings and transcripts directly in ``folder`` (not in its subfolders)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and (p.suffix.lower() in AUDIO or p.name in METADATA
                                                                  or p.name == "transcripts.txt"
                                                                  or p.name.endswith(".trans.txt")))


def _lines(path: Path) -> list[tuple[int, str]]:
    """A transcripts file's non-blank lines, numbered; an empty one is refused (not unlabelled audio)."""
    lines = [(n, line) for n, line in enumerate(_read_text(path).splitlines(), 1) if line.strip()]
    if not lines:
        raise ParpkitError(f"{path}: no transcripts in it (empty); write one '<id> <text>' line per recording, or remove it "
                           "to use the recordings as unlabelled audio")
    return lines


def _rows(path: Path) -> list[dict[str, Any]]:
    """A metadata file's rows; an empty one is refused (not unlabelled audio)."""
    rows = read_rows(path)
    if not rows:
        raise ParpkitError(f"{path}: no rows in it (empty, or only a header); list one recording per row, or remove it to "
                           "use the recordings as unlabelled audio")
    return rows


def _folder_of(row: dict[str, Any]) -> str | None:
    """The first folder of a metadata row's file_name; None for a file beside the metadata file."""
    parts = Path(os.path.normpath(str(row.get("file_name") or "").strip() or ".")).parts
    return parts[0] if len(parts) > 1 else None


class AudioFolder(Dataset):
    name = "audio_folder"
    Options = AudioFolderOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        self.unit = self.options.unit
        self._entries: dict[str, list[Entry]] = {}
        self._above: list[Path] = []  # metadata files at the top that label the split subfolders

    @property
    def root(self) -> Path:
        return Path(self.options.path).expanduser()

    # ------------------------------------------------------------------------------- layout
    def _layout(self) -> dict[str, Path] | None:
        """Split name -> its subfolder; None for one folder divided by ``fractions``."""
        root = self.root
        if not root.is_dir():
            raise ParpkitError(f"audio folder {root} does not exist; set dataset.options.path to the folder of your "
                               "recordings (with train/ and test/ subfolders, or one folder split by fractions)")
        subfolders = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
                      and (_audio_files(p) or _transcript_files(p) or _metadata_files(p))}
        top = _top_files(root)
        self._above = []
        if top and (not subfolders or not self._both(root, top, subfolders)):
            return None
        if not subfolders:
            raise ParpkitError(f"{root}: holds no recordings ({', '.join(sorted(AUDIO))}) nor transcripts, neither itself "
                               "nor in a subfolder")
        if "fractions" in self.options.model_fields_set:
            raise ParpkitError(f"{root}: has split subfolders ({', '.join(subfolders)}), which are the splits; remove "
                               "dataset.options.fractions (it divides a folder without subfolders)")
        return subfolders

    def _both(self, root: Path, top: list[Path], subfolders: dict[str, Path]) -> bool:
        """Recordings or transcripts both at the top and in subfolders: True (the subfolders are the splits) for a
        metadata file at the top naming files in several subfolders, which labels them; False (one collection) for
        subfolders of recordings only, not named like a split of ``fractions``; refused otherwise, so that no split's
        recordings are silently divided among the others."""
        files = ", ".join(p.name for p in top[:3]) + (f" and {len(top) - 3} more" if len(top) > 3 else "")
        own = [name for name, p in subfolders.items() if _transcript_files(p) or _metadata_files(p)]
        if own:
            raise ParpkitError(f"{root}: has split subfolders with their own transcripts ({', '.join(own)}) and {files} at "
                               f"its top; a folder is either split subfolders or one collection: move {files} into a split "
                               f"subfolder, or remove {'it' if len(top) == 1 else 'them'}")
        if all(p.name in METADATA for p in top):
            folders = {_folder_of(row) for p in top for row in _rows(p)}
            # named like splits (anna/, ben/ are speakers of one collection): what Hugging Face's audiofolder reads
            if len(folders) > 1 and folders <= set(subfolders) and folders <= SPLIT_NAMES | set(self.options.fractions):
                self._above = top
                return True
        like = [name for name in subfolders if name in self.options.fractions]
        if like:
            raise ParpkitError(f"{root}: has {files} at its top and recordings in subfolders named like splits "
                               f"({', '.join(like)}), which would be one collection divided by fractions, mixing those "
                               "splits; put each split's transcripts in its subfolder, or rename the subfolders")
        return False

    def split_names(self) -> list[str]:
        if not self.root.is_dir():  # reported by check() and load_split; a resolved recipe still names its splits
            return list(self.options.fractions)
        layout = self._layout()
        return list(self.options.fractions) if layout is None else list(layout)

    def check(self) -> None:
        """The layout, every transcript file and metadata column, and that each transcript has its recording
        (the audio itself is read by load_split)."""
        for split in self.split_names():
            self._split_entries(split)

    def labelled(self, split: str) -> bool:
        """Whether every recording of ``split`` has a transcript, known from the transcript files alone (the
        engine's check that a scored split, or a training split without distillation, has them)."""
        return all(e.text is not None for e in self._split_entries(split))

    # ------------------------------------------------------------------------------- reading transcripts
    def _collect(self, folder: Path, above: Sequence[Path] = ()) -> list[Entry]:
        """Every recording and transcript under ``folder`` (and the rows for it of the metadata files ``above``),
        matched up."""
        folder = Path(os.path.normpath(folder.absolute()))
        audio = _audio_files(folder)
        transcripts = _transcript_files(folder)
        above = [Path(os.path.normpath(p.absolute())) for p in above]
        metadata = _metadata_files(folder) + above
        if not transcripts and not metadata:  # unlabelled audio
            return [Entry(p.relative_to(folder).with_suffix("").as_posix(), p, None) for p in audio]
        by_stem: dict[str, list[Path]] = {}
        for p in audio:
            by_stem.setdefault(p.stem, []).append(p)
        entries: dict[str, Entry] = {}
        used: set[Path] = set()

        def add(entry: Entry) -> None:
            if entry.id in entries:
                raise ParpkitError(f"{entry.where}: id {entry.id!r} again (first at {entries[entry.id].where}); ids must be "
                                   "unique within a split")
            entries[entry.id] = entry
            if entry.audio is not None:
                used.add(entry.audio)

        for path in transcripts:
            for n, line in _lines(path):
                uid, *rest = line.split(maxsplit=1)
                text = rest[0].strip() if rest else ""
                # the recording beside its transcript file (or below it); a stem found only elsewhere is ambiguous
                near = [p for p in by_stem.get(uid, []) if path.parent in p.parents]
                if not near and (named := [p for p in by_stem.get(Path(uid).stem, []) if p.name == uid
                                           and path.parent in p.parents]):
                    raise ParpkitError(f"{path}:{n}: id {uid!r} carries the extension of {named[0]}; an id is the file's "
                                       f"name without its extension ({Path(uid).stem})")
                if len(near) > 1:
                    raise ParpkitError(f"{path}:{n}: id {uid!r} matches {len(near)} recordings ({near[0]}, {near[1]}); "
                                       "keep one recording per id")
                add(Entry(uid, near[0] if near else None, text or None, where=f"{path}:{n}"))
        for path in metadata:
            rows = _rows(path)
            column = self._text_column(path, rows[0])
            for key in ("file_name", self.options.speaker_column):
                if key and key not in rows[0]:
                    raise ParpkitError(f"{path}: no column {key!r}{' (speaker_column)' if key != 'file_name' else ''}; "
                                       f"columns are {', '.join(map(str, rows[0]))}")
            for i, row in enumerate(rows, 1):
                name = row.get("file_name")
                where = f"{path}: row {i}"
                if not isinstance(name, str) or not name.strip():
                    raise ParpkitError(f"{where}: no file_name")
                file = Path(os.path.normpath(path.parent / name.strip()))
                if path in above and folder not in file.parents:
                    continue  # another split's row
                if not file.is_file():
                    alike = [p for p in by_stem.get(file.name, []) + by_stem.get(file.stem, []) if p.parent == file.parent]
                    if alike:
                        raise ParpkitError(f"{where}: file_name {name.strip()!r} names no file, but {alike[0]} is there; "
                                           f"file_name is the recording's path with its extension, relative to {path.name}")
                text = row.get(column)
                text = text.strip() if isinstance(text, str) else None
                speaker = str(row[self.options.speaker_column]) if self.options.speaker_column else ""
                uid = Path(name.strip()).with_suffix("").as_posix()
                if path in above:
                    uid = file.relative_to(folder).with_suffix("").as_posix()
                elif path.parent != folder:
                    uid = f"{path.parent.relative_to(folder).as_posix()}/{uid}"
                add(Entry(uid, file if file.is_file() else None, text or None, speaker, where))
        for p in audio:
            if p not in used:
                uid = p.relative_to(folder).with_suffix("").as_posix()
                add(Entry(uid, p, None, where=str(p)))
        return sorted(entries.values(), key=lambda e: e.id)

    def _text_column(self, path: Path, first: dict) -> str:
        o = self.options
        if o.text_column is not None:
            if o.text_column not in first:
                raise ParpkitError(f"{path}: no column {o.text_column!r} (text_column); columns are {', '.join(map(str, first))}")
            return o.text_column
        for name in TEXT_COLUMNS:
            if name in first:
                return name
        raise ParpkitError(f"{path}: no transcript column ({', '.join(TEXT_COLUMNS)}); columns are "
                           f"{', '.join(map(str, first))}; name yours with dataset.options.text_column")

    def _checked(self, entries: list[Entry]) -> list[Entry]:
        """Entries with a recording and, where the split is labelled, a transcript; the others refused or skipped."""
        labelled = any(e.text is not None for e in entries)
        out = []
        for e in entries:
            problem = None
            if e.audio is None:
                problem = f"{e.where}: no recording for id {e.id!r} (expected a file named {e.id} with an audio extension beside it)"
            elif labelled and e.text is None:
                problem = f"{e.where}: recording {e.audio} has no transcript"
            if problem is None:
                out.append(e)
            elif self.options.skip_unreadable:
                self.skipped.append(problem)
            else:
                raise ParpkitError(f"{problem}; fix it, or set dataset.options.skip_unreadable: true to skip such entries")
        return out

    def _split_entries(self, split: str) -> list[Entry]:
        if split in self._entries:
            return self._entries[split]
        layout = self._layout()
        if layout is not None:
            if split not in layout:
                raise ParpkitError(f"{self.root}: no split {split!r}; its subfolders with recordings are {', '.join(layout)}")
            entries = self._checked(self._collect(layout[split], self._above))
            if not entries:
                raise ParpkitError(f"{layout[split]}: no recordings")
            self._entries[split] = entries
            return entries
        entries = self._checked(self._collect(self.root))
        order = np.random.default_rng(self.options.seed).permutation(len(entries))
        start = 0
        total = 0.0
        for name, share in self.options.fractions.items():
            total += share
            end = min(len(entries), math.floor(total * len(entries) + 0.5))
            self._entries[name] = [entries[i] for i in sorted(order[start:end])]
            start = end
        if split not in self._entries:
            raise ParpkitError(f"{self.root}: no split {split!r}; fractions names {', '.join(self.options.fractions)}")
        if not self._entries[split]:
            raise ParpkitError(f"{self.root}: split {split!r} gets none of the {len(entries)} recordings at share "
                               f"{self.options.fractions[split]:g}; add recordings or raise its share in dataset.options.fractions")
        return self._entries[split]

    # ------------------------------------------------------------------------------- loading
    def load_split(self, split: str, progress: Progress) -> Sequence[Utterance]:
        entries = self._split_entries(split)
        out = []
        with progress.task(f"reading {split}", total=len(entries)) as task:
            for e in entries:
                try:
                    audio = read_audio(e.audio)
                except AudioError as exc:
                    if not self.options.skip_unreadable:
                        raise ParpkitError(f"{exc}; set dataset.options.skip_unreadable: true to skip it") from None
                    self.skipped.append(str(e.audio))
                    task.advance()
                    continue
                out.append(Utterance(e.id, audio, 16000, e.text, e.speaker))
                task.advance()
        return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ParpkitError(f"{path}: cannot read the transcripts ({exc})") from None


@hookimpl
def register_datasets(register):
    register(AudioFolder)
