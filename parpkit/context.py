"""The run context: what a plugin may read of a run, and the one way it may watch layer inputs.

A ``RunContext`` is handed to criteria and schedules twice. At resolve time (``check``, by ``parpkit
validate`` and before ``parpkit run`` loads anything) it holds the recipe's training settings, the phases,
and the model's *skeleton* (meta tensors: names, shapes and module types, no values). At a calibration
event (``Criterion.calibrate`` before a prune, ``ReconstructingCriterion.reconstruct``) it holds the live
model and can feed the calibration set (``pruning.calibration``: utterances drawn with the recipe's seed)
through it.

The calibration contract: forward only, no gradients, the model in eval mode; the engine attaches forward
pre-hooks to the modules asked for, hands each module's input to the observer with padded frames and tokens
left out (``Backbone.position_mask``), and removes every hook when it returns (or raises). A module that saw
no real position is an error, not an all-zero statistic; a linear layer that saw fewer rows than ten times
its input width is a warning (its second-moment matrix is then far from full rank).

Two ways to watch: ``capture_inputs`` runs the model as it is, once over the set; ``sequential`` runs it
block by block as the reference SparseGPT and Wanda do: each block's inputs are computed once and kept,
the block runs over them with its layers watched, the criterion prunes it (``after_block``), and its
outputs, from the pruned weights, are the next block's inputs. Nothing runs from the first layer again.
"""

from __future__ import annotations

import inspect
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from parpkit.errors import ParpkitError
from parpkit.interfaces import Phase, Utterance

if TYPE_CHECKING:
    from parpkit.selection import PrunePlan


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


class _Abort(Exception):
    """Ends a calibration thread whose lockstep another thread has failed."""


#: what a layer must see, in rows (real positions), per column of its input, before a warning
ROWS_PER_COLUMN = 10


class RunContext:
    """What plugins may read of a run. Nothing here changes the run: masks change only through the ``Pruner``.

    - ``file``: the recipe file (for error messages); ``training``: ``TrainingSettings``; ``phases``;
      ``sparsity`` (the target), ``scope``, ``pattern`` ((N, M) of ``pruning.pattern``, or None), ``seed``.
    - ``model``: the skeleton at check time (``loaded`` False), the live model at calibration.
    - ``pool``: pool parameter name -> parameter, in pool order; ``modules``: name -> module of every module
      owning a pool parameter; ``module_of(param)``: (module name, attribute) of a pool parameter.
    - ``plan``: the prune being computed (``parpkit.selection.PrunePlan``: its sparsity, each tensor's exact
      count, the pattern, the entries that stay pruned), set by the engine before ``calibrate``,
      ``allocate`` excepted, and ``reconstruct``; None before the first prune.
    - ``by``: how ``sequential`` goes, ``block`` or ``layer`` (``pruning.calibration.sequential``).
    - ``timings``: seconds the calibration passes spent, summed over the run: ``forward`` (the model's and
      the blocks' forward passes), ``observe`` (the observers), ``after_block`` (the criterion's work
      between blocks), by ``clock`` (wall time; a benchmark on a busy machine may pass ``time.process_time``).
    """

    def __init__(self, model: torch.nn.Module, pool: Sequence[str], *, training: TrainingSettings,
                 phases: Sequence[Phase] = (), sparsity: float = 0.0, scope: str = "global", seed: int = 0,
                 file: str = "<recipe>", loaded: bool = True,
                 batches: Callable[[int], Sequence[CalibrationBatch]] | Sequence[CalibrationBatch] = (),
                 positions: PositionMask | None = None,
                 calibration: Callable[[], Sequence[CalibrationBatch]] | Sequence[CalibrationBatch] | None = None,
                 pattern: tuple[int, int] | None = None, warn: Callable[[str], None] | None = None,
                 sequential: str = "block", clock: Callable[[], float] = time.perf_counter):
        params = dict(model.named_parameters())
        missing = [n for n in pool if n not in params]
        if missing:
            raise ParpkitError(f"the pool names parameters the model lacks: {missing[:3]}")
        self.model = model
        self.pool: Mapping[str, torch.nn.Parameter] = MappingProxyType(OrderedDict((n, params[n]) for n in pool))
        self.training = training
        self.phases: tuple[Phase, ...] = tuple(phases)
        self.sparsity, self.scope, self.seed, self.file, self.loaded = sparsity, scope, seed, file, loaded
        self.pattern = pattern
        if sequential not in ("block", "layer"):
            raise ValueError(f"sequential calibration goes by 'block' or 'layer', not {sequential!r}")
        self.by = sequential
        self.plan: PrunePlan | None = None
        self.timings = {"forward": 0.0, "observe": 0.0, "after_block": 0.0}
        self._clock = clock
        self._batches = batches
        self._calibration = calibration
        self._positions = positions
        self._warn = warn
        self._warned: set[str] = set()
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
        """``n`` training batches drawn with the recipe's seed (the same ones on every call, every rank and
        every resumed attempt): what gradient criteria observe before the first mask."""
        if not self.loaded:
            raise ParpkitError("calibration batches exist only once the model is loaded (not at check time)")
        got = list(self._batches(n)) if callable(self._batches) else list(self._batches)[:n]
        if not got:
            raise ParpkitError("calibration needs at least one batch; set the criterion's calibration_batches above 0")
        return got

    def calibration_set(self) -> list[CalibrationBatch]:
        """The recipe's calibration set (``pruning.calibration``: its utterances, drawn with the recipe's seed
        from its split, collated ``batch_size`` at a time): the same on every call, rank and resumed attempt."""
        if not self.loaded:
            raise ParpkitError("the calibration set exists only once the model is loaded (not at check time)")
        if self._calibration is None:
            raise ParpkitError("this run context has no calibration set")
        got = list(self._calibration() if callable(self._calibration) else self._calibration)
        if not got:
            raise ParpkitError("the calibration set is empty; pruning.calibration.utterances must be at least 1")
        return got

    def _data(self, batches: int | None) -> list[CalibrationBatch]:
        return self.calibration_set() if batches is None else self.calibration_batches(batches)

    # ----------------------------------------------------------------------------- watching inputs
    def _watch(self, names: Sequence[str], observer: Callable[[str, torch.Tensor], None], rows: dict[str, int],
               current: list[CalibrationBatch]) -> list[Any]:
        """Forward pre-hooks handing each named module's real input rows to ``observer``."""
        named = dict(self.model.named_modules())
        last: list[Any] = [None, None, None]

        def pre_hook(name: str):
            def hook(module, args, kwargs):
                self._observe(name, args, kwargs, current[0], observer, rows, last)
            return hook

        return [named[m].register_forward_pre_hook(pre_hook(m), with_kwargs=True) for m in names]

    def _observe(self, name: str, args: tuple, kwargs: dict, batch: CalibrationBatch,
                 observer: Callable[[str, torch.Tensor], None], rows: dict[str, int], last: list[Any]) -> None:
        """Hand module ``name``'s real input rows to ``observer``. ``last`` holds the raw input, its keep-mask
        and the rows handed over before: modules fed the same tensor with the same real positions one after
        the other (q, k and v) get the same rows object, so that an observer may reuse its work."""
        x = args[0] if args else next(iter(kwargs.values()))
        keep = None
        if x.dim() > 2:
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])
            keep = self._positions(name, batch, x3.shape[1]) if self._positions else None
        if last[0] is x and _same(last[1], keep):
            x2 = last[2]
        elif x.dim() > 2:
            x2 = (x3[keep.to(x3.device)] if keep is not None else x3.reshape(-1, x3.shape[-1])).detach().float()
        else:
            x2 = x.detach().float()
        last[:] = [x, keep, x2]
        if x2.shape[0]:
            rows[name] += x2.shape[0]
            t0 = self._clock()
            observer(name, x2)
            self.timings["observe"] += self._clock() - t0

    def _forward(self, batch: CalibrationBatch) -> Any:
        """The model on one calibration batch, without a key/value cache (a block replayed from its recorded
        call must not find the keys of an earlier pass in it)."""
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        if "use_cache" in inspect.signature(self.model.forward).parameters and "use_cache" not in inputs:
            inputs["use_cache"] = False
        return self.model(**inputs)

    def _unknown(self, names: Iterable[str]) -> None:
        named = dict(self.model.named_modules())
        unknown = [m for m in names if m not in named]
        if unknown:
            raise ParpkitError(f"calibration: the model has no module {unknown[0]!r}")

    def _check_rows(self, rows: Mapping[str, int], where: str) -> None:
        """No real input is an error; fewer rows than ten per input column of a linear layer a warning."""
        empty = [m for m, n in rows.items() if n == 0]
        if empty:
            raise ParpkitError(f"calibration: module {empty[0]!r} saw no real (unpadded) input in {where}; "
                               "is it used by the forward pass?")
        named = dict(self.model.named_modules())
        thin = [(m, n, named[m].in_features) for m, n in rows.items()
                if isinstance(named[m], torch.nn.Linear) and n < ROWS_PER_COLUMN * named[m].in_features
                and m not in self._warned]
        if thin:
            self._warned.update(m for m, _, _ in thin)
            m, n, width = min(thin, key=lambda t: t[1] / t[2])
            message = (f"calibration: {len(thin)} layer{'s' if len(thin) != 1 else ''} saw fewer real positions than "
                       f"{ROWS_PER_COLUMN} × their input width (fewest: {m}, {n:,} rows for {width:,} inputs), so "
                       "their input statistics are thin (a second-moment matrix of rank at most the rows); "
                       + ("raise pruning.calibration.utterances" if where == "the calibration set" else f"feed more than {where}"))
            (self._warn or (lambda text: warnings.warn(text, stacklevel=3)))(message)

    @torch.no_grad()
    def capture_inputs(self, modules: Iterable[str], observer: Callable[[str, torch.Tensor], None], *,
                       batches: int | None = None, stop_after: str | None = None) -> dict[str, int]:
        """Feed the calibration set (or, with ``batches``, that many training batches) forward through the model
        as it is, once, and call ``observer(module, x)`` with each named module's input as float32 rows (real
        positions, features): padded frames and tokens are left out.

        ``stop_after``: a module whose forward ends the pass (nothing after it is needed). Returns the rows
        each module saw; none is an error."""
        names = list(dict.fromkeys(modules))
        self._unknown(names + ([stop_after] if stop_after else []))
        rows = dict.fromkeys(names, 0)
        current: list[CalibrationBatch] = []

        def stop_hook(module, args, output):
            raise _Stop

        handles = self._watch(names, observer, rows, current)
        if stop_after:
            handles.append(dict(self.model.named_modules())[stop_after].register_forward_hook(stop_hook))
        was_training = self.model.training
        self.model.eval()
        started, observed = self._clock(), self.timings["observe"]
        try:
            for batch in self._data(batches):
                current[:] = [batch]
                try:
                    self._forward(batch)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
            self.timings["forward"] += self._clock() - started - (self.timings["observe"] - observed)
        self._check_rows(rows, "the calibration set" if batches is None else f"{batches} batches")
        return rows

    @torch.no_grad()
    def sequential(self, modules: Iterable[str], observer: Callable[[str, torch.Tensor], None],
                   after_block: Callable[[str, list[str]], None], *, batches: int | None = None,
                   by: str | None = None) -> dict[str, int]:
        """Run the model block by block over the calibration set (``layer_blocks`` groups the modules), as the
        reference SparseGPT and Wanda do: every block's inputs are computed once and kept; the block runs
        over them with its named modules watched (``observer(module, x)``, real positions only); then
        ``after_block(block, modules)`` lets the criterion prune it (in place); then the block runs again,
        pruned, and its outputs are the next block's inputs.

        ``by`` (default: the context's, ``pruning.calibration.sequential``): ``"block"``, the above (every
        module of a block measured on the block's inputs before any of them is pruned, as the references);
        ``"layer"``: each module measured on the outputs of the modules before it, already pruned, and
        ``after_block(module, [module])`` called as soon as every batch has passed it: the block runs once,
        its batches in lockstep (one thread each, one at a time, in batch order), and its outputs are
        already the pruned block's.

        Blocks chain when the next block's input is this block's output and its other arguments are this
        block's (whisper's and wav2vec2's layers); otherwise (the first block, the decoder's first layer
        after the encoder) the next block's inputs are recorded by a forward pass of the model in which
        every block done so far returns its kept outputs instead of running. Returns the rows each module
        saw; none is an error."""
        by = by or self.by
        names = list(dict.fromkeys(modules))
        self._unknown(names)
        named = dict(self.model.named_modules())
        blocks = layer_blocks(self, names)
        data = self._data(batches)
        rows = dict.fromkeys(names, 0)
        current: list[CalibrationBatch] = []
        #: blocks run so far -> a holder of the outputs (per batch) they return when stubbed; the blocks of one
        #: chain share a holder, which keeps only the newest outputs (the ones the next block takes)
        done: dict[str, list[Any]] = {}
        was_training = self.model.training
        self.model.eval()
        t_start, t_observe, t_after = self._clock(), self.timings["observe"], self.timings["after_block"]
        try:
            calls, holder, k = self._record(blocks[0][0], data, done), [None], 0
            while k < len(blocks):
                block, members = blocks[k]
                if calls is None:  # a container the model never calls (its layers are called one by one)
                    if members == [block]:
                        raise ParpkitError(f"calibration: module {block!r} is not called by the model's forward pass")
                    blocks[k:k + 1] = [(m, [m]) for m in members]
                    calls = self._record(blocks[k][0], data, done)
                    continue
                module = named[block]
                if by == "layer":
                    outputs = self._lockstep(block, members, calls, data, observer, rows, after_block)
                else:
                    handles = self._watch(members, observer, rows, current)
                    try:
                        for batch, (args, kwargs) in zip(data, calls, strict=True):
                            current[:] = [batch]
                            module(*args, **kwargs)
                    finally:
                        for h in handles:
                            h.remove()
                        current.clear()
                    t0 = self._clock()
                    after_block(block, list(members))
                    self.timings["after_block"] += self._clock() - t0
                    outputs = None
                if k + 1 == len(blocks):
                    break
                holder[0] = outputs if outputs is not None else [module(*args, **kwargs) for args, kwargs in calls]
                done[block] = holder
                calls, chained = self._next_calls(blocks[k + 1][0], calls, holder[0], data, done)
                holder = holder if chained else [None]
                k += 1
        finally:
            self.model.train(was_training)
            self.timings["forward"] += (self._clock() - t_start - (self.timings["observe"] - t_observe)
                                        - (self.timings["after_block"] - t_after))
        self._check_rows(rows, "the calibration set" if batches is None else f"{batches} batches")
        return rows

    def _lockstep(self, block: str, members: Sequence[str], calls: list[tuple], data: Sequence[CalibrationBatch],
                  observer: Callable[[str, torch.Tensor], None], rows: dict[str, int],
                  after_layer: Callable[[str, list[str]], None]) -> list[Any]:
        """Run ``block`` once over every call, each module of ``members`` measured on the outputs of the
        modules before it, already pruned: a thread per batch, one running at a time in batch order; a
        thread that reaches a member waits there until every batch has (then ``after_layer`` prunes the
        member, and batch 0 goes on). Every batch must call the members in the same order, each once.
        Returns the block's outputs, per batch."""
        module = dict(self.model.named_modules())[block]
        watched = set(members)
        n = len(calls)
        cond = threading.Condition()
        state: dict[str, Any] = {"turn": 0, "error": None}
        order: list[str] = []  # the members in the order batch 0 calls them: the stages
        arrived: list[int] = []  # per stage, the batches that reached it
        released: list[bool] = []  # per stage, measured by every batch and pruned
        stage = [0] * n  # per batch, its next stage
        last = [[None, None, None] for _ in range(n)]
        outputs: list[Any] = [None] * n
        local = threading.local()

        def fail(error: BaseException) -> None:  # with cond held
            if state["error"] is None:
                state["error"] = error
            cond.notify_all()

        def wait(i: int, ready: Callable[[], bool] = lambda: True) -> None:  # with cond held
            while state["error"] is None and not (state["turn"] == i and ready()):
                cond.wait()
            if state["error"] is not None:
                raise _Abort

        def hook(mod, args, kwargs):
            i, name = local.index, local.names[mod]
            with cond:
                s = stage[i]
                if i == 0 and name in order:
                    fail(ParpkitError(f"calibration by layer: {name!r} is called twice in one pass of block {block!r}; "
                                      "use sequential: block"))
                    raise _Abort
                if i == 0:
                    order.append(name)
                    arrived.append(0)
                    released.append(False)
                elif s >= len(order) or order[s] != name:
                    fail(ParpkitError(f"calibration by layer: batch {i} calls {name!r} where batch 0 called "
                                      f"{order[s] if s < len(order) else 'no layer'} (block {block!r}); every batch must "
                                      "call the block's layers in one order, each once (or use sequential: block)"))
                    raise _Abort
                stage[i] += 1
            self._observe(name, args, kwargs, data[i], observer, rows, last[i])
            with cond:
                arrived[s] += 1
                if arrived[s] == n:  # every batch has measured it: prune it, then batch 0 goes on
                    t0 = self._clock()
                    try:
                        after_layer(name, [name])
                    except BaseException as exc:
                        fail(exc)
                        raise _Abort from None
                    self.timings["after_block"] += self._clock() - t0
                    released[s] = True
                    state["turn"] = 0
                else:
                    state["turn"] = i + 1
                cond.notify_all()
                wait(i, lambda: released[s])

        def run(i: int) -> None:
            local.index = i
            local.names = names
            try:
                with cond:
                    wait(i)
                with torch.no_grad():
                    outputs[i] = module(*calls[i][0], **calls[i][1])
                with cond:
                    if stage[i] != len(order) or not all(released):
                        fail(ParpkitError(f"calibration by layer: batch {i} passed {stage[i]} of the {len(order)} layers "
                                          f"batch 0 called in block {block!r}; every batch must call the same layers "
                                          "(or use sequential: block)"))
                        return
                    state["turn"] = i + 1
                    cond.notify_all()
            except _Abort:
                pass
            except BaseException as exc:  # noqa: BLE001  (handed to the caller)
                with cond:
                    fail(exc)

        named = dict(self.model.named_modules())
        names = {named[m]: m for m in watched}
        handles = [named[m].register_forward_pre_hook(hook, with_kwargs=True) for m in members]
        threads = [threading.Thread(target=run, args=(i,), name=f"calibration-{i}", daemon=True) for i in range(n)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            for h in handles:
                h.remove()
        if state["error"] is not None:
            raise state["error"]
        return outputs

    def _record(self, block: str, data: Sequence[CalibrationBatch], done: Mapping[str, list[Any]],
                start: int = 0) -> list[tuple] | None:
        """The (args, kwargs) ``block`` is called with on each batch (``data`` being the batches from index
        ``start`` on): the model runs up to it, each block in ``done`` returning its kept output for the batch
        instead of running. None when the first batch's forward pass never calls it."""
        named = dict(self.model.named_modules())
        calls: list[tuple] = []
        index = [0]

        def grab(module, args, kwargs):
            calls.append((args, dict(kwargs)))
            raise _Stop

        def stub(holder: list[Any]):
            return lambda *args, **kwargs: holder[0][index[0]]

        saved = {b: named[b].__dict__.get("forward") for b in done}
        handle = named[block].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for b, holder in done.items():
                named[b].forward = stub(holder)
            for i, batch in enumerate(data):
                index[0] = start + i
                try:
                    self._forward(batch)
                except _Stop:
                    continue
                if i == 0 and start == 0:
                    return None
                raise ParpkitError(f"calibration: block {block!r} is called for some calibration batches, not for "
                                   f"batch {start + i}")
        finally:
            handle.remove()
            for b, forward in saved.items():
                if forward is None:
                    del named[b].forward
                else:
                    named[b].forward = forward
        return calls

    def _next_calls(self, block: str, calls: list[tuple], outputs: list[Any], data: Sequence[CalibrationBatch],
                    done: Mapping[str, list[Any]]) -> tuple[list[tuple] | None, bool]:
        """The next block's calls, and whether they chain: the last block's calls with its outputs in place of
        its input when the model passes one block's output straight to the next with the same other
        arguments (checked on the first batch), else recorded by a forward pass for every batch."""
        first = self._record(block, data[:1], done)
        if first is None:
            return None, False
        first = first[0]
        slot = _slot(first, _hidden(outputs[0]))
        if slot is not None and _same(_without(first, slot), _without(calls[0], slot)):
            return [_with(call, slot, _hidden(out)) for call, out in zip(calls, outputs, strict=True)], True
        return [first] + (self._record(block, data[1:], done, start=1) if len(data) > 1 else []), False


def _hidden(output: Any) -> Any:
    """A block's output as the next block takes it: the tensor, or the first item of a tuple."""
    return output[0] if isinstance(output, (tuple, list)) and output else output


def _slot(call: tuple, value: Any) -> int | str | None:
    """Where in a recorded call (args, kwargs) ``value`` itself is passed: an argument index or a keyword."""
    args, kwargs = call
    for i, a in enumerate(args):
        if a is value:
            return i
    return next((k for k, v in kwargs.items() if v is value), None)


def _without(call: tuple, slot: int | str) -> tuple:
    args, kwargs = call
    if isinstance(slot, int):
        return (args[:slot] + args[slot + 1:], kwargs) if slot < len(args) else (args, kwargs)
    return args, {k: v for k, v in kwargs.items() if k != slot}


def _with(call: tuple, slot: int | str, value: Any) -> tuple:
    args, kwargs = call
    if isinstance(slot, int):
        return args[:slot] + (value,) + args[slot + 1:], kwargs
    return args, {**kwargs, slot: value}


def _same(a: Any, b: Any) -> bool:
    """Equal values: tensors element by element, containers item by item, anything else by identity or ==."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (objects whose == is not a truth value)
        return False


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

