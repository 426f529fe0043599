"""The run context: what a plugin may read of a run, and the one way it may watch layer inputs.

A ``RunContext`` is handed to criteria and schedules twice. At resolve time (``check``, by ``parpkit
validate`` and before ``parpkit run`` loads anything) it holds the recipe's training settings, the phases,
and the model's *skeleton* (meta tensors: names, shapes and module types, no values). At a calibration
event (``Criterion.calibrate`` before a prune, ``ReconstructingCriterion.reconstruct``) it holds the live
model and can feed calibration batches through it.

``capture_inputs`` is the calibration contract: forward only, no gradients, the model in eval mode; the
engine attaches forward pre-hooks to the modules asked for, hands each module's input to the observer with
padded frames and tokens left out, and removes every hook when it returns (or raises). A module that saw
no real position is an error, not an all-zero statistic.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
import torch

from parpkit.errors import ParpkitError
from parpkit.interfaces import Phase, Utterance


@dataclass(frozen=True)
class TrainingSettings:
    """The recipe's training settings that plugins may plan by (read-only)."""

    max_steps: int
    batch_size: int
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    precision: str = "fp32"


@dataclass(frozen=True)
class CalibrationBatch:
    """Collated model inputs (``model(**inputs)`` works; labels included) and the utterances they came from."""

    inputs: Mapping[str, torch.Tensor]
    utterances: tuple[Utterance, ...] = ()


#: (module name, batch, positions of its input) -> bool (batch, positions) mask of real positions, or None: all real
PositionMask = Callable[[str, CalibrationBatch, int], "torch.Tensor | None"]


class _Stop(Exception):
    """Raised by a hook to end a forward pass early, once every module asked for has seen its input."""


class RunContext:
    """What plugins may read of a run. Nothing here changes the run: masks change only through the ``Pruner``.

    - ``file``: the recipe file (for error messages); ``training``: ``TrainingSettings``; ``phases``;
      ``sparsity`` (the target), ``scope``, ``seed``.
    - ``model``: the skeleton at check time (``loaded`` False), the live model at calibration.
    - ``pool``: pool parameter name -> parameter, in pool order; ``modules``: name -> module of every module
      owning a pool parameter; ``module_of(param)``: (module name, attribute) of a pool parameter.
    """

    def __init__(self, model: torch.nn.Module, pool: Sequence[str], *, training: TrainingSettings,
                 phases: Sequence[Phase] = (), sparsity: float = 0.0, scope: str = "global", seed: int = 0,
                 file: str = "<recipe>", loaded: bool = True,
                 batches: Callable[[int], Sequence[CalibrationBatch]] | Sequence[CalibrationBatch] = (),
                 positions: PositionMask | None = None):
        params = dict(model.named_parameters())
        missing = [n for n in pool if n not in params]
        if missing:
            raise ParpkitError(f"the pool names parameters the model lacks: {missing[:3]}")
        self.model = model
        self.pool: Mapping[str, torch.nn.Parameter] = MappingProxyType(OrderedDict((n, params[n]) for n in pool))
        self.training = training
        self.phases: tuple[Phase, ...] = tuple(phases)
        self.sparsity, self.scope, self.seed, self.file, self.loaded = sparsity, scope, seed, file, loaded
        self._batches = batches
        self._positions = positions
        self._owner: dict[str, tuple[str, str]] = {n: (n.rpartition(".")[0], n.rpartition(".")[2]) for n in pool}
        named = dict(model.named_modules())
        self.modules: Mapping[str, torch.nn.Module] = MappingProxyType(
            OrderedDict((m, named[m]) for m in dict.fromkeys(owner for owner, _ in self._owner.values())))

    @property
    def max_steps(self) -> int:
        return self.training.max_steps

    def module_of(self, param: str) -> tuple[str, str]:
        """(name of the module owning pool parameter ``param``, its attribute: ``weight``, ``bias`` …)."""
        return self._owner[param]

    def calibration_batches(self, n: int) -> list[CalibrationBatch]:
        """``n`` calibration batches: training batches drawn with the recipe's seed (the same ones on every
        call, every rank and every resumed attempt)."""
        if not self.loaded:
            raise ParpkitError("calibration batches exist only once the model is loaded (not at check time)")
        got = list(self._batches(n)) if callable(self._batches) else list(self._batches)[:n]
        if not got:
            raise ParpkitError("calibration needs at least one batch; set the criterion's calibration_batches above 0")
        return got

    @torch.no_grad()
    def capture_inputs(self, modules: Iterable[str], observer: Callable[[str, torch.Tensor], None], *, batches: int,
                       stop_after: str | None = None) -> dict[str, int]:
        """Feed ``batches`` calibration batches forward and call ``observer(module, x)`` with each named
        module's input as float32 rows (real positions, features): padded frames and tokens are left out.

        ``stop_after``: a module whose forward ends the pass (nothing after it is needed: layer-by-layer
        methods save the rest of the model). Returns the rows each module saw; none is an error."""
        names = list(dict.fromkeys(modules))
        named = dict(self.model.named_modules())
        unknown = [m for m in names + ([stop_after] if stop_after else []) if m not in named]
        if unknown:
            raise ParpkitError(f"capture_inputs: the model has no module {unknown[0]!r}")
        rows = dict.fromkeys(names, 0)
        current: list[CalibrationBatch] = []

        def pre_hook(name: str):
            def hook(module, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                if x.dim() > 2:
                    x2 = x.reshape(x.shape[0], -1, x.shape[-1])
                    keep = self._positions(name, current[0], x2.shape[1]) if self._positions else None
                    x2 = x2[keep.to(x2.device)] if keep is not None else x2.reshape(-1, x2.shape[-1])
                else:
                    x2 = x
                if x2.shape[0]:
                    rows[name] += x2.shape[0]
                    observer(name, x2.detach().float())
            return hook

        def stop_hook(module, args, output):
            raise _Stop

        handles = [named[m].register_forward_pre_hook(pre_hook(m), with_kwargs=True) for m in names]
        if stop_after:
            handles.append(named[stop_after].register_forward_hook(stop_hook))
        was_training = self.model.training
        device = next(self.model.parameters()).device
        self.model.eval()
        try:
            for batch in self.calibration_batches(batches):
                current[:] = [batch]
                try:
                    self.model(**{k: v.to(device) for k, v in batch.inputs.items()})
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        empty = [m for m, n in rows.items() if n == 0]
        if empty:
            raise ParpkitError(f"calibration: module {empty[0]!r} saw no real (unpadded) input in {batches} batches; "
                               "is it used by the forward pass?")
        return rows


def layer_blocks(context: RunContext, modules: Iterable[str]) -> list[tuple[str, list[str]]]:
    """Modules grouped by the repeated block they sit in (the name up to its last numeric part, e.g.
    ``model.encoder.layers.3``), in the order the model registers its modules (encoder before decoder, in
    layer order): the order a layer-by-layer method calibrates them in. A module in no numbered block is its
    own block."""
    wanted = set(modules)
    order = [n for n, _ in context.model.named_modules() if n in wanted]
    grouped: OrderedDict[str, list[str]] = OrderedDict()
    for name in order:
        parts = name.split(".")
        numeric = [i for i, p in enumerate(parts) if p.isdigit()]
        block = ".".join(parts[:numeric[-1] + 1]) if numeric else name
        grouped.setdefault(block, []).append(name)
    return list(grouped.items())

