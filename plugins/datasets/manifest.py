"""A user's own corpus from manifests: CSV, TSV or JSONL with an audio path and a transcript per row.

Relative audio paths are resolved against the manifest's folder; any sample rate and channel count
libsndfile reads is mixed to mono and resampled to 16 kHz."""

from __future__ import annotations

import csv
import difflib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from parpkit import AudioError, Dataset, ParpkitError, PluginOptions, Progress, Utterance, hookimpl, read_audio


class ManifestOptions(PluginOptions):
    #: split name -> manifest file (.csv, .tsv, .jsonl)
    splits: dict[str, str] = Field(min_length=1)
    #: the column of audio file paths; relative ones are resolved against the manifest's folder
    audio_column: str = "audio"
    #: the column of transcripts (a training split without it is unlabelled audio: distillation only)
    text_column: str = "text"
    #: a column naming each utterance's speaker, if there is one
    speaker_column: str | None = None
    #: a column of utterance ids; null: ``<split>-<row number>``
    id_column: str | None = None
    #: words (WER/CER) or phones (space-separated labels, PER)
    unit: Literal["words", "phones"] = "words"
    #: skip (and count in metrics.json) rows whose audio cannot be read or whose transcript is missing
    #: (null, absent or blank), instead of stopping at the first
    skip_unreadable: bool = False


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The manifest's rows as mappings (a UTF-8 byte-order mark, as spreadsheet programs write, is fine)."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ParpkitError(f"{path}: cannot read the manifest ({exc})") from None
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ParpkitError(f"{path}:{n}: not a JSON object: {exc}") from None
                if not isinstance(row, dict):
                    raise ParpkitError(f"{path}:{n}: expected a JSON object with the columns, got {type(row).__name__} "
                                       f"{line.strip()[:40]!r}")
                rows.append(row)
        return rows
    if suffix == ".tsv":  # tab-separated values have no quoting: a quote is part of its field
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = []
        for row in reader:
            _whole_row(path, reader, row, len(rows) + 1, "a tab inside a transcript?")
            rows.append(row)
        return rows
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        rows: list[dict[str, Any]] = []
        start = 2  # the line the next row begins on (after the header)
        try:
            for row in reader:
                _whole_row(path, reader, row, len(rows) + 1, "a comma inside a transcript? put the field in double quotes")
                # a field over several lines is a quote opened and closed rows later: the rows between are gone
                if any(isinstance(v, str) and ("\n" in v or "\r" in v) for v in row.values()):
                    raise ParpkitError(f"{path}:{start}: row {len(rows) + 1} has a field that runs over lines {start}-"
                                       f"{reader.line_num} (a double quote without its closing one?)")
                rows.append(row)
                start = reader.line_num + 1
        except csv.Error as exc:
            raise ParpkitError(f"{path}:{start}: row {len(rows) + 1}: {exc} (a double quote without its closing "
                               "one?)") from None
        return rows
    raise ParpkitError(f"{path}: unknown manifest type {suffix!r}; expected .csv, .tsv or .jsonl")


def _whole_row(path: Path, reader: csv.DictReader, row: dict[str, Any], number: int, hint: str) -> None:
    """A row with as many fields as the header has columns: extra fields would be cut off (``s4.wav,hello, world``
    scored against ``hello``) and missing ones read as empty, silently."""
    columns = len(reader.fieldnames or ())
    extra = row.get(None)
    fields = columns + len(extra) if extra else sum(v is not None for v in row.values())
    if fields != columns:
        raise ParpkitError(f"{path}:{reader.line_num}: row {number} has {fields} field{'s' if fields != 1 else ''}, but the "
                           f"header has {columns} columns ({hint})")


class Manifest(Dataset):
    name = "manifest"
    Options = ManifestOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        self.unit = self.options.unit

    def split_names(self) -> list[str]:
        return list(self.options.splits)

    def check(self) -> None:
        """Each manifest exists, its rows are whole, and it has the columns the options name (read, not the audio)."""
        for split in self.options.splits:
            path, rows = self._rows(split)
            self._labelled(path, rows[0])

    def _labelled(self, path: Path, columns: dict) -> bool:
        """Whether the manifest holds transcripts. Without the text column it is unlabelled audio only if it has
        no column but the audio, id and speaker ones: any other column would be the transcripts under another
        name than ``text_column`` says, and reading them as unlabelled audio would be silent."""
        o = self.options
        if o.text_column in columns:
            return True
        others = [str(c) for c in columns if c not in (o.audio_column, o.id_column, o.speaker_column)]
        if others:
            close = difflib.get_close_matches(o.text_column, others, 1)
            raise ParpkitError(f"{path}: no column {o.text_column!r} (text_column)"
                               + (f"; did you mean {close[0]!r}?" if close else "")
                               + f" Columns are {', '.join(map(str, columns))}. A manifest of unlabelled audio (for "
                               "distillation) has no column besides the audio, id and speaker ones")
        return False

    def _rows(self, split: str) -> tuple[Path, list[dict[str, Any]]]:
        o = self.options
        path = Path(o.splits[split]).expanduser()
        if not path.is_file():
            raise ParpkitError(f"manifest for split {split!r} not found: {path}")
        rows = read_rows(path)
        if not rows:
            raise ParpkitError(f"{path}: the manifest has no rows")
        # text_column as given: a misspelled one would read a labelled split as unlabelled audio
        named = ("text_column", o.text_column) if "text_column" in o.model_fields_set else ("", None)
        for key, col in (("audio_column", o.audio_column), named, ("speaker_column", o.speaker_column),
                         ("id_column", o.id_column)):
            if col and col not in rows[0]:
                close = difflib.get_close_matches(col, list(map(str, rows[0])), 1)
                raise ParpkitError(f"{path}: no column {col!r} ({key}); columns are {', '.join(map(str, rows[0]))}"
                                   + (f" (did you mean {close[0]!r}?)" if close else ""))
        return path, rows

    def load_split(self, split: str, progress: Progress) -> Sequence[Utterance]:
        o = self.options
        path, rows = self._rows(split)
        # a manifest without the text column is unlabelled audio: a training split of it needs distillation
        # (the teacher transcribes it); the engine refuses it anywhere else
        labelled = self._labelled(path, rows[0])
        out = []
        with progress.task(f"reading {split}", total=len(rows)) as task:
            for i, row in enumerate(rows):
                text = row.get(o.text_column)
                if labelled and (not isinstance(text, str) or not text.strip()):
                    why = "no transcript" if text is None or isinstance(text, str) else f"a transcript that is not text ({text!r})"
                    if not o.skip_unreadable:
                        raise ParpkitError(f"{path}: row {i + 1} has {why} in column {o.text_column!r}; fix it, or set "
                                           "skip_unreadable: true to skip such rows")
                    self.skipped.append(f"row {i + 1}: {why}")
                    task.advance()
                    continue
                if row.get(o.audio_column) in (None, ""):
                    raise ParpkitError(f"{path}: row {i + 1} has no audio path in column {o.audio_column!r}")
                audio_path = Path(str(row[o.audio_column])).expanduser()
                if not audio_path.is_absolute():
                    audio_path = path.parent / audio_path
                try:
                    audio = read_audio(audio_path)
                except AudioError as exc:
                    if not o.skip_unreadable:
                        raise ParpkitError(f"{exc} (row {i + 1} of {path}); set skip_unreadable: true to skip it") from None
                    self.skipped.append(str(audio_path))
                    task.advance()
                    continue
                uid = str(row[o.id_column]) if o.id_column else f"{split}-{i:06d}"
                speaker = str(row[o.speaker_column]) if o.speaker_column else ""
                out.append(Utterance(uid, audio, 16000, text if labelled else None, speaker))
                task.advance()
        return out


@hookimpl
def register_datasets(register):
    register(Manifest)
