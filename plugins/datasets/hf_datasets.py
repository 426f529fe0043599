"""Hugging Face datasets: ``load_dataset`` by name or local path (``audiofolder`` included), with
column mapping and split names. Audio is decoded with libsndfile (no torchcodec needed) and resampled
inside ``datasets.map``, whose cache keeps the preprocessing between runs.

datasets >= 4 needs torchcodec (and FFmpeg) to build an ``audiofolder`` with its Audio feature. Without
torchcodec, an ``audiofolder`` is read through the ``csv``/``json`` builders instead: each split name
in ``splits`` is then a folder under ``data_dir`` holding ``metadata.csv`` or ``metadata.jsonl`` with a
``file_name`` column, as the audiofolder layout prescribes."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from parpkit import Dataset, ParpkitError, PluginOptions, Progress, Utterance, hookimpl


class HFOptions(PluginOptions):
    #: dataset name on the hub, a local dataset script/folder, or a builder such as "audiofolder"
    path: str
    #: the dataset's configuration name, if it has several
    name: str | None = None
    #: a folder of the data (audiofolder: ``<data_dir>/<split>/metadata.csv`` with a ``file_name`` column)
    data_dir: str | None = None
    #: ``load_dataset``'s ``data_files``, instead of ``data_dir``
    data_files: dict[str, Any] | str | None = None
    #: parpkit split name -> the dataset's split name
    splits: dict[str, str] = Field(default_factory=lambda: {"train": "train", "test": "test"})
    #: the column holding the audio (decoded and resampled to 16 kHz in ``datasets.map``, so cached)
    audio_column: str = "audio"
    #: the column holding the transcript
    text_column: str = "text"
    #: a column naming each utterance's speaker, if there is one
    speaker_column: str | None = None
    #: words (WER/CER) or phones (space-separated labels, PER)
    unit: Literal["words", "phones"] = "words"
    #: processes for ``datasets.map``; null: one
    num_proc: int | None = None


def _decode(example: dict, audio_column: str) -> dict:
    from parpkit import read_audio

    a = example[audio_column]
    if isinstance(a, str):
        return {"_audio16k": read_audio(a)}
    if a.get("bytes"):
        return {"_audio16k": read_audio(io.BytesIO(a["bytes"]), name=a.get("path") or "<bytes>")}
    return {"_audio16k": read_audio(a["path"])}


class HFDataset(Dataset):
    name = "hf_dataset"
    Options = HFOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        self.unit = self.options.unit

    def split_names(self) -> list[str]:
        return list(self.options.splits)

    def load_split(self, split: str, progress: Progress) -> Sequence[Utterance]:
        import datasets

        o = self.options
        audio_column = o.audio_column
        try:
            if o.path == "audiofolder" and importlib.util.find_spec("torchcodec") is None:
                ds, audio_column = self._audiofolder_metadata(o.splits[split]), "_path"
            else:
                ds = datasets.load_dataset(o.path, o.name, data_dir=o.data_dir, data_files=o.data_files, split=o.splits[split])
        except ParpkitError:
            raise
        except Exception as exc:  # datasets raises many types; all mean "could not load"
            raise ParpkitError(f"hf_dataset: cannot load {o.path!r} split {o.splits[split]!r}: {exc}") from None
        missing = [c for c in (audio_column, o.text_column, o.speaker_column) if c and c not in ds.column_names]
        if missing:
            raise ParpkitError(f"hf_dataset {o.path!r}: no column {missing[0]!r}; columns are {', '.join(ds.column_names)}")
        if audio_column != "_path":
            ds = ds.cast_column(audio_column, datasets.Audio(decode=False))
        with progress.task(f"preparing {split}", total=len(ds)) as task:
            ds = ds.map(_decode, fn_kwargs={"audio_column": audio_column}, num_proc=o.num_proc,
                        desc=f"decoding {split}")
            task.advance(len(ds))
        ds = ds.with_format("numpy", columns=["_audio16k"], output_all_columns=True)
        out = []
        for i, row in enumerate(ds):
            text = row[o.text_column]
            if not isinstance(text, str) or not text.strip():
                raise ParpkitError(f"hf_dataset {o.path!r} split {o.splits[split]!r}: row {i} has no transcript in column "
                                   f"{o.text_column!r} (got {text!r})")
            speaker = str(row[o.speaker_column]) if o.speaker_column else ""
            out.append(Utterance(f"{split}-{i:06d}", row["_audio16k"].astype("float32"), 16000, text, speaker))
        return out


    def _audiofolder_metadata(self, split_dir: str):
        import datasets

        if not self.options.data_dir:
            raise ParpkitError("hf_dataset: an audiofolder needs data_dir (the folder holding one sub-folder per split)")
        folder = Path(self.options.data_dir).expanduser() / split_dir
        for name, builder in (("metadata.csv", "csv"), ("metadata.jsonl", "json")):
            meta = folder / name
            if meta.is_file():
                ds = datasets.load_dataset(builder, data_files=str(meta), split="train")
                if "file_name" not in ds.column_names:
                    raise ParpkitError(f"{meta}: no file_name column; columns are {', '.join(ds.column_names)}")
                return ds.map(lambda row: {"_path": str(folder / row["file_name"])})
        raise ParpkitError(f"{folder}: no metadata.csv or metadata.jsonl (audiofolder layout: <data_dir>/<split>/metadata.csv "
                           "with file_name and transcript columns)")


@hookimpl
def register_datasets(register):
    register(HFDataset)
