"""The plugin interfaces. Each plugin class has a recipe ``name`` and an ``Options`` model.

``Options`` is a pydantic model; recipes pass ``options:`` through it, so a misspelled option is an
error with its key path. A plugin with nothing to configure keeps the empty default.

Kinds: ``Backbone`` (a model), ``Dataset`` (a corpus), criteria (``PruningCriterion`` scores single
weights, ``StructuredCriterion`` whole units) and ``Schedule`` (when and how much). Schedules act through
a ``Pruner``, the engine's object that holds the pool and its masks (a protocol: what schedules may call).

Criteria and schedules read the run through ``parpkit.RunContext`` (``parpkit/context.py``, which builds on
this module, so the annotations here name it without importing it).

State that must survive a crash uses one naming everywhere: ``state_dict()`` returns a nested mapping of
JSON values and tensors, ``load_state_dict(state)`` takes it back. Checkpoints store it; resuming restores it.
"""

from __future__ import annotations

import contextlib
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from parpkit.errors import ParpkitError

if TYPE_CHECKING:
    from parpkit.progress import Progress
    from parpkit.units import UnitGroup


def _numeric(annotation: Any) -> bool:
    """An int or float field (or an optional one), where a YAML ``true`` would silently become 1."""
    args = typing.get_args(annotation) or (annotation,)
    return any(a in (int, float) for a in args) and bool not in args


def _boolean_as_number(annotation: Any, value: Any, where: str = "") -> str | None:
    """Where in ``value`` a boolean stands for a number that ``annotation`` asks for, also inside lists, tuples
    and mappings (``""`` at the top, ``"[1]"``, ``".train"``); None where nowhere."""
    if isinstance(value, bool):
        return where if _numeric(annotation) else None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _boolean_as_number(args[0], value, where)
    if origin in (typing.Union, types.UnionType):  # X | Y, Optional[X]: any alternative that asks
        return next((w for a in args if (w := _boolean_as_number(a, value, where)) is not None), None)
    if isinstance(value, (list, tuple)) and origin in (list, tuple, set, frozenset, Sequence) and args:
        each = args if origin is tuple and args[-1] is not Ellipsis else (args[0],) * len(value)
        return next((w for i, (a, v) in enumerate(zip(each, value)) if (w := _boolean_as_number(a, v, f"{where}[{i}]"))
                     is not None), None)
    if isinstance(value, dict) and origin in (dict, Mapping) and len(args) == 2:
        return next((w for k, v in value.items() if (w := _boolean_as_number(args[1], v, f"{where}.{k}")) is not None), None)
    return None


class StrictModel(BaseModel):
    """Unknown keys are errors, not silence; a boolean is not a number (nor inside a list or mapping of numbers);
    nor is ``.inf`` or ``.nan``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        where = _boolean_as_number(cls.model_fields[info.field_name].annotation, value)
        if where == "":
            raise ValueError(f"expected a number, got {value!r}")
        if where is not None:
            raise ValueError(f"expected numbers, got a boolean at {where.lstrip('.')}")
        return value


class PluginOptions(StrictModel):
    """Base for every plugin's options: unknown keys are errors, not silence. The ``#:`` comment above a field
    is its documentation (``parpkit plugins --options NAME`` shows it)."""


def option_docs(options: type[BaseModel]) -> dict[str, str]:
    """Each field's ``#:`` comment (the lines right above it in its class's source), for the classes of ``options``'
    MRO whose source can be read; fields without one are left out."""
    import inspect
    import re

    docs: dict[str, str] = {}
    for cls in reversed(options.__mro__):
        try:
            lines = inspect.getsource(cls).splitlines()
        except (OSError, TypeError):
            continue
        comment: list[str] = []
        for line in lines:
            text = line.strip()
            if text.startswith("#:"):
                comment.append(text[2:].strip())
                continue
            field = re.match(r"(\w+)\s*:", text)
            if field and comment:
                docs[field.group(1)] = " ".join(comment)
            comment = []
    return docs


class _Plugin:
    name: ClassVar[str] = ""
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(self, options: PluginOptions | None = None, **_: Any):
        self.options = options if options is not None else self.Options()


#: set on an augmented utterance's ``extra``: its audio differs at every use, so nothing may be cached by its id
AUGMENTED = "augmented"


@dataclass
class Utterance:
    """One recording: mono float32 audio in [-1, 1] at ``sample_rate``, and its transcript (``None``: an
    unlabelled recording, which only distillation can train on: the teacher supplies its transcript)."""

    id: str
    audio: np.ndarray
    sample_rate: int
    text: str | None
    speaker: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cacheable(self) -> bool:
        """Whether what is computed from this audio (features) may be cached by ``id``: False for augmented
        audio, which sounds different at every use."""
        return not self.extra.get(AUGMENTED, False)


class Dataset(_Plugin, ABC):
    """A speech corpus split into named parts (``train``, ``test`` …).

    ``unit`` says what transcripts hold: ``"words"`` (scored by WER/CER) or ``"phones"`` (space-separated
    labels, scored by PER after ``score_text``).

    The engine constructs it as ``MyDataset(options, cache_dir=path)``: ``cache_dir`` is parpkit's cache folder
    (``$PARPKIT_CACHE``, default ``~/.cache/parpkit``), where a dataset keeps what it builds or converts once.
    A subclass that takes its own ``__init__`` passes ``cache_dir`` (and any other keyword) on to ``super()``.
    """

    #: what transcripts hold: "words" (WER/CER) or "phones" (space-separated labels, PER)
    unit: str = "words"

    def __init__(self, options: PluginOptions | None = None, *, cache_dir: Path, **kw: Any):
        super().__init__(options, **kw)
        self.cache_dir = Path(cache_dir)
        #: what was skipped: unreadable audio files, rows without a transcript (datasets that allow
        #: skipping append here; metrics.json counts them)
        self.skipped: list[str] = []

    @abstractmethod
    def split_names(self) -> list[str]:
        """Names of the splits this corpus provides."""

    @abstractmethod
    def load_split(self, split: str, progress: Progress) -> Sequence[Utterance]:
        """Return the utterances of ``split``; long work reports through ``progress``."""

    def check(self) -> None:
        """Cheap checks for ``parpkit validate`` (paths exist, layout is right); raise ParpkitError."""

    def labelled(self, split: str) -> bool | None:
        """Whether every utterance of ``split`` has a transcript, where that is known without loading it (from
        transcript files, say): validation then refuses a scored split without them, or a training split without
        them and without distillation. None (the default): known only once the split is loaded."""
        return None

    def score_text(self, text: str) -> str:
        """A reference or hypothesis as it is scored (e.g. TIMIT's 61 phones folded to 39)."""
        return text

    def report(self) -> dict[str, Any]:
        """Facts for metrics.json: by default, what was skipped (unreadable audio, missing transcripts)."""
        return {"skipped_unreadable": len(self.skipped), "skipped_files": self.skipped[:20]} if self.skipped else {}


class Backbone(_Plugin, ABC):
    """A pretrained speech recogniser: how to load it, feed it, decode it and save it.

    The engine constructs it as ``MyBackbone(options, cache_dir=path)`` (parpkit's cache folder, for converted
    weights), as it does a ``Dataset``.
    """

    #: regular expressions (``re.fullmatch`` on parameter names) of the default pruning pool
    default_pool: ClassVar[list[str]] = []
    #: the sample rate (Hz) of the audio the model takes; utterances at another rate are refused by name
    sample_rate: ClassVar[int] = 16000
    #: batches are padded to their longest input (CTC models), so training groups utterances of similar
    #: length into batches unless ``training.group_by_length`` says otherwise
    pads_to_longest: ClassVar[bool] = False
    #: keys ``collate`` may add beside the model inputs (e.g. each utterance's length, for ``output_mask``);
    #: the engine removes them before every forward (``model_inputs``)
    batch_extras: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: PluginOptions | None = None, *, cache_dir: Path, **kw: Any):
        super().__init__(options, **kw)
        self.cache_dir = Path(cache_dir)

    def min_samples(self) -> int:
        """The shortest audio (in samples) the model takes: the engine refuses shorter utterances, naming
        them, before anything trains (a CTC feature encoder needs one frame's receptive field)."""
        return 1

    def training_window_s(self, model: torch.nn.Module) -> float | None:
        """The longest audio, in seconds, that ``model`` (the skeleton, or the loaded model) takes in training;
        None: any length, or not known before loading. Validation refuses a recipe whose joined passages
        (``dataset.concatenate``) would be longer; where it is None, a run asks ``check_lengths`` about a passage
        of ``max_seconds`` once the model is loaded. By default None."""
        return None

    def check_lengths(self, utterances: Sequence[Utterance], *, training: bool) -> None:
        """Called with each split once ``load`` ran, before anything is evaluated or trained: raise ParpkitError
        naming an utterance the model cannot take (audio longer than its input window, a ``training`` transcript
        longer than its decoder), so that it fails now, not at the first batch after the dense evaluations. By
        default nothing is checked."""

    def prepare(self, train: Sequence[Utterance], unit: str) -> None:
        """Sees the training transcripts before ``load`` (e.g. to build a CTC vocabulary)."""

    @abstractmethod
    def skeleton(self) -> torch.nn.Module:
        """The model's architecture without its weights (meta device): cheap, for validation."""

    @abstractmethod
    def load(self) -> torch.nn.Module:
        """The pretrained model, ready to fine-tune; also prepares tokenizer and features."""

    @abstractmethod
    def collate(self, batch: Sequence[Utterance]) -> dict[str, torch.Tensor]:
        """A training batch: model inputs with ``labels``, so that ``model(**self.model_inputs(batch)).loss``
        works (and any of ``batch_extras``)."""

    def model_inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` without the ``batch_extras``: what the model takes. The engine calls it on the device the
        model runs on, once per forward of a batch, so a backbone may finish its inputs here (whisper with
        ``features: device`` turns the batch's padded audio into log-mel features on the GPU)."""
        return {k: v for k, v in batch.items() if k not in self.batch_extras}

    @abstractmethod
    def transcribe(self, model: torch.nn.Module, audios: Sequence[np.ndarray]) -> list[str]:
        """Decode a batch of 16 kHz waveforms to text."""

    @abstractmethod
    def save(self, model: torch.nn.Module, directory: Path) -> None:
        """Write a directory that plain ``transformers`` loads (model and processor)."""

    @contextlib.contextmanager
    def native(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """``model`` (and this backbone's inputs) at the settings it was published with, for as long as the
        context lasts; then back to its training settings. Every evaluation and the saved model go through
        it, so that a speed setting of training (whisper's shorter encoder window) never changes what is
        judged or written. By default training and native settings are the same: nothing changes."""
        yield model

    def settings(self, model: torch.nn.Module) -> dict[str, Any]:
        """The settings that shape ``model``'s outputs as it is now (whisper: its encoder window and decoding
        limits), for metrics.json: called in and out of ``native``. Empty by default."""
        return {}

    def output_mask(self, batch: Mapping[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """Which positions of ``logits`` (batch, positions, vocabulary) hold real outputs, for distillation:
        by default all; a seq2seq model's label positions, a CTC model's unpadded frames."""
        return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)

    def hidden_mask(self, batch: Mapping[str, torch.Tensor], kind: str, positions: int) -> torch.Tensor | None:
        """Which of the ``positions`` of the hidden states ``kind`` (the model output's field:
        ``hidden_states``, ``encoder_hidden_states``, ``decoder_hidden_states``) are real, as a bool (batch,
        positions) tensor, for distillation's hidden-state term (padding left out); None: all of them (the
        default). ``batch`` is the collated training batch, ``batch_extras`` included."""
        return None

    def position_mask(self, module: str, batch: CalibrationBatch, positions: int) -> torch.Tensor | None:
        """Which of the ``positions`` of ``module``'s input are real (not padding), as a bool (batch,
        positions) tensor, for calibration statistics; None: all of them (the default)."""
        return None

    def structured_groups(self, model: torch.nn.Module) -> list[UnitGroup]:
        """Coupled slices that form whole units (FFN neurons, attention heads), for structured criteria
        and compact export. Backbones declare them; nothing is traced."""
        return []

    def output_layer(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The layer that turns the model's last hidden states into outputs (the vocabulary's logits), which
        ``training.freeze_transformer_steps`` trains alone at first; None: the model has none to name. By
        default ``model.get_output_embeddings()`` (whisper's ``proj_out``)."""
        return model.get_output_embeddings()

    def load_saved(self, directory: Path) -> torch.nn.Module:
        """Load a model this backbone saved (``save``), for export; also readies tokenizer and features."""
        raise NotImplementedError(f"backbone {self.name!r} cannot reload a saved run")

    def plain_widths(self, model: torch.nn.Module, kept: Mapping[str, int]) -> tuple[dict[str, Any], list[str]]:
        """How plain transformers can hold ``model`` once ``kept[name]`` units are left in each of its
        ``structured_groups`` (every group named; an unpruned one keeps all its units): the config keys to
        change, and the groups whose removed units those keys let an export drop. The other groups keep
        their removed units as zeros. A config stores one width per stack (whisper's ``encoder_ffn_dim``), so
        a stack shrinks only where all its layers keep the same number; a head count that also sets the head
        size (``d_model // heads``) cannot shrink at all. By default nothing shrinks: ``({}, [])``."""
        return {}, []

    def export_formats(self) -> dict[str, str]:
        """Deployment formats this backbone writes besides parpkit's own (``transformers``, ``compact``,
        ``sparse``): name -> one line for ``parpkit export --format``. None by default."""
        return {}

    def export(self, fmt: str, model: torch.nn.Module, groups: list[UnitGroup], kept: Mapping[str, list[int]],
               directory: Path, quantization: str | None = None) -> dict[str, Any]:
        """Write ``model`` (as ``load_saved`` gave it, pruned units all zeros) in format ``fmt`` (one of
        ``export_formats``) to the new folder ``directory``; ``kept`` lists the units left in each of
        ``groups`` (the pool's), for formats that can drop the rest. Returns facts to report (JSON values),
        such as the largest output difference against ``model``."""
        raise NotImplementedError(f"backbone {self.name!r} writes no format {fmt!r}")

    def needs_teacher_dir(self) -> str | None:
        """Why the pretrained model as ``load`` gives it cannot be a distillation teacher (e.g. its output layer
        is built fresh for each run, randomly initialised), so that a recipe that distils or trains on
        unlabelled audio must name a trained ``distillation.teacher``; None (the default): it can. Checked
        by ``parpkit validate`` and before a run loads anything; the engine names the recipe key."""
        return None

    def check_teacher(self, source: str, *, hidden_states: bool = False) -> None:
        """Cheap checks (configs only, no weights) that the model at ``source`` (a directory or hub id) can
        teach this backbone's model: it must take exactly the student's batches and give outputs over the
        same vocabulary (and, with ``hidden_states``, hidden states of the same shapes). Raise ParpkitError
        saying what differs; the engine names ``distillation.teacher``. Called by ``parpkit validate`` and
        before a run loads anything. By default nothing is checked here (``load_teacher`` still compares
        the output vocabulary)."""

    def load_teacher(self, source: str, student: torch.nn.Module) -> torch.nn.Module:
        """The distillation teacher at ``source``, shaped by this backbone's options exactly as ``load``
        shapes ``student`` (input window, prompt …), so that it takes the student's batches. Called after
        ``load``; raise ParpkitError saying what differs. The engine freezes it and moves it to the
        training device and precision. By default: ``student``'s class loaded from ``source``, refused when
        its output layer has another shape."""
        path = Path(source).expanduser()
        try:
            teacher = type(student).from_pretrained(path if path.exists() else source)
        except Exception as exc:  # OSError, safetensors or shape errors all mean: not a usable teacher here
            text = str(exc).strip()
            raise ParpkitError(f"cannot load {source} as a {type(student).__name__}: {type(exc).__name__}"
                               + (f": {text.splitlines()[0]}" if text else "")) from None
        ours, theirs = student.get_output_embeddings(), teacher.get_output_embeddings()
        if ours is not None and theirs is not None and ours.weight.shape != theirs.weight.shape:
            raise ParpkitError(f"{source} has another vocabulary than the model it teaches (output layer "
                               f"{tuple(theirs.weight.shape)}, the student's {tuple(ours.weight.shape)})")
        return teacher

    @staticmethod
    def check_config_keys(config_class: type, keys: Iterable[str]) -> None:
        """Refuse keys a transformers config class does not know: it would keep them as attributes and
        build the default model, silently (``encoder_layer: 3`` leaves a 1-layer model)."""
        import difflib

        known = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
        unknown = [k for k in keys if k not in known]
        if unknown:
            hints = [f"{k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, known, 1)) else "")
                     for k in unknown]
            raise ParpkitError(f"config: {config_class.__name__} has no key {', '.join(hints)}")


# ------------------------------------------------------------------------------------------ criteria

class Criterion(_Plugin, ABC):
    """What every kind of criterion shares: they may watch training and keep state. The engine passes
    the recipe's ``seed`` as a keyword: ``MyCriterion(options, seed=recipe.seed)`` (criteria that draw random
    numbers use it; others ignore it; an ``__init__`` of one's own takes ``**kw`` and passes it to ``super()``).

    ``needs`` declares what a criterion must see besides the weights:

    - ``None``: nothing (magnitude, random).
    - ``"gradients"``: ``observe`` is called before every optimizer update with the pool's live
      parameters, gradients ready (summed over accumulation steps, before masking and clipping, unscaled
      under fp16; an update the fp16 loss scaler skips for non-finite gradients is not observed),
      weights not yet updated. Before the first mask there has been no update: the engine feeds
      ``calibration_batches`` training batches forward and backward (no update) and calls
      ``observe(0, params)`` after each.
    - ``"activations"``: ``calibrate(context)`` is called before every prune (the first mask and each
      re-prune) with the live model; it reads layer inputs over the recipe's calibration set
      (``pruning.calibration``) through ``context.capture_inputs`` (one forward pass) or
      ``context.sequential`` (block by block, each block fed the outputs of the blocks before it as they
      will be pruned): forward only, padding left out, hooks scoped by the engine. ``context.plan`` says
      what the coming prune will do (its sparsity, each tensor's count, an N:M pattern).

    Scores are computed under ``torch.no_grad``; higher means more worth keeping. Scope is the engine's
    business; ``scopes`` lists those a criterion can be ranked in (checked before anything loads), and
    ``supports_pattern`` whether its masks can follow an N:M pattern (``pruning.pattern``).
    """

    #: what the criterion must see besides the weights: None, "gradients" or "activations"
    needs: ClassVar[str | None] = None
    #: the scopes it can be ranked in
    scopes: ClassVar[tuple[str, ...]] = ("global", "per_tensor", "per_row")
    #: whether its masks can keep N of every M consecutive weights of a row (``pruning.pattern``)
    supports_pattern: ClassVar[bool] = False
    #: training batches to observe (gradients) before the first mask
    calibration_batches: int = 0

    def check(self, context: RunContext) -> None:
        """Preflight, before any data or weights load: ``context.model`` is the skeleton (meta tensors,
        module types and shapes). Raise ParpkitError or ValueError; the engine adds the recipe key."""

    def calibrate(self, context: RunContext) -> None:
        """``needs == "activations"``: read what the coming scores need (``context.capture_inputs``,
        ``context.sequential``)."""

    def allocate(self, context: RunContext, sparsity: float) -> Mapping[str, float] | None:
        """Sparsities per pool tensor for the coming prune at ``sparsity`` (scopes per_tensor and per_row), for
        criteria that spread it unevenly over the layers (OWL); None (the default): the same in every
        tensor. The engine turns them into exact counts whose total is exactly the pool's share at
        ``sparsity`` (in proportion to sparsity × size, largest remainders first)."""
        return None

    def observe(self, step: int, params: Mapping[str, torch.nn.Parameter]) -> None:
        """Gradients of update ``step`` are in ``params[name].grad`` (``step`` 0: calibration)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class PruningCriterion(Criterion):
    """Scores single weights; the engine selects the losers (in any scope, and in an N:M pattern)."""

    supports_pattern: ClassVar[bool] = True

    @abstractmethod
    def scores(self, name: str, param: torch.nn.Parameter) -> torch.Tensor:
        """Scores with the shape of ``param`` (the live parameter; use ``param.detach()``)."""


class StructuredCriterion(Criterion):
    """Scores whole units of the groups a backbone declares (FFN neurons, attention heads); masks then
    cover every slice of a unit.

    Scope ``per_tensor`` prunes the same share of every group, so every layer keeps the same width (the
    same number of FFN neurons, the same number of heads): what a config with one width per stack can
    hold, and what ``parpkit export`` writes as a plain transformers model. ``global`` ranks each kind over
    all layers, and layers end with different widths."""

    scopes: ClassVar[tuple[str, ...]] = ("global", "per_tensor")

    @abstractmethod
    def unit_scores(self, group: UnitGroup, params: Mapping[str, torch.nn.Parameter]) -> torch.Tensor:
        """One score per unit of ``group``."""

    def prunes(self, group: UnitGroup) -> bool:
        """Whether this criterion prunes ``group`` at all (e.g. only ``kind == "ffn"``); the engine leaves the
        other groups whole. All of them by default."""
        return True


class ReconstructingCriterion(Criterion):
    """Chooses its masks itself and may change the weights it keeps: one-shot, layer-wise methods that
    reconstruct each layer's output from its inputs (SparseGPT, OBS/OBC-style). Used wherever a criterion
    is (the first mask of every schedule, PARP's re-prunes); the engine applies the masks it returns.

    ``counts`` gives how many weights each pool tensor must lose, exactly; with scope ``per_row`` they are
    spread over the rows (output neurons) as evenly as can be, the first ``counts[name] % rows`` rows one
    more (``parpkit.row_counts``; a 1-D tensor is one row). With a pattern (``context.plan.pattern``, only
    for criteria that set ``supports_pattern``) every M consecutive weights of a row lose M - N. The engine
    checks the returned masks against ``context.plan``.
    """

    needs: ClassVar[str | None] = "activations"
    scopes: ClassVar[tuple[str, ...]] = ("per_tensor", "per_row")

    @abstractmethod
    def reconstruct(self, context: RunContext, counts: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Keep-masks (bool, True = kept) for every pool tensor; update kept weights in place (no_grad)."""


# ------------------------------------------------------------------------------------------ schedules

@runtime_checkable
class Pruner(Protocol):
    """What a schedule may ask of the engine's pool of prunable weights.

    ``masks`` maps pool parameter names to keep-masks (bool, ``True`` = kept); ``None`` before the first
    prune. ``optimizer`` is the current phase's optimizer (``None`` outside fine-tuning).
    """

    params: Mapping[str, torch.nn.Parameter]
    masks: Mapping[str, torch.Tensor] | None
    sparsity: float
    prune_count: int
    optimizer: torch.optim.Optimizer | None

    def prune(self, sparsity: float) -> None:
        """Rank the whole pool now with the criterion, at ``sparsity``, and zero the losers."""

    def initial_mask(self, sparsity: float) -> None:
        """The first mask: from the criterion, or the donor mask a recipe's ``mask_from`` names."""

    def apply(self) -> None:
        """Zero the pruned weights in place."""

    def zero_pruned_grads(self) -> None:
        """Zero the gradients of pruned weights."""

    def snapshot(self, name: str) -> None:
        """Keep a copy of every model weight to rewind to (``"pretrained"`` always exists)."""

    def rewind(self, name: str) -> None:
        """Weights back to a snapshot, then the current masks applied."""

    def reset_optimizer_state(self, where: Mapping[str, torch.Tensor]) -> int:
        """Zero the optimizer's per-weight state (e.g. Adam's moments) where ``where[name]`` is True;
        returns how many weights were reset."""

    def regrown_masks(self) -> dict[str, torch.Tensor] | None:
        """Per pool tensor, True where the current masks keep a weight the masks before them pruned
        (None before a second mask was set, and once the engine has logged the prune: read it in the hook
        that pruned, right after ``prune``)."""


@dataclass(frozen=True)
class Phase:
    """One fine-tuning run inside a schedule (OMP and IMP have several, with rewinds between them).

    ``stage``: evaluate after the phase under this name (before ``on_phase_end``), e.g. IMP's rounds.
    """

    name: str
    steps: int
    stage: str | None = None


class Schedule(_Plugin, ABC):
    """Decides when masks are computed and at what sparsity, and whether pruned weights may regrow.

    The engine calls these at fixed points of the run. ``step`` counts optimizer updates since the run
    began, over all phases. Each phase is a fresh fine-tuning run (new optimizer and LR schedule).
    Around one update the order is: gradients ready → ``on_gradients`` → clipping → ``on_pre_optimizer_step``
    → the update → ``on_optimizer_step``.

    The engine constructs it as ``MySchedule(options, target=recipe.pruning.sparsity)``: ``self.target`` is the
    sparsity the model must be at when it is judged and saved (the engine refuses a model that is not). An
    ``__init__`` of one's own takes ``**kw`` and passes it to ``super()``.
    """

    #: whether a recipe's ``mask_from`` can seed this schedule's first mask
    accepts_mask_from: ClassVar[bool] = True
    #: whether every mask it makes is at ``target`` (fixed, parp, omp); False for a schedule that prunes at
    #: lower sparsities on the way (gmp, imp, parp_progressive). An N:M pattern prunes exactly 1 - N/M of every
    #: row, so ``parpkit validate`` refuses a pattern with a schedule that says False (and the pruner refuses
    #: any other sparsity when it comes)
    prunes_at_target_only: ClassVar[bool] = True

    def __init__(self, options: PluginOptions | None = None, *, target: float, **kw: Any):
        super().__init__(options, **kw)
        self.target = target

    def check(self, context: RunContext) -> None:
        """Preflight, before any data or weights load: ``context.training`` and ``context.phases`` hold the
        recipe's settings. Raise ParpkitError or ValueError; the engine adds the recipe key."""

    def phases(self, max_steps: int) -> list[Phase]:
        """The fine-tuning runs; by default one of ``training.max_steps`` updates."""
        return [Phase("train", max_steps)]

    def phase_key(self, index: int, phase: Phase) -> dict[str, Any] | None:
        """What, beyond the recipe's model, data, pool, criterion and training settings, determines how
        phase ``index`` trains. Runs whose schedules give equal keys train it identically, so a sweep
        trains it once (OMP's dense fine-tune, IMP's early rounds). A schedule giving a key promises the
        phase leaves no schedule state of its own behind. None (the default): never shared."""
        return None

    @abstractmethod
    def on_start(self, pruner: Pruner) -> None:
        """Before the first update: compute the initial mask from the pretrained weights."""

    def on_phase_start(self, index: int, pruner: Pruner) -> None:
        """Before phase ``index`` trains."""

    def on_phase_end(self, index: int, pruner: Pruner) -> None:
        """After phase ``index`` trained (and was evaluated if it names a stage): prune, rewind …"""

    def on_gradients(self, step: int, pruner: Pruner) -> None:
        """Gradients of the coming update are ready, before clipping: a fixed mask zeroes pruned
        positions here, so the clip norm counts only weights that exist. ``step`` counts updates done."""

    def on_pre_optimizer_step(self, step: int, pruner: Pruner) -> None:
        """Gradients are clipped, weights not yet updated; ``step`` counts updates done."""

    def on_optimizer_step(self, step: int, pruner: Pruner) -> None:
        """Weights were just updated; ``step`` already counts this update."""

    def before_evaluate(self, pruner: Pruner) -> None:
        """Before the final evaluation and save (and a phase's own scored stage): leave the model exactly as it
        should be judged. Also at every learning-curve point (``evaluation.every_steps``), after which the engine
        puts the weights and masks back but not the schedule's own state: make it repeatable, and keep counters
        out of it. Not before the ``after_prune`` row, which scores the first mask as ``on_start`` set it."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass
