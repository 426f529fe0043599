"""A deterministic synthetic speech corpus from the bundled espeak-ng: voices, variants, rates and
pitches as speakers; train/validation/test with disjoint speakers and disjoint sentences; cached on
disk at 16 kHz. A cache left half-written by a killed process is detected and rebuilt."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from parpkit import Dataset, ParpkitError, PluginOptions, Progress, Utterance, hookimpl, install_atomically

GENERATOR_VERSION = 2  # bump when sentences, speakers or audio processing change
SAMPLE_RATE = 16000
SPLITS = ("train", "validation", "test")


class SyntheticOptions(PluginOptions):
    #: utterances per split
    sizes: dict[str, int] = Field(default_factory=lambda: {"train": 200, "validation": 20, "test": 40})
    #: speakers per split (disjoint between splits)
    speakers: dict[str, int] = Field(default_factory=lambda: {"train": 16, "validation": 4, "test": 6})
    voices: list[str] = Field(default_factory=lambda: ["en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029",
                                                        "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd"])
    variants: list[str] = Field(default_factory=lambda: [f"m{i}" for i in range(1, 8)] + [f"f{i}" for i in range(1, 6)])
    rate: tuple[int, int] = (140, 190)
    pitch: tuple[int, int] = (30, 70)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        for what in (self.sizes, self.speakers):
            unknown = set(what) - set(SPLITS)
            if unknown:
                raise ValueError(f"unknown split {sorted(unknown)}; splits are {', '.join(SPLITS)}")
        for split, n in self.sizes.items():
            if n > 0 and self.speakers.get(split, 0) <= 0:
                raise ValueError(f"split {split!r} has {n} utterances but no speakers")
        return self


class SyntheticSpeech(Dataset):
    name = "synthetic_speech"
    Options = SyntheticOptions

    def split_names(self) -> list[str]:
        return [s for s in SPLITS if self.options.sizes.get(s, 0) > 0]

    # --------------------------------------------------------------------------- planning
    def _key(self) -> str:
        blob = json.dumps({"v": GENERATOR_VERSION, **self.options.model_dump()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def plan(self) -> dict[str, list[dict]]:
        """Which sentence each speaker says in each split (no audio): deterministic in the options."""
        from .sentences import SentenceGenerator

        o = self.options
        rng = random.Random(o.seed)
        combos = list(itertools.product(o.voices, o.variants))
        rng.shuffle(combos)
        need = sum(o.speakers.get(s, 0) for s in self.split_names())
        if need > len(combos):
            raise ValueError(f"{need} speakers asked for, but only {len(combos)} voice/variant pairs exist")
        sizes = {s: o.sizes.get(s, 0) for s in self.split_names()}
        sentences = SentenceGenerator(o.seed).unique(sum(sizes.values()))
        plan, start_s, start_t = {}, 0, 0
        for split in self.split_names():
            speakers = []
            for voice, variant in combos[start_s:start_s + o.speakers[split]]:
                speakers.append({"voice": f"{voice}+{variant}", "rate": rng.randint(*o.rate), "pitch": rng.randint(*o.pitch)})
            start_s += o.speakers[split]
            rows = []
            for i, text in enumerate(sentences[start_t:start_t + sizes[split]]):
                spk = speakers[i % len(speakers)]
                rows.append({"id": f"{split}-{i:05d}", "text": text, "speaker": f"{spk['voice']}@{spk['rate']}/{spk['pitch']}",
                             "seed": o.seed * 1_000_003 + start_t + i, **spk})
            start_t += sizes[split]
            plan[split] = rows
        return plan

    # --------------------------------------------------------------------------- cache
    @property
    def corpus_dir(self) -> Path:
        return self.cache_dir / "synthetic_speech" / self._key()

    def _valid(self, directory: Path) -> bool:
        try:
            manifest = json.loads((directory / "COMPLETE").read_text())
            for split, info in manifest["splits"].items():
                audio = directory / f"{split}.npy"
                if audio.stat().st_size != info["audio_bytes"]:
                    return False
                if sum(1 for _ in (directory / f"{split}.jsonl").open()) != info["utterances"]:
                    return False
            return set(manifest["splits"]) == set(self.split_names())
        except (OSError, ValueError, KeyError):
            return False

    def build(self, progress: Progress) -> Path:
        target = self.corpus_dir
        if self._valid(target):
            return target
        if target.exists():
            progress.console.print(f"[yellow]{target}: incomplete or damaged corpus cache, rebuilding it[/]")
        plan = self.plan()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            splits = self._synthesise_in_child(plan, tmp, progress)
            manifest = {"options": self.options.model_dump(), "generator_version": GENERATOR_VERSION, "splits": splits}
            (tmp / "COMPLETE").write_text(json.dumps(manifest, indent=1))
            install_atomically(tmp, target, self._valid)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @staticmethod
    def _synthesise_in_child(plan: dict[str, list[dict]], tmp: Path, progress: Progress) -> dict:
        """espeak-ng output depends on everything synthesised before in the process, so a fresh
        process per build is what makes the corpus reproducible."""
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_synthesise, args=(plan, str(tmp), sender), daemon=True)
        child.start()
        sender.close()
        result, error = None, None
        with progress.task("synthesising speech", total=sum(len(r) for r in plan.values())) as task:
            while True:
                try:
                    kind, value = receiver.recv()
                except EOFError:
                    break
                if kind == "advance":
                    task.advance(value)
                elif kind == "done":
                    result = value
                else:
                    error = value
        child.join()
        if error or result is None:
            raise ParpkitError(f"speech synthesis failed: {error or f'the synthesis process exited with code {child.exitcode}'}")
        return result

    def load_split(self, split: str, progress: Progress) -> Sequence[Utterance]:
        if split not in self.split_names():
            raise ValueError(f"synthetic_speech has no split {split!r} with utterances; splits: {', '.join(self.split_names())}")
        directory = self.build(progress)
        audio = np.load(directory / f"{split}.npy", mmap_mode="r")
        out = []
        for line in (directory / f"{split}.jsonl").open():
            row = json.loads(line)
            pcm = audio[row["offset"]:row["offset"] + row["length"]]
            out.append(Utterance(id=row["id"], audio=(pcm.astype(np.float32) / 32768.0), sample_rate=SAMPLE_RATE,
                                 text=row["text"], speaker=row["speaker"]))
        return out


def _synthesise(plan: dict[str, list[dict]], tmp: str, conn) -> None:
    """Child process: synthesise every utterance of ``plan`` into ``tmp`` (int16 .npy + .jsonl per split)."""
    try:
        import soxr

        from .espeak import Espeak

        engine, out, splits = Espeak.get(), Path(tmp), {}
        for split, rows in plan.items():
            pieces, offset = [], 0
            with (out / f"{split}.jsonl").open("w") as meta:
                for row in rows:
                    raw = engine.synth(row["text"], row["voice"], row["rate"], row["pitch"], seed=row["seed"])
                    audio = soxr.resample(raw.astype(np.float32) / 32768.0, engine.sample_rate, SAMPLE_RATE)
                    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
                    pieces.append(pcm)
                    meta.write(json.dumps({"id": row["id"], "text": row["text"], "speaker": row["speaker"],
                                           "offset": offset, "length": len(pcm)}) + "\n")
                    offset += len(pcm)
                    conn.send(("advance", 1))
            np.save(out / f"{split}.npy", np.concatenate(pieces) if pieces else np.zeros(0, np.int16))
            splits[split] = {"utterances": len(rows), "audio_bytes": (out / f"{split}.npy").stat().st_size}
        conn.send(("done", splits))
    except Exception as exc:  # reported to the parent, which raises it with context
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


@hookimpl
def register_datasets(register):
    register(SyntheticSpeech)
