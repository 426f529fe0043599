"""CTC backbones: wav2vec2 (facebook/wav2vec2-base, the seed's model), HuBERT, WavLM and data2vec-audio
through transformers' auto classes. The CTC vocabulary is built from the training transcripts
(characters with ``|`` as word delimiter, or phone labels) and saved with the model, so the run
directory loads with plain transformers. Greedy CTC decoding, batched, with dynamic padding."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from parpkit import (Backbone, ModelFormatError, ParpkitError, PluginOptions, Utterance, ffn_group, head_group, hookimpl, normalise,
                     normalise_units)

# q/k/v/out of every transformer block's attention and both feed-forward linears, weights and biases.
DEFAULT_POOL = [
    r"[a-z0-9_]+\.encoder\.layers\.\d+\.attention\.(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)",
    r"[a-z0-9_]+\.encoder\.layers\.\d+\.feed_forward\.(intermediate_dense|output_dense)\.(weight|bias)",
]
SPECIAL = ["<pad>", "<unk>"]


class CTCOptions(PluginOptions):
    #: hub id or local directory of a pretrained (or fine-tuned) checkpoint; null with ``config``
    model: str | None = None
    #: for a random-initialised model: the config's ``model_type`` and keys
    model_type: str = "wav2vec2"
    #: the config's keys for a random-initialised model (instead of ``model``)
    config: dict[str, Any] | None = None
    #: keep the convolutional feature encoder frozen (as the reference PARP code does)
    freeze_feature_encoder: bool = True
    #: SpecAugment during training: the probability of a time mask starting at each frame
    mask_time_prob: float = Field(default=0.05, ge=0, le=1)
    #: SpecAugment: frames each time mask covers
    mask_time_length: int = Field(default=10, gt=0)
    #: SpecAugment: the probability of a channel (feature) mask starting at each channel
    mask_feature_prob: float = Field(default=0.0, ge=0, le=1)
    #: SpecAugment: channels each feature mask covers
    mask_feature_length: int = Field(default=10, gt=0)
    #: the probability of skipping each transformer layer in a training step; null keeps the checkpoint's
    layerdrop: float | None = Field(default=None, ge=0, le=1)
    #: dropout after the feed-forward activation (the reference fine-tunes with 0.1); null keeps the checkpoint's
    activation_dropout: float | None = Field(default=None, ge=0, lt=1)
    #: the seed of a random initialisation (with ``config``)
    seed: int = 0


def _local_or_hub(source: str) -> Path:
    """``source`` as a path; refused where it names no folder yet cannot be a hub id either (a hub id is "name" or
    "owner/name": a missing ``./x`` or ``runs/x/model`` is a mistyped folder, not a model to look up)."""
    path = Path(source).expanduser()
    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise ModelFormatError(f"{path}: no such model directory")
    return path


def build_vocabulary(texts: Sequence[str], unit: str) -> dict[str, int]:
    if unit == "phones":
        symbols = sorted({p for t in texts for p in normalise_units(t).split()})
    else:
        symbols = ["|"] + sorted({c for t in texts for c in normalise(t).replace(" ", "|")} - {"|"})
    return {s: i for i, s in enumerate(SPECIAL + symbols)}


def make_tokenizer(vocab: dict[str, int], unit: str):
    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2PhonemeCTCTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.json"
        path.write_text(json.dumps(vocab))
        if unit == "phones":
            return Wav2Vec2PhonemeCTCTokenizer(str(path), do_phonemize=False, phone_delimiter_token=" ",
                                               word_delimiter_token=None, unk_token="<unk>", pad_token="<pad>",
                                               bos_token=None, eos_token=None)
        return Wav2Vec2CTCTokenizer(str(path), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|",
                                    bos_token=None, eos_token=None)


class CTCBackbone(Backbone):
    name = "wav2vec2"
    Options = CTCOptions
    default_pool = DEFAULT_POOL
    pads_to_longest = True
    #: samples of each utterance, for output_mask of models that take no attention mask (collate adds it)
    batch_extras = ("input_lengths",)

    def __init__(self, options: CTCOptions | None = None, **kw: Any):
        super().__init__(options, **kw)
        o = self.options
        if (o.model is None) == (o.config is None):
            raise ParpkitError(f"{self.name}: give exactly one of `model` (pretrained) or `config` (random initialisation)")
        if o.config is not None:
            from transformers import AutoConfig

            try:
                config_class = type(AutoConfig.for_model(o.model_type))
            except ValueError:
                raise ParpkitError(f"{self.name}: unknown model_type {o.model_type!r} (e.g. wav2vec2, hubert, wavlm, "
                                   "data2vec-audio)") from None
            self.check_config_keys(config_class, o.config)
        self.unit = "words"
        self.tokenizer = None
        self.feature_extractor = None
        self.use_attention_mask = True
        self.conv_kernel, self.conv_stride = [10, 3, 3, 3, 3, 2, 2], [5, 2, 2, 2, 2, 2, 2]

    def prepare(self, train: Sequence[Utterance], unit: str) -> None:
        if not train:
            raise ParpkitError(f"{self.name}: the CTC vocabulary is built from the training transcripts, and no training "
                               "utterance has one; label-free CTC training needs some transcribed utterances in the "
                               "training split to build it from (a fine-tuned CTC teacher directory then transcribes the rest)")
        self.unit = unit
        self.tokenizer = make_tokenizer(build_vocabulary([u.text for u in train], unit), unit)

    def _config(self, vocab_size: int, pad_id: int):
        from transformers import AutoConfig

        o = self.options
        extra = dict(vocab_size=vocab_size, pad_token_id=pad_id, ctc_loss_reduction="mean", ctc_zero_infinity=True,
                     mask_time_prob=o.mask_time_prob, mask_time_length=o.mask_time_length,
                     mask_feature_prob=o.mask_feature_prob, mask_feature_length=o.mask_feature_length)
        if o.layerdrop is not None:
            extra["layerdrop"] = o.layerdrop
        if o.activation_dropout is not None:
            extra["activation_dropout"] = o.activation_dropout
        if o.config is not None:
            return AutoConfig.for_model(o.model_type, **{**o.config, **extra})
        local = _local_or_hub(o.model)
        if local.is_dir() and not any(local.iterdir()):
            raise ModelFormatError(f"{self.name}: {local}: the model directory is empty")
        if local.is_dir() and not (local / "config.json").is_file():
            raise ModelFormatError(f"{self.name}: {local}: holds no config.json; expected a transformers checkpoint directory")
        try:
            config = AutoConfig.from_pretrained(o.model, **extra)
        except OSError as exc:
            raise ParpkitError(f"{self.name}: cannot read the config of {o.model!r}: {str(exc).splitlines()[0]} Without network, "
                               "point `model` at a local checkpoint directory") from None
        except ValueError as exc:  # a config.json without a known model_type
            raise ModelFormatError(f"{self.name}: cannot read the config of {o.model!r}: {str(exc).splitlines()[0]}") from None
        self._check_ctc(config)
        return config

    def _check_ctc(self, config) -> None:
        """A model transformers has no CTC head for (a whisper directory, a text model) is refused by name."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CTC_MAPPING_NAMES

        if config.model_type not in MODEL_FOR_CTC_MAPPING_NAMES:
            hint = " (use backbone whisper)" if config.model_type == "whisper" else ""
            raise ParpkitError(f"{self.name}: {self.options.model!r} is a {config.model_type} model, which has no CTC head{hint}; "
                               f"CTC models are {', '.join(sorted(MODEL_FOR_CTC_MAPPING_NAMES))}")

    def skeleton(self) -> torch.nn.Module:
        from transformers import AutoModelForCTC

        config = self._config(32, 0)
        width, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
        if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width > 0 and width % heads:
            raise ParpkitError(f"{self.name}: config: hidden_size {width} is not divisible by num_attention_heads {heads}")
        with torch.device("meta"):
            model = AutoModelForCTC.from_config(config)
        self.conv_kernel, self.conv_stride = list(config.conv_kernel), list(config.conv_stride)
        return model

    def min_samples(self) -> int:
        """The feature encoder's receptive field: fewer samples make no frame (400, 25 ms, for wav2vec2)."""
        n = 1
        for kernel, stride in reversed(list(zip(self.conv_kernel, self.conv_stride, strict=True))):
            n = (n - 1) * stride + kernel
        return n

    def load(self) -> torch.nn.Module:
        from transformers import AutoFeatureExtractor, AutoModelForCTC, Wav2Vec2FeatureExtractor

        if self.tokenizer is None:
            raise ParpkitError(f"{self.name}: the CTC vocabulary is built from the training transcripts; call prepare() first")
        o = self.options
        config = self._config(len(self.tokenizer), self.tokenizer.pad_token_id)
        if o.config is not None:
            torch.manual_seed(o.seed)
            model = AutoModelForCTC.from_config(config)
        else:
            try:
                model = AutoModelForCTC.from_pretrained(o.model, config=config, ignore_mismatched_sizes=True, dtype=torch.float32)
            except Exception as exc:  # OSError for missing files; safetensors and torch errors for damaged ones
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ModelFormatError(f"{self.name}: cannot load {o.model!r}: {type(exc).__name__}: {text}") from None
        self.use_attention_mask = getattr(config, "feat_extract_norm", "layer") == "layer"
        self.conv_kernel, self.conv_stride = list(config.conv_kernel), list(config.conv_stride)
        try:
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(o.model) if o.model else None
        except OSError:
            self.feature_extractor = None
        if self.feature_extractor is None:
            self.feature_extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                              do_normalize=True, return_attention_mask=self.use_attention_mask)
        if o.freeze_feature_encoder:
            model.freeze_feature_encoder()
        return model

    def _text(self, text: str) -> str:
        return normalise_units(text) if self.unit == "phones" else normalise(text)

    def _inputs(self, audios: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        feats = self.feature_extractor([np.asarray(a, dtype=np.float32) for a in audios], sampling_rate=16000,
                                       padding=True, return_tensors="pt", return_attention_mask=self.use_attention_mask)
        out = {"input_values": feats.input_values}
        if self.use_attention_mask:
            out["attention_mask"] = feats.attention_mask
        return out

    def collate(self, batch: Sequence[Utterance]) -> dict[str, torch.Tensor]:
        inputs = self._inputs([u.audio for u in batch])
        ids = [self.tokenizer(self._text(u.text)).input_ids for u in batch]
        # width at least 1: a batch of empty transcripts (silence) is all padding, and CTC scores it as all blanks
        labels = torch.full((len(ids), max(1, max(len(x) for x in ids))), -100, dtype=torch.long)
        for i, x in enumerate(ids):
            labels[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        # models without an attention mask (group-norm wav2vec2-base) see zeros as padding: the lengths travel
        # beside the model inputs, for output_mask
        lengths = {} if self.use_attention_mask else {"input_lengths": torch.tensor([len(u.audio) for u in batch])}
        return {**inputs, "labels": labels, **lengths}

    def output_mask(self, batch, logits: torch.Tensor) -> torch.Tensor:
        """Frames of real audio: padding frames left out, from the attention mask or, for models that take
        none, the utterances' lengths that ``collate`` carries (``input_lengths``)."""
        return self._real_frames(batch, logits.shape[1], logits.device)

    def hidden_mask(self, batch, kind: str, positions: int) -> torch.Tensor | None:
        """The transformer's frames of real audio (its hidden states are frame by frame, as the logits)."""
        return self._real_frames(batch, positions, batch["labels"].device)

    def _real_frames(self, batch, positions: int, device: torch.device) -> torch.Tensor:
        if "attention_mask" in batch:
            samples = batch["attention_mask"].sum(-1)
        elif "input_lengths" in batch:
            samples = batch["input_lengths"]
        else:
            raise ParpkitError(f"{self.name}: a batch without attention_mask or input_lengths: its padding frames are "
                               "unknown (batches come from collate)")
        lengths = self._frames(samples.to(device))
        return torch.arange(positions, device=device)[None, :] < lengths.clamp(min=0)[:, None]

    def position_mask(self, module: str, batch, positions: int) -> torch.Tensor | None:
        """Frames of real audio (the feature encoder's output frames of each utterance's samples)."""
        lengths = self._frames(torch.tensor([len(u.audio) for u in batch.utterances]))
        return torch.arange(positions)[None, :] < lengths.clamp(max=positions)[:, None]

    def _frames(self, samples: torch.Tensor) -> torch.Tensor:
        """Output frames of the convolutional feature encoder for inputs of ``samples`` samples."""
        frames = samples
        for kernel, stride in zip(self.conv_kernel, self.conv_stride, strict=True):
            frames = torch.div(frames - kernel, stride, rounding_mode="floor") + 1
        return frames

    @torch.no_grad()
    def transcribe(self, model: torch.nn.Module, audios: Sequence[np.ndarray]) -> list[str]:
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in self._inputs(audios).items()}
        inputs["input_values"] = inputs["input_values"].to(next(model.parameters()).dtype)
        ids = model(**inputs).logits.argmax(-1)
        return [t.strip() for t in self.tokenizer.batch_decode(ids)]

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        from transformers import Wav2Vec2Processor

        model.save_pretrained(directory)
        Wav2Vec2Processor(feature_extractor=self.feature_extractor, tokenizer=self.tokenizer).save_pretrained(directory)

    def load_saved(self, directory: Path) -> torch.nn.Module:
        from transformers import AutoModelForCTC, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(directory)
            model = AutoModelForCTC.from_pretrained(directory)
        except Exception as exc:  # OSError for missing files; safetensors and torch errors for damaged ones
            raise ModelFormatError(f"{directory}: cannot load the saved CTC model: {type(exc).__name__}") from None
        self.tokenizer, self.feature_extractor = processor.tokenizer, processor.feature_extractor
        self.use_attention_mask = getattr(model.config, "feat_extract_norm", "layer") == "layer"
        self.unit = "words" if "|" in self.tokenizer.get_vocab() else "phones"
        return model

    def output_layer(self, model: torch.nn.Module) -> torch.nn.Module:
        """The CTC head (``lm_head``), built fresh for each run: what the reference's frozen start trains alone."""
        return model.lm_head

    def structured_groups(self, model: torch.nn.Module) -> list:
        return structured_groups(model)

    def plain_widths(self, model: torch.nn.Module, kept: Mapping[str, int]) -> tuple[dict[str, Any], list[str]]:
        """``intermediate_size`` where every layer keeps the same number of FFN neurons. Heads never: the
        attention's head size is hidden_size // heads."""
        base = model.base_model_prefix
        names = [f"{base}.encoder.layers.{i}.ffn" for i in range(len(getattr(model, base).encoder.layers))]
        widths = {kept[n] for n in names}
        if len(widths) == 1 and (width := widths.pop()) < model.config.intermediate_size:
            return {"intermediate_size": width}, names
        return {}, []

    # ------------------------------------------------------------------------------ distillation teacher
    def _teacher_config(self, source: str):
        from transformers import AutoConfig

        path = _local_or_hub(source)
        try:
            return AutoConfig.from_pretrained(path if path.exists() else source)
        except Exception as exc:  # OSError: no config.json, no such hub id offline; ValueError: unknown model_type
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            hint = "" if path.exists() else " (nor is there a directory of that name)"
            raise ParpkitError(f"cannot read the config of {source!r}{hint}: {type(exc).__name__}: {text}") from None

    def needs_teacher_dir(self) -> str | None:
        """The CTC head is built fresh over the vocabulary of each run's transcripts: as loaded it is random."""
        return (f"a {self.name} model's CTC head is built fresh over the vocabulary of this run's transcripts and "
                "starts randomly initialised, so it would distil noise (and transcribe unlabelled audio as <unk>); a "
                "fine-tuned CTC teacher directory is needed: set distillation.teacher to a fine-tuned CTC model over "
                "the same vocabulary (e.g. the model/ of a dense fine-tune's run directory)")

    def check_teacher(self, source: str, *, hidden_states: bool = False) -> None:
        """Configs only: the CTC vocabulary is built from the training transcripts, so ``load_teacher``
        compares it, once they are read."""
        _refuse_teacher(self.name, source, self._teacher_config(source), self._config(32, 0), hidden_states)

    def load_teacher(self, source: str, student: torch.nn.Module) -> torch.nn.Module:
        """A fine-tuned CTC model whose head covers the vocabulary this run built from its transcripts."""
        from transformers import AutoModelForCTC, AutoTokenizer

        _refuse_teacher(self.name, source, self._teacher_config(source), student.config, hidden_states=False)
        path = Path(source).expanduser()
        where = path if path.exists() else source
        try:
            teacher = AutoModelForCTC.from_pretrained(where, dtype=torch.float32)
        except Exception as exc:  # OSError for missing files; safetensors and torch errors for damaged ones
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ModelFormatError(f"cannot load {source!r} as a CTC model: {type(exc).__name__}: {text}") from None
        ours = self.tokenizer.get_vocab()
        theirs = None  # without a vocab.json (or from the hub) the head's size is all there is to compare
        if path.exists() and (path / "vocab.json").is_file():
            try:
                theirs = AutoTokenizer.from_pretrained(path).get_vocab()
            except Exception as exc:
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ModelFormatError(f"{source}: cannot read its tokenizer: {type(exc).__name__}: {text}") from None
        if teacher.config.vocab_size != len(ours) or (theirs is not None and theirs != ours):
            has = f"a CTC head of {teacher.config.vocab_size} outputs" if teacher.config.vocab_size != len(ours) else \
                "a CTC head over other symbols"
            raise ParpkitError(f"{source} has {has}; the vocabulary this run built from its training transcripts has "
                               f"{len(ours)} symbols, and the teacher must be fine-tuned on the same ones")
        return teacher


def structured_groups(model: torch.nn.Module) -> list:
    """FFN neurons and attention heads of every transformer block."""
    base = model.base_model_prefix
    groups = []
    for i in range(len(getattr(model, base).encoder.layers)):
        layer = f"{base}.encoder.layers.{i}"
        groups.append(ffn_group(model, f"{layer}.ffn", f"{layer}.feed_forward.intermediate_dense",
                                f"{layer}.feed_forward.output_dense"))
        groups.append(head_group(model, f"{layer}.attention"))
    return groups


def _refuse_teacher(name: str, source: str, teacher, student, hidden_states: bool) -> None:
    """Refuse, in one line, a teacher whose config says it cannot take the student's batches (the same
    architecture and convolutional frame rate) or has no CTC head."""
    if teacher.model_type != student.model_type:
        raise ParpkitError(f"{source} is a {teacher.model_type} model; this {name} student is a {student.model_type}")
    differs = [f"{key} {list(getattr(teacher, key))} (the student's {list(getattr(student, key))})"
               for key in ("conv_kernel", "conv_stride") if list(getattr(teacher, key)) != list(getattr(student, key))]
    shapes = [f"{key} {getattr(teacher, key)} (the student's {getattr(student, key)})"
              for key in ("hidden_size", "num_hidden_layers") if getattr(teacher, key) != getattr(student, key)]
    architectures = getattr(teacher, "architectures", None) or []
    if architectures and not any(a.endswith("ForCTC") for a in architectures):
        differs.append(f"no trained CTC head (it is a {architectures[0]}; give a fine-tuned CTC model)")
    shapes = shapes if hidden_states else []
    if differs or shapes:
        why = " (distillation.hidden_weight matches hidden states layer by layer)" if shapes else ""
        raise ParpkitError(f"{source} cannot teach this {name} model: it has {', '.join(differs + shapes)}{why}")


@hookimpl
def register_backbones(register):
    register(CTCBackbone)
