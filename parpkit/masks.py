"""The pruning pool, exact masks, and applying them in place.

Masks are boolean tensors (True = kept) keyed by parameter name. They are applied by zeroing weights
in place after optimizer steps: no ``weight_orig`` copies, no forward hooks.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from parpkit.errors import ParpkitError, RecipeError
from parpkit.interfaces import Criterion, ReconstructingCriterion, StructuredCriterion
from parpkit.plugin_checks import check_leaves_weights, check_scores, check_sparsity, nonfinite_count, refuse_nonfinite
from parpkit.selection import PoolLayout, PrunePlan, apportion, as_rows, keep_masks, scope_counts
from parpkit.units import UnitGroup, select_units, unit_masks

if TYPE_CHECKING:
    from parpkit.context import RunContext


def select_pool(names: Iterable[str], include: list[str], exclude: list[str] = (),
                *, file: str | None = None, key: str = "pruning") -> list[str]:
    """Parameter names matched (``re.fullmatch``) by ``include`` and by no ``exclude`` pattern.

    A pattern that matches nothing is an error: a typo must not become a silent 0% sparsity.
    """
    names = list(names)
    for field, patterns in (("include", include), ("exclude", exclude)):
        for i, pattern in enumerate(patterns):
            rx = re.compile(pattern)
            if not any(rx.fullmatch(n) for n in names):
                example = ", ".join(names[:3])
                raise RecipeError(f"pattern {pattern!r} matches no parameter of the model "
                                  f"(names look like: {example}, …)", file=file, key=f"{key}.{field}[{i}]")
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    pool = [n for n in names if any(r.fullmatch(n) for r in inc) and not any(r.fullmatch(n) for r in exc)]
    if not pool:
        raise RecipeError("the pruning pool is empty: exclude removes everything include selects", file=file, key=key)
    return pool


def compute_masks(scores: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks at ``sparsity`` from criterion scores; prunes exactly round(s·N) of N positions, the
    lowest scores, ties to the lower index (see ``parpkit.selection``)."""
    masks, _ = keep_masks(PoolLayout({n: t.shape for n, t in scores.items()}), scores.__getitem__, sparsity, scope)
    return masks


class PoolPruner:
    """The engine's ``Pruner``: holds the pool and its current masks; schedules call it to (re-)prune,
    enforce masks, and rewind. With a ``StructuredCriterion`` masks cover whole units of the backbone's
    declared groups (FFN neurons, attention heads) instead of single weights; a ``ReconstructingCriterion``
    returns its masks (and updated weights) itself. ``context``: the run context that criteria needing
    activations calibrate with. ``pattern`` (N, M): every mask keeps N of every M consecutive weights of
    each row (semi-structured sparsity, per_row scope).

    Every prune but a structured one first makes a ``PrunePlan`` (its sparsity; each tensor's exact count,
    from the criterion's ``allocate`` where it spreads the sparsity unevenly over the layers; the pattern;
    the entries that must stay pruned) and hands it to the criterion as ``context.plan``."""

    def __init__(self, model: torch.nn.Module, pool: list[str], criterion: Criterion, scope: str,
                 groups: list[UnitGroup] | None = None, donor_masks: dict[str, torch.Tensor] | None = None,
                 context: RunContext | None = None, pattern: tuple[int, int] | None = None):
        params = dict(model.named_parameters())
        self.model = model
        self.params: OrderedDict[str, torch.nn.Parameter] = OrderedDict((n, params[n]) for n in pool)
        self.criterion = criterion
        self.scope = scope
        self.groups = OrderedDict((g.name, g) for g in (groups or []))
        if isinstance(criterion, StructuredCriterion) and not self.groups:
            raise ParpkitError(f"criterion {criterion.name!r} prunes whole units, but the backbone declares no "
                               "structured groups inside the pool")
        self.donor_masks = donor_masks
        self.context = context
        self.pattern = pattern
        self.masks: OrderedDict[str, torch.Tensor] | None = None
        self.sparsity = 0.0  # sparsity of the current masks
        self.prune_count = 0  # how many times masks were computed
        self._previous: OrderedDict[str, torch.Tensor] | None = None  # the masks before the last set_masks
        self._reach: dict[str, float | None] | None = None  # what _magnitudes measured at the last set_masks
        self.lr_sum = 0.0  # the learning rates of the updates since the masks were set, summed (note_update)
        self.updates = 0  # … and how many updates
        self.reach_updates = 0  # the updates between the last two masks (set_masks moves ``updates`` here)
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.layout = PoolLayout({n: p.shape for n, p in self.params.items()})
        self._scores: torch.Tensor | None = None  # the global scope's score buffer, reused between prunes
        #: who asks for prunes, as errors name it (the engine names the recipe's schedule)
        self.owner = "the schedule"
        #: ``(event, **fields)``: where the pruner reports work it does for the engine's log (the calibration of a
        #: criterion that needs activations, timed apart from the prune); the engine points it at log.jsonl
        self.event: Callable[..., None] = lambda event, **fields: None
        self._multipliers: list[torch.Tensor] = []  # the masks as the mask upkeep multiplies by them

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def _asked(self, sparsity: Any, method: str) -> float:
        """The sparsity a schedule asked for, refused outside [0, 1) or where it would prune every weight."""
        sparsity = check_sparsity(sparsity, self.owner, f"pruner.{method}() at sparsity")
        check_leaves_weights({n: p.shape for n, p in self.params.items()}, sparsity, self.scope,
                             f"{self.owner} (pruner.{method})")
        return sparsity

    def _calibrate(self) -> None:
        """``calibrate(context)`` of a criterion that needs activations, before every prune of any kind (a
        reconstructing criterion may read its inputs there or inside ``reconstruct``)."""
        if self.criterion.needs == "activations" and type(self.criterion).calibrate is not Criterion.calibrate:
            t0 = time.time()
            self.criterion.calibrate(self._context())
            self.event("calibrate", criterion=self.criterion.name, seconds=round(time.time() - t0, 2))

    @torch.no_grad()
    def prune(self, sparsity: float) -> None:
        """Rank the whole pool now, at ``sparsity``, and zero the losers. Scores that are not one finite number
        per weight (or per unit) are refused, naming the criterion and the tensor; nothing is pruned then."""
        sparsity = self._asked(sparsity, "prune")
        name = self.criterion.name
        if sparsity == 0 and self.pattern is None:  # nothing to rank (a dense reference row): no calibration, no scores
            masks = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in self.params.items()}
        elif isinstance(self.criterion, StructuredCriterion):
            self._calibrate()
            scores = {n: check_scores(self.criterion.unit_scores(g, self.params), self.params[g.members[0].param], name,
                                      n, (g.units,)) for n, g in self.groups.items()}
            refuse_nonfinite({n: nonfinite_count(v) for n, v in scores.items()}, {n: g.units for n, g in self.groups.items()}, name)
            pruned = select_units(scores, self.groups, sparsity, self.scope)
            masks = unit_masks(pruned, self.groups, {n: p.shape for n, p in self.params.items()})
            masks = {n: masks.get(n, torch.ones(p.shape, dtype=torch.bool)) for n, p in self.params.items()}
        else:
            plan = self.plan(sparsity)
            if self.context is not None:
                self.context.plan = plan
            self._calibrate()
            if isinstance(self.criterion, ReconstructingCriterion):
                masks = self._reconstruct(plan)
            else:
                bad: dict[str, torch.Tensor] = {}

                def score(n: str) -> torch.Tensor:
                    s = check_scores(self.criterion.scores(n, self.params[n]), self.params[n], name, n)
                    bad[n] = nonfinite_count(s)
                    return s

                counts = None if plan.counts is None else [plan.counts[n] for n in self.params]
                masks, self._scores = keep_masks(self.layout, score, sparsity, self.scope, self._scores, counts=counts,
                                                 pattern=plan.pattern)
                refuse_nonfinite(bad, {n: p.numel() for n, p in self.params.items()}, name)
        self.set_masks(masks)
        self.sparsity = sparsity
        self.prune_count += 1

    def plan(self, sparsity: float) -> PrunePlan:
        """The coming prune: exact counts per tensor (uniform, or the criterion's ``allocate``), the pattern,
        and the entries that stay pruned (pruned now and still zero, when the sparsity does not fall)."""
        if self.pattern is not None:
            n, m = self.pattern
            if abs(sparsity - (1 - n / m)) > 1e-9:
                raise ParpkitError(f"the {n}:{m} pattern prunes exactly {1 - n / m:g} of every row; the schedule asked "
                                   f"for sparsity {sparsity:g} (a ramp or progressive schedule cannot use a pattern: "
                                   "use a schedule that prunes at one sparsity, such as fixed or parp)")
        counts = None
        if self.scope != "global":
            sizes = [p.numel() for p in self.params.values()]
            shares = None
            if self.pattern is None and self.context is not None:
                shares = self.criterion.allocate(self.context, sparsity)
            if shares is None:
                counts = scope_counts(self.layout.shapes, sparsity, self.scope)
            else:
                unknown = [n for n in shares if n not in self.params]
                if unknown or any(not 0 <= float(v) <= 1 for v in shares.values()):
                    raise ParpkitError(f"criterion {self.criterion.name!r} allocated sparsities outside [0, 1] or to "
                                       f"tensors outside the pool ({unknown[:3]})")
                weights = [float(shares.get(n, sparsity)) * size for n, size in zip(self.params, sizes, strict=True)]
                counts = apportion(round(sparsity * sum(sizes)), weights, sizes)
            counts = OrderedDict(zip(self.params, counts, strict=True))
        pinned = None
        if self.masks is not None and sparsity >= self.sparsity:
            pinned = {n: ~m & (self.params[n] == 0) for n, m in self.masks.items()}
        return PrunePlan(sparsity, self.scope, counts, self.pattern, pinned)

    def _context(self) -> RunContext:
        if self.context is None:
            raise ParpkitError(f"criterion {self.criterion.name!r} needs activations, and this pruner has no run context")
        return self.context

    def _reconstruct(self, plan: PrunePlan) -> dict[str, torch.Tensor]:
        """Masks (and updated weights) from a reconstructing criterion, checked against the plan."""
        masks = self.criterion.reconstruct(self._context(), plan.counts)
        for n, p in self.params.items():
            m = masks.get(n)
            if m is None or m.shape != p.shape:
                raise ParpkitError(f"criterion {self.criterion.name!r} returned no mask of shape {tuple(p.shape)} for {n}")
            if (why := plan.problem(n, m)) is not None:
                raise ParpkitError(f"criterion {self.criterion.name!r} {why} ({n})")
        return masks

    def initial_mask(self, sparsity: float) -> None:
        """The first mask of a run: from the criterion, or the donor mask a recipe's ``mask_from`` names."""
        sparsity = self._asked(sparsity, "initial_mask")
        if self.donor_masks is None:
            self.prune(sparsity)
            return
        donor = sum(int((~m).sum()) for m in self.donor_masks.values()) / self.size
        if abs(donor - sparsity) * self.size > 1 and not isinstance(self.criterion, StructuredCriterion):
            raise ParpkitError(f"the mask_from mask has sparsity {donor:.4f}, but this schedule starts at {sparsity:.4f}; "
                               f"set pruning.sparsity (or the schedule's start) to {donor:.4f}")
        self.set_masks(self.donor_masks)
        self.sparsity = donor
        self.prune_count += 1

    @torch.no_grad()
    def check_at_target(self, target: float, schedule: str) -> None:
        """Before the final evaluation and the save: the masks are at the schedule's target (computed at it, within
        one weight, and for single-weight criteria pruning exactly the count the scope takes) and every pruned
        weight is zero. A model that is not is neither judged nor written."""
        what = "the model is neither judged nor saved"
        if self.masks is None:
            if target == 0:
                return
            raise ParpkitError(f"schedule {schedule!r} never pruned: the pool is dense, but its target sparsity is {target}; "
                               f"{what}. Its on_start or a later hook must call pruner.initial_mask or pruner.prune")
        if abs(self.sparsity - target) * self.size > 1:
            raise ParpkitError(f"schedule {schedule!r} leaves the pool at sparsity {self.sparsity:.4g} (the sparsity its masks "
                               f"were last computed at) before the final evaluation, but its target is {target:g}: {what}. "
                               "A schedule reaches its target by before_evaluate; one that keeps state (a step, a ramp) "
                               "must save and restore it (state_dict / load_state_dict), or a resumed run starts it over")
        pruned = int(torch.stack([torch.count_nonzero(~m) for m in self.masks.values()]).sum())
        if not isinstance(self.criterion, StructuredCriterion) and self.donor_masks is None:
            expected = (sum(scope_counts(self.layout.shapes, self.sparsity, self.scope)) if self.scope != "global"
                        else round(self.sparsity * self.size))
            if pruned != expected:
                raise ParpkitError(f"the masks prune {pruned:,} of the pool's {self.size:,} weights, but sparsity "
                                   f"{self.sparsity:g} ({self.scope}) prunes {expected:,}: {what}")
        alive = int(torch.stack([torch.count_nonzero((p != 0) & ~m) for p, m in zip(self.params.values(), self.masks.values(),
                                                                                     strict=True)]).sum())
        if alive:
            raise ParpkitError(f"schedule {schedule!r} leaves {alive:,} pruned weights non-zero before the final evaluation "
                               f"(the masks say {pruned:,} are pruned): {what}. Its before_evaluate must zero them "
                               "(pruner.apply() or pruner.prune(target))")

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        missing = [n for n in self.params if n not in masks]
        if missing:
            raise ParpkitError(f"mask set lacks {len(missing)} pool tensors, first: {missing[:3]}")
        self._previous = self.masks  # new masks are new tensors: no copy needed
        self.masks = OrderedDict((n, masks[n].to(device=p.device, dtype=torch.bool)) for n, p in self.params.items())
        self._multipliers = []
        check_ranks_agree(self.masks)
        # how near a re-prune came to moving the mask: said where it means what it says, under global magnitude
        magnitude = self.scope == "global" and self.pattern is None and self.criterion.name == "magnitude"
        self._reach = self._magnitudes(self._previous, self.masks) if magnitude and self._previous is not None else None
        if self._reach is not None:
            self._reach["lr_sum"] = float(f"{self.lr_sum:.6g}")
        self.reach_updates, self.lr_sum, self.updates = self.updates, 0.0, 0
        self.apply()

    def note_update(self, learning_rate: float) -> None:
        """An optimizer update was made at ``learning_rate``: summed until the next masks (``lr_sum``). Under Adam
        a weight moves by about the learning rate an update at most where its gradient keeps one sign, so the sum
        is about how far a weight zeroed by the last masks can have grown back by the next."""
        self.lr_sum += float(learning_rate)
        self.updates += 1

    @torch.no_grad()
    def _magnitudes(self, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> dict[str, float | None]:
        """At a re-prune, before its masks zero anything: the largest magnitude a weight the masks ``before``
        pruned has reached (``pruned_max``; 0 where those weights were held at zero) and the smallest the masks
        ``after`` keep (``kept_min``). Under global magnitude ranking a weight grows back only once pruned_max
        reaches kept_min, so the two say how near a mask that did not move came to moving."""
        pairs = list(zip(self.params.values(), before.values(), after.values(), strict=True))
        pruned = torch.stack([torch.where(b, 0, p.abs()).amax().float() for p, b, _ in pairs]).amax()
        kept = torch.stack([torch.where(a, p.abs(), torch.inf).amin().float() for p, _, a in pairs]).amin()
        as_number = lambda t: float(f"{float(t):.6g}") if torch.isfinite(t) else None  # noqa: E731  (no kept weight: none)
        return {"pruned_max": as_number(pruned), "kept_min": as_number(kept)}

    def multipliers(self) -> list[torch.Tensor]:
        """The masks as the upkeep multiplies by them: bool on accelerators; in the parameters' dtype on the
        CPU, where multiplying by a bool tensor first makes a float copy of it (every time)."""
        if not self._multipliers and self.masks is not None:
            self._multipliers = [m if p.device.type != "cpu" else m.to(p.dtype) for m, p in zip(self.masks.values(),
                                                                                               self.params.values(), strict=True)]
        return self._multipliers

    @torch.no_grad()
    def apply(self) -> None:
        """Zero pruned weights in place (one fused multi-tensor multiply)."""
        if self.masks is not None:
            torch._foreach_mul_(list(self.params.values()), self.multipliers())

    @torch.no_grad()
    def zero_pruned_grads(self) -> None:
        if self.masks is None:
            return
        pairs = [(p.grad, m) for p, m in zip(self.params.values(), self.multipliers(), strict=True) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def reset_optimizer_state(self, where: Mapping[str, torch.Tensor]) -> int:
        """Zero every per-weight optimizer state tensor (Adam's ``exp_avg``, ``exp_avg_sq`` …) of pool
        parameters where ``where`` is True. Weights without state yet (no update so far) count as reset."""
        count = 0
        for n, sel in where.items():
            p = self.params[n]
            sel = sel.to(p.device)
            state = self.optimizer.state.get(p, {}) if self.optimizer is not None else {}
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.masked_fill_(sel, 0)
            count += int(sel.sum())
        return count

    # ----------------------------------------------------------------------------- rewinding
    @torch.no_grad()
    def snapshot(self, name: str) -> None:
        """Keep a copy of every model weight (for rewinding), on the CPU."""
        self.snapshots[name] = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def rewind(self, name: str) -> None:
        """Weights back to a snapshot, then the current masks applied: "rewind with the mask"."""
        if name not in self.snapshots:
            raise ParpkitError(f"no snapshot {name!r} to rewind to (have: {', '.join(self.snapshots) or 'none'})")
        self.model.load_state_dict(self.snapshots[name])
        self.apply()

    # ----------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Masks, counters and snapshots (all but ``pretrained``, which loading the model recreates)."""
        return {"masks": None if self.masks is None else {n: m.detach().cpu() for n, m in self.masks.items()},
                "sparsity": self.sparsity, "prune_count": self.prune_count, "lr_sum": self.lr_sum, "updates": self.updates,
                "snapshots": {k: v for k, v in self.snapshots.items() if k != "pretrained"}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["masks"] is not None:
            self.masks = OrderedDict((n, state["masks"][n].to(device=p.device, dtype=torch.bool)) for n, p in self.params.items())
            self._multipliers = []
            self._previous = self._reach = None
        self.sparsity = float(state["sparsity"])
        self.prune_count = int(state["prune_count"])
        self.lr_sum, self.updates = float(state.get("lr_sum", 0.0)), int(state.get("updates", 0))  # older checkpoints: none
        self.snapshots.update(state["snapshots"])

    # ----------------------------------------------------------------------------- measurements
    @torch.no_grad()
    def regrown_masks(self) -> dict[str, torch.Tensor] | None:
        """Per pool tensor, True where the current masks keep a weight the masks before them pruned (None
        for a run's first mask)."""
        if self._previous is None or self.masks is None:
            return None
        return {n: m & ~self._previous[n] for n, m in self.masks.items()}

    @torch.no_grad()
    def regrown(self) -> int | None:
        """How many weights ``regrown_masks`` marks; one host sync."""
        regrown = self.regrown_masks()
        return None if regrown is None else int(torch.stack([torch.count_nonzero(m) for m in regrown.values()]).sum())

    def prune_event(self) -> dict[str, Any]:
        """What the log's ``prune`` event records of the masks just set: their sparsity, the pool's exact
        zeros, and how many weights they let back (``regrown``: how far a re-prune moved the mask); at a re-prune
        also ``pruned_max`` and ``kept_min`` (``_magnitudes``: how near the mask came to moving) and ``lr_sum``
        (``note_update``: about how far a zeroed weight could have moved since the masks before)."""
        event = {"sparsity": self.sparsity, "pool_zero_fraction": self.zero_fraction(), "regrown": self.regrown(),
                 **(self._reach or {})}
        self._previous = self._reach = None  # counted: free it
        return event

    @torch.no_grad()
    def zero_fraction(self) -> float:
        """Fraction of pool weights that are exactly zero now (whatever the masks say); one host sync."""
        zeros = torch.stack([torch.count_nonzero(p == 0) for p in self.params.values()]).sum()
        return int(zeros) / self.size

    def per_tensor_rows(self) -> list[dict]:
        rows = []
        for n, p in self.params.items():
            zeros = int((p.detach() == 0).sum())
            rows.append({"name": n, "shape": "x".join(map(str, p.shape)), "numel": p.numel(),
                         "zeros": zeros, "sparsity": round(zeros / p.numel(), 6)})
        return rows

    def save_masks(self, path: Path) -> None:
        if self.masks is None:
            raise ParpkitError("no masks to save: the schedule never pruned")
        save_file({n: m.detach().cpu().contiguous() for n, m in self.masks.items()}, str(path),
                  metadata={"sparsity": str(self.sparsity), "scope": self.scope})


@torch.no_grad()
def model_zero_fraction(model: torch.nn.Module) -> float:
    total = zeros = 0
    for p in model.parameters():
        total += p.numel()
        zeros += int((p == 0).sum())
    return zeros / total


def load_masks(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def donor_path(source: str | Path) -> Path:
    path = Path(source).expanduser()
    return path / "masks.safetensors" if path.is_dir() else path


def no_mask_file(path: Path) -> str:
    what = "a run directory without masks.safetensors (has it finished?)" if path.parent.is_dir() and path.name == "masks.safetensors" \
        and (path.parent / "recipe.yaml").is_file() else "no such file or directory"
    return f"no mask file at {path}: {what} (give a run directory or a masks.safetensors)"


def check_donor_exists(source: str | Path, *, file: str | None = None) -> None:
    """``parpkit validate``: the donor mask is there (a run refuses it only once it loads it)."""
    path = donor_path(source)
    if not path.is_file():
        raise RecipeError(no_mask_file(path), file=file, key="pruning.mask_from")


def check_donor_scope(source: str | Path, scope: str, *, file: str | None = None) -> None:
    """Refuse a donor mask ranked in another scope than the recipe's: the first mask would not be what
    ``pruning.scope`` (and every report of the run) says, e.g. a global mask is not 50% in each tensor.
    Reads only the file's header (the scope its run wrote); a file that says nothing passes, and a missing or
    unreadable one is left to ``load_donor_masks`` (a finished run whose donor has moved since is still
    complete; ``parpkit validate`` refuses a missing one: ``check_donor_exists``)."""
    from safetensors import safe_open

    path = donor_path(source)
    try:
        with safe_open(str(path), "pt") as f:
            donor = (f.metadata() or {}).get("scope")
    except Exception:  # not there, or not safetensors: load_donor_masks says so
        return
    if donor is not None and donor != scope:
        raise RecipeError(f"the mask in {path} was ranked with scope {donor}, but pruning.scope is {scope}: the first "
                          f"mask would not be {scope} (its tensors' sparsities differ) while the run reports {scope}; set "
                          f"pruning.scope: {donor}, or take a mask ranked {scope}", file=file, key="pruning.mask_from")


def load_donor_masks(source: str | Path, params: dict[str, torch.Tensor], *, file: str | None = None) -> dict[str, torch.Tensor]:
    """Masks saved by another run (its ``masks.safetensors`` or its run directory), checked against this pool."""
    path = donor_path(source)
    if not path.is_file():
        raise RecipeError(no_mask_file(path), file=file, key="pruning.mask_from")
    try:
        masks = load_masks(path)
    except Exception as exc:  # safetensors raises its own error types for files that are not masks
        raise RecipeError(f"{path} is not a readable safetensors mask file ({type(exc).__name__}); give a run directory "
                          "or the masks.safetensors a run wrote", file=file, key="pruning.mask_from") from None
    problems = [f"{n}: missing in the donor" for n in params if n not in masks]
    problems += [f"{n}: not in this pool" for n in masks if n not in params]
    problems += [f"{n}: shape {tuple(masks[n].shape)} in the donor, {tuple(params[n].shape)} here"
                 for n in params if n in masks and masks[n].shape != params[n].shape]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise RecipeError(f"the mask in {path} does not fit this model's pool: " + "; ".join(problems[:5]) + more,
                          file=file, key="pruning.mask_from")
    return {n: masks[n].bool() for n in params}


def check_ranks_agree(masks: Mapping[str, torch.Tensor]) -> None:
    """Under several processes (DDP), every rank must hold the same masks: each rank ranks its own copy of
    the weights, and a difference (a criterion that draws its own random numbers, a rank that saw other
    calibration data) would train a different model on each. Compared by a checksum per tensor (count of
    kept entries, two position sums); a mismatch is an error naming the tensors. One process: nothing."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2 or not masks:
        return
    sums = []
    for m in masks.values():
        kept = torch.nonzero(m.reshape(-1)).squeeze(1).to(torch.float64)
        sums.append(torch.stack([kept.new_tensor(float(kept.numel())), (kept % 65521).sum(), ((kept * 40503) % 65537).sum()]))
    local = torch.stack(sums)
    low, high = local.clone(), local.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = [n for n, lo, hi in zip(masks, low, high, strict=True) if not torch.equal(lo, hi)]
    if differ:
        raise ParpkitError(f"the {dist.get_world_size()} processes hold different masks for {len(differ)} pool tensors "
                           f"(first: {', '.join(differ[:3])}): a criterion or schedule must decide the same on every rank "
                           "(the same weights, gradients and calibration data; no unseeded randomness)")

