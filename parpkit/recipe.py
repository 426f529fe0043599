"""Recipes: YAML files (safe loading only) validated against a schema before any model loads.

A recipe names one plugin per interface plus training settings. ``vars:`` defines values that
``${name}`` references use anywhere in the recipe; ``--set key.path=value`` overrides any key.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from parpkit.errors import RecipeError
from parpkit.interfaces import StrictModel


#: a recipe section: StrictModel's rules (no unknown keys, no booleans or ``.inf``/``.nan`` as numbers: a
#: learning rate of ``.inf`` would train to NaN)
_Strict = StrictModel


#: ``training.max_steps`` above this is a typo (an extra digit or two), not a run: refused before compute
MAX_STEPS = 10_000_000

#: the expanded recipe (YAML aliases followed) may hold at most this many values: a few hundred bytes of
#: nested aliases ("billion laughs") must fail at once, not after minutes and gigabytes
MAX_VALUES = 100_000

#: one value (a string after ``${var}`` substitution) may hold at most this many characters
MAX_TEXT = 100_000


class RecipeLoader(yaml.SafeLoader):
    """Safe YAML, reading 1e-3 and 5e-1 as numbers (YAML 1.1 wants 1.0e-3; people write 1e-3), and refusing a
    key given twice in one mapping (YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # << merges: explicit keys override them by design
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base constructor names it
                    continue
                if first is not key_node:  # also on one line: {interval: 3, interval: 1}
                    mark = first.start_mark
                    where = f"column {mark.column + 1}" if mark.line == key_node.start_mark.line else f"line {mark.line + 1}"
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice in one mapping (first on {where}); "
                        "YAML would keep only the last", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class RecipeDumper(yaml.SafeDumper):
    """Writes values as RecipeLoader reads them back: a string such as ``'1e-3'`` stays quoted (SafeDumper
    would write it bare, and the loader would read a number)."""


for _cls in (RecipeLoader, RecipeDumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                       |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                       |\.[0-9_]+(?:[eE][-+][0-9]+)?
                       |[-+]?\.(?:inf|Inf|INF)
                       |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))


def dump_value(value: Any) -> str:
    """One value as one line of YAML that ``parse_override`` reads back equal (``--set key=VALUE``)."""
    return yaml.dump(value, Dumper=RecipeDumper, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


def count_values(node: Any, limit: int = MAX_VALUES) -> int:
    """How many values ``node`` holds with every alias expanded, counted in linear time (shared nodes
    are counted once per reference without walking them again); stops early past ``limit``."""
    memo: dict[int, int] = {}

    def size(x: Any) -> int:
        if not isinstance(x, (dict, list)):
            return 1
        if id(x) in memo:
            return memo[id(x)]
        children = x.values() if isinstance(x, dict) else x
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        memo[id(x)] = total
        return total

    return size(node)


class PluginRef(_Strict):
    #: the plugin's name, as ``parpkit plugins`` lists it
    name: str
    #: the plugin's own options; unknown ones are errors
    options: dict[str, Any] = Field(default_factory=dict)


class ConcatenateSection(_Strict):
    """Training passages joined from several utterances, so that a model fine-tuned on single sentences still
    transcribes a recording as long as its window (whisper: 30 s). Draws depend on the seed, the utterance and
    the epoch only; scored splits and calibration are left as they are."""

    #: the share of training utterances served joined to others (each drawn anew every epoch; at most: an
    #: utterance as long as its drawn goal, or with nothing short enough to join, is served alone)
    p: float = Field(default=0.5, gt=0, le=1)
    #: the longest passage, in seconds: the model's training window must hold it (whisper at 30 s: set
    #: backbone.options.encoder_window_s to null or 30)
    max_seconds: float = Field(default=28.0, gt=0, le=600)
    #: the silence between joined utterances, in seconds: drawn from this range
    gap_seconds: tuple[float, float] = (0.2, 0.8)
    #: join utterances of the same speaker only (where the dataset names speakers), as a recording would
    same_speaker: bool = True

    @model_validator(mode="after")
    def _check(self):
        low, high = self.gap_seconds
        if not 0 <= low <= high:
            raise ValueError(f"gap_seconds {list(self.gap_seconds)}: expected [low, high] with 0 <= low <= high")
        if low >= self.max_seconds:  # a passage joins utterances and a gap: every gap drawn would leave no room
            raise ValueError(f"gap_seconds {list(self.gap_seconds)}: every gap is at least max_seconds "
                             f"({self.max_seconds:g}), so no passage would ever be joined")
        return self


class DatasetRef(PluginRef):
    #: the split fine-tuning trains on (and calibration draws its batches from)
    train_split: str = "train"
    #: the split every stage is scored on, or several (the first is the headline; all are reported)
    eval_split: str | list[str] = "test"
    #: training-audio augmentation: audiomentations transforms (``pip install 'parpkit[augment]'``) applied in
    #: order to each fine-tuning utterance as it is served, each ``{name: <class>, <its arguments>, p: <chance>}``,
    #: e.g. ``[{name: AddGaussianSNR, min_snr_db: 10, max_snr_db: 30, p: 0.5}, {name: RoomSimulator, p: 0.3}]``.
    #: Draws depend on the seed, the utterance and the epoch only (a resumed run hears the same); scored splits,
    #: calibration and pseudo-labelling use the audio as it is. Empty: none
    augment: list[dict[str, Any]] = Field(default_factory=list, max_length=64)
    #: training passages joined from several utterances of a speaker (``{p: 0.5, max_seconds: 28}``), so that
    #: the model keeps transcribing recordings as long as its window; joined before augmentation. Null: none
    concatenate: ConcatenateSection | None = None

    @field_validator("eval_split")
    @classmethod
    def _some_split(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError(f"expected a split name or a list of distinct split names, got {v!r}")
        return v

    @property
    def eval_splits(self) -> list[str]:
        return [self.eval_split] if isinstance(self.eval_split, str) else list(self.eval_split)


class CalibrationSection(_Strict):
    """The calibration set: the utterances activation-aware criteria (wanda, sparsegpt) feed forward, no
    gradients, before each mask, to measure every pruned layer's inputs. Independent of the training batch."""

    #: how many utterances, drawn with the recipe's seed (a split with fewer gives all it has, with a
    #: warning); the reference SparseGPT and Wanda calibrate on 128 sequences. A layer that sees fewer real
    #: positions than ten times its input width is named in a warning: its statistics are thin
    utterances: int = Field(default=128, gt=0)
    #: the split they are drawn from; null: dataset.train_split (a scored split here is a warning: the
    #: masks would have seen the test audio)
    split: str | None = None
    #: utterances per forward pass: memory and speed, not results, for backbones that pad every input to
    #: one window (whisper); a CTC model pads each batch to its longest utterance
    batch_size: int = Field(default=8, gt=0)
    #: how the model is walked, always block by block from each block's kept inputs (never from the first
    #: layer again). block: as the reference SparseGPT and Wanda, every layer of a block is measured on the
    #: block's inputs before any of them is pruned, then the block runs again, pruned, for the next block's
    #: inputs (two passes per block). layer: every layer is measured on the outputs of the layers before it,
    #: already pruned (GPTQ's "true sequential", down to each linear), so each block runs once, all its
    #: batches in lockstep holding their activations at once (memory: a block's activations for the whole
    #: set)
    sequential: Literal["block", "layer"] = "block"


class PruningSection(_Strict):
    #: which weights or units matter (``magnitude``, ``wanda``, ``sparsegpt``, ``structured`` …)
    criterion: PluginRef
    #: when and how much to prune, and whether pruned weights may regrow (``parp``, ``fixed``, ``omp`` …)
    schedule: PluginRef
    #: the target: exactly round(sparsity × N) of the pool's N weights are pruned; in [0, 1)
    sparsity: float
    #: global: one ranking over the pool; per_tensor: each tensor loses its share; per_row: each output row
    #: (neuron) of each tensor loses its share (a bias is one row), as Wanda and SparseGPT compare
    scope: Literal["global", "per_tensor", "per_row"] = "global"
    #: regexes (full match on parameter names) replacing the backbone's default pool
    include: list[str] | None = None
    #: regexes removed from the pool after ``include``
    exclude: list[str] = Field(default_factory=list)
    #: start from the mask another run saved (its run directory or masks.safetensors)
    mask_from: str | None = None
    #: the calibration set of activation-aware criteria, e.g. ``calibration: {utterances: 128, split: train}``
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    #: semi-structured sparsity: "N:M" (quoted) keeps exactly N of every M consecutive weights of each row
    #: ("2:4", "4:8"), with scope per_row and sparsity 1 - N/M, for criteria that support it (magnitude,
    #: wanda, sparsegpt) and schedules that prune at one sparsity; null: unstructured
    pattern: str | None = None

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern_form(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            raise ValueError(f"expected 'N:M' in quotes, got the number {v} (unquoted, YAML reads 2:4 as the number "
                             "124, in base 60): write pattern: '2:4'")
        if v is not None:
            m = re.fullmatch(r"(\d+):(\d+)", str(v))
            if not m or not 0 < int(m.group(1)) < int(m.group(2)):
                raise ValueError(f"expected 'N:M' with 0 < N < M (such as '2:4' or '4:8'), got {v!r}")
        return v

    @model_validator(mode="after")
    def _pattern_fits(self):
        if self.pattern is not None:
            n, m = (int(x) for x in self.pattern.split(":"))
            if self.scope != "per_row":
                raise ValueError(f"pattern {self.pattern} chooses within the rows of each tensor: set scope: per_row "
                                 f"(not {self.scope})")
            if abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(f"pattern {self.pattern} prunes {m - n} of every {m} weights: set sparsity: "
                                 f"{1 - n / m:g} (not {self.sparsity:g})")
        return self

    @field_validator("sparsity", mode="before")
    @classmethod
    def _sparsity_range(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"expected a number in [0, 1), got {v!r}")
        return v

    @field_validator("include", "exclude")
    @classmethod
    def _regexes_compile(cls, patterns: list[str] | None) -> list[str] | None:
        for p in patterns or []:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"{p!r} is not a regular expression: {exc}") from None
        return patterns


class TrainingSection(_Strict):
    #: optimizer updates of fine-tuning; 0: one-shot (prune, then judge, with no training at all)
    max_steps: int = Field(ge=0)
    #: utterances per optimizer step on each device (under torchrun the global batch is this × devices)
    batch_size: int = Field(default=8, gt=0)
    #: batches whose gradients are summed before each update
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    #: the peak learning rate (AdamW)
    learning_rate: float = Field(default=5e-5, gt=0)
    #: any transformers scheduler name, or tri_stage (warm-up, hold, exponential decay: the reference's)
    lr_scheduler: str = "linear"
    #: the schedule's own arguments (tri_stage: phase_ratio, init_lr_scale, final_lr_scale)
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict)
    #: linear warm-up steps of the learning rate; refused with tri_stage (its warm-up is phase_ratio's first share)
    warmup_steps: int = Field(default=0, ge=0)
    #: AdamW's decoupled weight decay
    weight_decay: float = Field(default=0.0, ge=0)
    #: Adam's β₁ (the reference PARP code's 0.9)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    #: Adam's β₂ (the reference PARP code's 0.98)
    adam_beta2: float = Field(default=0.98, ge=0, lt=1)
    #: the reference's frozen-transformer start (fairseq's ``freeze_finetune_updates``): for the first this many
    #: optimizer updates of each fine-tuning phase only the model's output layer trains (``Backbone.output_layer``:
    #: wav2vec2's CTC head ``lm_head``; whisper's ``proj_out``, which whisper ties to the decoder's token
    #: embedding, so that embedding trains too). "The transformer" is every other weight: for
    #: whisper the convolutional front end, the encoder and the decoder (their blocks, the whole default pruning
    #: pool, layer norms and positional embeddings); it gets no gradient and no update, and its optimizer state
    #: starts when it thaws. The frozen updates count toward max_steps, the LR schedule and a schedule's re-prune
    #: intervals; a rewinding schedule's phases (OMP, IMP) each start frozen, as each is a fine-tune of its own.
    #: Whisper has no new head to warm up (the reference freezes so that wav2vec2's random CTC head settles
    #: first), so there it only delays fine-tuning. 0: none (the default)
    freeze_transformer_steps: int = Field(default=0, ge=0)
    #: gradient clipping (0: none); fixed masks zero pruned gradients before it
    max_grad_norm: float = Field(default=1.0, ge=0)
    #: fp32; bf16 (autocast, on a CPU too: there many times slower than fp32 unless the CPU computes in bf16
    #: natively); fp16 (needs CUDA: its loss scaler); auto: bf16 on a CUDA device that supports it, else fp32
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    #: write the training loss, learning rate and gradient norm to log.jsonl every this many steps
    logging_steps: int = Field(default=10, gt=0)
    #: worker processes that collate batches (persistent); 0: in the training process
    dataloader_workers: int = Field(default=0, ge=0)
    #: batches of utterances of similar length (less padding); null: yes for backbones that pad each
    #: batch to its longest input (CTC), no for those with a fixed input length (whisper), and no with
    #: dataset.concatenate (the lengths it groups by are the utterances', not the joined passages')
    group_by_length: bool | None = None
    #: checkpoint (weights, optimizer, masks, schedule state) every this many steps; null: none
    save_steps: int | None = Field(default=None, gt=0)
    #: complete checkpoints kept per phase
    keep_checkpoints: int = Field(default=2, gt=0)
    #: keep checkpoints/ once the run is complete (by default it is deleted then: nothing resumes from it,
    #: and a sweep of multi-phase points would otherwise keep every phase end's weights and optimizer)
    keep_checkpoints_when_done: bool = False
    #: the Trainer's reporting integrations: "none", "tensorboard", "wandb", "mlflow", "all" or a list
    report_to: str | list[str] = "none"

    @field_validator("max_steps")
    @classmethod
    def _steps_bounded(cls, v: int) -> int:
        if v > MAX_STEPS:
            raise ValueError(f"{v:,} optimizer steps is beyond parpkit's cap of {MAX_STEPS:,} (a typo?); a fine-tuning "
                             "run is thousands to hundreds of thousands of steps")
        return v

    @field_validator("report_to")
    @classmethod
    def _known_integrations(cls, v: str | list[str]) -> str | list[str]:
        check_report_to(v)
        return v

    @model_validator(mode="after")
    def _schedule_builds(self):
        from parpkit.lr import check_scheduler

        check_scheduler(self.lr_scheduler, self.lr_scheduler_kwargs)
        if self.freeze_transformer_steps and self.freeze_transformer_steps >= self.max_steps:
            raise ValueError(f"freeze_transformer_steps {self.freeze_transformer_steps} is not below max_steps "
                             f"{self.max_steps}: only the output layer would ever train")
        if self.lr_scheduler == "tri_stage" and self.warmup_steps:
            raise ValueError("warmup_steps does not apply to lr_scheduler tri_stage, whose warm-up is the first share "
                             "of lr_scheduler_kwargs.phase_ratio (it would be ignored); set warmup_steps: 0 and give "
                             "the warm-up share in phase_ratio")
        return self


def check_report_to(report_to: str | list[str]) -> None:
    """Every name is one of transformers' reporting integrations, installed: the Trainer would refuse it
    only when the first phase starts, after the dense and after-prune evaluations."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if not names or set(names) <= {"none", "all"}:
        return
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    for name in names:
        if name in ("none", "all"):
            raise ValueError(f"{name!r} stands alone; give it as the only value, not in a list with {names!r}")
        if name not in INTEGRATION_TO_CALLBACK:
            raise ValueError(f"unknown reporting integration {name!r}; transformers knows none, all, "
                             f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")
        if name not in get_available_reporting_integrations():
            raise ValueError(f"the reporting integration {name!r} is not installed (pip install {name.replace('_', '-')}) "
                             "or use report_to: none")


#: training settings that change no number: where and how often a run writes checkpoints and logs, and how
#: many processes collate its batches. A run directory whose recipe differs from the new one only in these
#: is the same run (it resumes, or counts as finished), and runs that differ only in them are one configuration
BOOKKEEPING = frozenset({"save_steps", "keep_checkpoints", "keep_checkpoints_when_done", "logging_steps", "report_to",
                         "dataloader_workers"})


class EvaluationSection(_Strict):
    #: utterances decoded at once
    batch_size: int = Field(default=16, gt=0)
    #: text normalisation before scoring: basic (lower case, no punctuation) or whisper (also numbers
    #: written as words and as digits alike, as Whisper's English normaliser does)
    normalizer: Literal["basic", "whisper"] = "basic"
    #: score a learning-curve point every this many optimizer steps (the model as it would be judged;
    #: training goes on untouched); null: none
    every_steps: int | None = Field(default=None, gt=0)
    #: the split those points are scored on; null: the first eval split
    validation_split: str | None = None
    #: the final model is the best learning-curve point of the last phase (by WER, or PER), as the
    #: reference scripts keep checkpoint_best; needs every_steps
    keep_best: bool = False

    @model_validator(mode="after")
    def _best_needs_points(self):
        if self.keep_best and not self.every_steps:
            raise ValueError("keep_best needs every_steps (the points it chooses from)")
        return self
    #: evaluate the dense (pretrained) model before pruning, as the zero-shot reference
    dense: bool = True
    #: evaluate the model right after the first prune, before any fine-tuning
    after_prune: bool = True


class DistillationSection(_Strict):
    """Fine-tune toward the dense teacher's outputs too, so the sparse model keeps what it knew."""

    #: share of the loss that is the divergence to the teacher: (1 - weight) * task + weight * T^2 * KL
    weight: float = Field(default=0.5, ge=0, le=1)
    #: softmax temperature of both distributions
    temperature: float = Field(default=2.0, gt=0)
    #: null: the pretrained model before the first prune; or a directory (or hub id) holding a model of
    #: the same architecture, vocabulary and input features (e.g. a dense fine-tune's run directory
    #: model/), loaded shaped like the student (its encoder window …): see ``Backbone.load_teacher``
    teacher: str | None = None
    #: weight of the mean squared difference of every layer's hidden states, added to the loss (0: none)
    hidden_weight: float = Field(default=0.0, ge=0)


class Recipe(_Strict):
    #: the run's name; its directory defaults to ``runs/<name>``
    name: str
    #: torch, python and numpy seeds take at most 32 bits
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    #: run directory; default ``runs/<name>``
    output_dir: str | None = None
    #: values that ``${name}`` references use anywhere in the recipe (a lone reference keeps its type; vars may
    #: refer to vars; names are letters, digits and _). In ``sweep:``, within a point's values, not as an axis's list
    vars: dict[str, Any] = Field(default_factory=dict)
    #: the model to prune
    backbone: PluginRef
    #: the corpus, and which of its splits train and judge
    dataset: DatasetRef
    #: what is pruned, how much, ranked how, and when
    pruning: PruningSection
    #: fine-tuning, passed to transformers' TrainingArguments
    training: TrainingSection
    #: how and when the model is scored
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    #: distillation from the dense teacher; null: none
    distillation: DistillationSection | None = None
    #: a grid of variations of this recipe for `parpkit sweep` (see parpkit.sweep); `parpkit run` ignores it
    sweep: dict[str, Any] | None = None

    @field_validator("name", "output_dir")
    @classmethod
    def _a_folder_of_its_own(cls, v: str | None, info) -> str | None:
        """An empty name would run into ``runs/`` itself, an empty output_dir into the current folder."""
        if v is not None and v.strip() in ("", ".", ".."):
            what = "the run directory's name (runs/NAME)" if info.field_name == "name" else "a folder for the run"
            raise ValueError(f"expected {what}, got {v!r}")
        if info.field_name == "name" and v is not None and (Path(v).is_absolute() or ".." in Path(v).parts):
            raise ValueError(f"{v!r} would put the run directory outside runs/ (runs/NAME); give a plain name, and "
                             "output_dir (or --output-dir) for a folder elsewhere")
        return v

    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


# ---------------------------------------------------------------------------------------- loading

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``key.path=value``; the value is read as YAML, so numbers and lists keep their types."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set expects key.path=value, got {text!r}")
    try:
        parsed = parse_yaml(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        if value.lstrip()[:1] in ("[", "{", '"', "'"):  # meant as a list, mapping or quoted string
            raise RecipeError(f"--set {text}: the value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
        parsed = value  # plain text (e.g. a path with a colon) stays text
    return key.strip().split("."), parsed


def _set_path(data: dict, path: list[str], value: Any, file: str) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"cannot set a key below a {type(child).__name__}", file=file, key=".".join(path[: i + 1]))
        node = child
    node[path[-1]] = value


def _substitute(node: Any, variables: dict[str, Any], file: str, key: str) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, variables, file, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, variables, file, f"{key}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node
    if "${" in _VAR.sub("", node):  # ${run-id}, ${ n }, ${1x}: kept as text, it would name a folder or model literally
        raise RecipeError(f"{node!r} holds a '${{' that is no variable reference: a reference is ${{name}}, the name of "
                          "letters, digits and _, not starting with a digit", file=file, key=key)
    for name in _VAR.findall(node):
        if name not in variables:
            known = ", ".join(sorted(variables)) or "none defined"
            raise RecipeError(f"unknown variable ${{{name}}} (vars: {known})", file=file, key=key)
    whole = _VAR.fullmatch(node)
    if whole:  # a lone reference keeps the variable's type
        return variables[whole.group(1)]
    text = _VAR.sub(lambda m: str(variables[m.group(1)]), node)
    if len(text) > MAX_TEXT:  # variables that double each other reach gigabytes in 30 levels
        raise RecipeError(f"expands to {len(text):,} characters, more than parpkit's {MAX_TEXT:,} for one value "
                          "(variables that repeat each other?)", file=file, key=key)
    return text


def resolve_variables(variables: dict[str, Any], file: str) -> dict[str, Any]:
    """``vars`` whose values refer to other vars (``${other}``), resolved in any order; a cycle is an error."""
    done: dict[str, Any] = {}
    for name in variables:
        if not isinstance(name, str) or not _VAR.fullmatch(f"${{{name}}}"):
            raise RecipeError(f"{name!r} cannot be referred to: a variable's name is letters, digits and _, not starting "
                              "with a digit", file=file, key=f"vars.{name}")

    def value(name: str, chain: tuple[str, ...]) -> Any:
        if name in done:
            return done[name]
        if name in chain:
            raise RecipeError(f"variables refer to each other in a cycle: {' -> '.join(f'${{{n}}}' for n in (*chain, name))}",
                              file=file, key=f"vars.{chain[0]}")
        raw = variables[name]
        refs = _refs(raw)
        inner = {ref: value(ref, (*chain, name)) for ref in refs if ref in variables}
        done[name] = _substitute(raw, {**variables, **inner}, file, f"vars.{name}")
        return done[name]

    for name in variables:
        value(name, ())
    return done


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return _VAR.findall(node) if isinstance(node, str) else []


def format_validation_error(exc: ValidationError, file: str, prefix: str = "") -> RecipeError:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (misspelled?)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif "input" in err and err["type"] not in ("value_error",):
            msg = f"{msg}, got {err['input']!r}"
        lines.append((loc, msg))
    first_loc, first_msg = lines[0]
    err = RecipeError(first_msg, file=file, key=first_loc)
    if len(lines) > 1:
        err.args = (str(err) + "".join(f"\n{file}: {loc}: {msg}" for loc, msg in lines[1:]),)
    return err


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The recipe file's mapping (YAML, safe loading only)."""
    path = Path(path)
    file = str(path)
    if not path.exists():
        raise RecipeError("no such recipe file", file=file)
    if path.is_dir():
        raise RecipeError("is a directory, expected a YAML recipe file", file=file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read the recipe: {exc}", file=file) from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise RecipeError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", file=file) from None
    if data is None:
        raise RecipeError("the recipe is empty (no keys; see docs/reference/recipe.md)", file=file)
    if not isinstance(data, dict):
        raise RecipeError(f"expected a mapping of recipe keys at the top level, got {type(data).__name__}", file=file)
    if count_values(data) > MAX_VALUES:
        raise RecipeError(f"the recipe expands to more than {MAX_VALUES:,} values once its YAML aliases are followed; "
                          "a recipe is a few hundred values (nested aliases?)", file=file)
    return data


Overrides = Sequence[str] | Mapping[str, Any]


def recipe_from_mapping(data: Mapping[str, Any], overrides: Overrides = (), file: str = "<recipe>") -> tuple[Recipe, dict[str, Any]]:
    """Override, substitute and validate a recipe mapping. Returns the model and the resolved mapping.

    ``overrides``: ``key.path=value`` strings (values read as YAML, as ``--set`` does) or a mapping of
    dotted key paths to values."""
    data = copy.deepcopy(dict(data))
    pairs = ([(k.split("."), v) for k, v in overrides.items()] if isinstance(overrides, Mapping)
             else [parse_override(text) for text in overrides])
    check_variables_used(data, pairs, file)
    for keys, value in pairs:
        _set_path(data, keys, value, file)
    variables = data.get("vars") or {}
    if not isinstance(variables, dict):
        raise RecipeError("expected a mapping of variable names to values", file=file, key="vars")
    variables = resolve_variables(variables, file)
    data = {k: (variables if k == "vars" else _substitute(v, variables, file, k)) for k, v in data.items()}
    if count_values(data) > MAX_VALUES:  # lists of variables that repeat each other: shared here, copied by validation
        raise RecipeError(f"the recipe expands to more than {MAX_VALUES:,} values once its variables are substituted; a "
                          "recipe is a few hundred values (variables that repeat each other?)", file=file, key="vars")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, file) from None
    return recipe, recipe.model_dump(mode="json")


def check_variables_used(data: Mapping[str, Any], pairs: list[tuple[list[str], Any]], file: str) -> None:
    """An override of ``vars.NAME`` where no ``${NAME}`` refers to it (in the recipe, the sweep section included,
    in the other variables or in the overrides) is a misspelt name: refused, as a misspelt key is."""
    used = set(_refs({k: v for k, v in data.items() if k != "vars"}))
    used |= {r for v in (data.get("vars") or {}).values() for r in _refs(v)} if isinstance(data.get("vars"), dict) else set()
    used |= {r for _, value in pairs for r in _refs(value)}
    for keys, _ in pairs:
        if len(keys) == 2 and keys[0] == "vars" and keys[1] not in used:
            names = ", ".join(f"${{{n}}}" for n in sorted(used)) or "none"
            raise RecipeError(f"no ${{{keys[1]}}} in the recipe refers to this variable, so setting it changes nothing "
                              f"(variables referred to: {names})", file=file, key=".".join(keys))


def load_recipe(path: str | Path, overrides: Overrides = ()) -> tuple[Recipe, dict[str, Any]]:
    """Read, override, substitute and validate a recipe file. Returns the model and the resolved mapping."""
    return recipe_from_mapping(read_recipe_file(path), overrides, str(path))
