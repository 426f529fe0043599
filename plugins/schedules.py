"""Built-in schedules: ``parp`` (prune, adjust with all weights free, re-prune), ``parp_progressive``
(PARP-P), ``fixed`` (MPI-fixed / random baselines), ``gmp`` (gradual magnitude pruning), ``omp`` and ``imp``
(lottery-ticket baselines)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from parpkit import Phase, PluginOptions, Pruner, RunContext, Schedule, cubic_ramp, hookimpl, linear_ramp


class ParpOptions(PluginOptions):
    #: re-prune at the target every this many optimizer steps
    interval: int = Field(default=50, gt=0)
    #: at each re-prune, Adam's moments of weights that were pruned, grew back and are kept: keep them (as
    #: the reference does) or reset them to zero (as AC/DC does), so their updates start afresh
    reset_moments: Literal["keep", "regrown"] = "keep"
    #: from this optimizer step on the mask is fixed (a last re-prune there, then pruned weights stay zero
    #: as in ``fixed``, and no re-prune before evaluation): the control arm that tells the mask PARP found
    #: from the shock of re-pruning weights trained dense until the end; null: never
    fix_from_step: int | None = Field(default=None, gt=0)


class Parp(Schedule):
    """Initial mask from the pretrained weights at the target, zeroed once; then train with no mask
    enforcement (pruned weights get gradients and may regrow) and re-rank the whole pool every
    ``interval`` steps and before every evaluation and save, so what is judged is exactly at target.
    With ``fix_from_step`` the last stretch trains with the mask fixed."""

    name = "parp"
    Options = ParpOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        self.last_prune_step = 0
        self.moments_reset = 0  # weights whose optimizer state was reset, over all re-prunes
        self.step = 0
        self.fixed = False  # the mask is fixed (fix_from_step reached)

    def check(self, context: RunContext) -> None:
        fix = self.options.fix_from_step
        if fix is not None and fix > context.max_steps:
            raise ValueError(f"fix_from_step {fix} is past training.max_steps {context.max_steps}: the mask would never "
                             "be fixed")

    def sparsity_at(self, step: int) -> float:
        return self.target

    def on_start(self, pruner: Pruner) -> None:
        pruner.initial_mask(self.sparsity_at(0))

    def reprune(self, sparsity: float, pruner: Pruner) -> None:
        pruner.prune(sparsity)
        if self.options.reset_moments == "regrown" and (regrown := pruner.regrown_masks()) is not None:
            self.moments_reset += pruner.reset_optimizer_state(regrown)

    def on_gradients(self, step: int, pruner: Pruner) -> None:
        if self.fixed:
            pruner.zero_pruned_grads()

    def on_optimizer_step(self, step: int, pruner: Pruner) -> None:
        self.step = step
        if self.fixed:
            return
        fix = self.options.fix_from_step
        if fix is not None and step >= fix:  # the last re-prune; from here the mask stays as in `fixed`
            self.reprune(self.sparsity_at(step), pruner)
            pruner.reset_optimizer_state({n: ~m for n, m in pruner.masks.items()})  # Adam would move pruned weights
            self.fixed = True
        elif step % self.options.interval == 0:
            self.reprune(self.sparsity_at(step), pruner)
        else:
            return
        self.last_prune_step = step

    def before_evaluate(self, pruner: Pruner) -> None:
        if self.fixed:
            pruner.apply()
        else:
            pruner.prune(self.sparsity_at(self.step))

    def state_dict(self) -> dict[str, Any]:
        return {"last_prune_step": self.last_prune_step, "moments_reset": self.moments_reset, "step": self.step,
                "fixed": self.fixed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_prune_step = int(state.get("last_prune_step", 0))
        self.moments_reset = int(state.get("moments_reset", 0))
        self.step = int(state.get("step", 0))
        self.fixed = bool(state.get("fixed", False))


class Fixed(Schedule):
    """The initial mask (from the pretrained weights) kept throughout: pruned weights stay zero. Their
    gradients are zeroed as soon as they are ready, before clipping (as the reference's ``weight_orig *
    mask`` gives them none: the clip norm counts only weights that exist). A pruned weight is zero and has
    had no gradient since its optimizer began, so its Adam moments are zero and its update is exactly
    zero (weight decay of zero is zero): the weights need no zeroing after each update (tested at every
    step). With the magnitude criterion this is the MPI-fixed baseline; with ``random`` the random-mask
    baseline."""

    name = "fixed"

    def on_start(self, pruner: Pruner) -> None:
        pruner.initial_mask(self.target)

    def on_gradients(self, step: int, pruner: Pruner) -> None:
        pruner.zero_pruned_grads()

    def before_evaluate(self, pruner: Pruner) -> None:
        pruner.apply()


class ProgressiveOptions(ParpOptions):
    #: sparsity of the first mask
    start: float = Field(default=0.1, ge=0, lt=1)
    #: optimizer steps over which sparsity rises to the target; null: all of training.max_steps
    ramp_steps: int | None = Field(default=None, gt=0)
    #: linear: equal steps at each re-prune, as the reference PARP-P code does; cubic: Zhu & Gupta 2017
    ramp: Literal["linear", "cubic"] = "linear"


class ParpProgressive(Parp):
    """PARP-P: PARP whose sparsity starts at ``start`` and rises at each re-prune to the target
    (by equal steps, or cubic as in Zhu & Gupta 2017: fast at first, slow near the target), then stays there."""

    name = "parp_progressive"
    prunes_at_target_only = False
    Options = ProgressiveOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        if self.options.start > self.target:
            raise ValueError(f"start ({self.options.start}) is above the target sparsity ({self.target})")
        self.ramp_steps = self.options.ramp_steps

    def check(self, context: RunContext) -> None:
        super().check(context)
        if self.ramp_steps is not None and self.ramp_steps > context.max_steps:
            raise ValueError(f"ramp_steps {self.ramp_steps} is past training.max_steps {context.max_steps}: the run would "
                             f"end below the target sparsity {self.target}; use at most {context.max_steps}")
        ramp_end = self.ramp_steps or context.max_steps
        if self.options.fix_from_step is not None and self.options.fix_from_step < ramp_end:
            raise ValueError(f"fix_from_step {self.options.fix_from_step} comes before the ramp reaches the target (step "
                             f"{ramp_end}): the fixed mask would stay below the target sparsity")

    def phases(self, max_steps: int) -> list[Phase]:
        self.ramp_steps = self.ramp_steps or max_steps
        return super().phases(max_steps)

    def sparsity_at(self, step: int) -> float:
        ramp = linear_ramp if self.options.ramp == "linear" else cubic_ramp
        return ramp(self.options.start, self.target, step / self.ramp_steps if self.ramp_steps else 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ramp_steps": self.ramp_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ramp_steps = state.get("ramp_steps", self.ramp_steps)


class GmpOptions(PluginOptions):
    #: sparsity of the first mask (at step 0)
    initial: float = Field(default=0.0, ge=0, lt=1)
    #: the ramp begins after this many optimizer steps
    start_step: int = Field(default=0, ge=0)
    #: … and reaches the target at this step; null: training.max_steps
    end_step: int | None = Field(default=None, gt=0)
    #: prune every this many steps on the ramp (and at its end)
    interval: int = Field(default=10, gt=0)


class Gmp(Fixed):
    """Gradual magnitude pruning (Zhu & Gupta 2017): sparsity rises on a cubic ramp from ``initial`` to the
    target between ``start_step`` and ``end_step``, pruning every ``interval`` steps with the recipe's
    criterion (any criterion: magnitude as in the paper, or wanda, sparsegpt …); between prunes the mask is
    fixed. At each prune the optimizer state of every pruned weight is zeroed, so that a weight pruned
    mid-training stays exactly zero (its Adam moments would move it otherwise)."""

    name = "gmp"
    prunes_at_target_only = False
    Options = GmpOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        if self.options.initial > self.target:
            raise ValueError(f"initial ({self.options.initial}) is above the target sparsity ({self.target})")
        self.end_step = self.options.end_step

    def check(self, context: RunContext) -> None:
        end = self.options.end_step if self.options.end_step is not None else context.max_steps
        if end > context.max_steps:
            raise ValueError(f"end_step {end} is past training.max_steps {context.max_steps}: the run would end below "
                             f"the target sparsity {self.target}")
        if self.options.start_step >= end:
            raise ValueError(f"start_step {self.options.start_step} must come before end_step {end}")

    def phases(self, max_steps: int) -> list[Phase]:
        self.end_step = self.options.end_step or max_steps
        return super().phases(max_steps)

    def sparsity_at(self, step: int) -> float:
        start = self.options.start_step
        return cubic_ramp(self.options.initial, self.target, (step - start) / (self.end_step - start))

    def on_start(self, pruner: Pruner) -> None:
        pruner.initial_mask(self.sparsity_at(0))

    def on_optimizer_step(self, step: int, pruner: Pruner) -> None:
        start, end = self.options.start_step, self.end_step
        if start < step <= end and ((step - start) % self.options.interval == 0 or step == end):
            sparsity = self.sparsity_at(step)
            if sparsity > pruner.sparsity:
                pruner.prune(sparsity)
                pruner.reset_optimizer_state({n: ~m for n, m in pruner.masks.items()})


class _Rewinding(Fixed):
    """Shared by OMP and IMP: fixed masks during each phase, rewinds between phases."""

    accepts_mask_from = False

    def on_start(self, pruner: Pruner) -> None:
        pass  # the first phase is dense

    def _rewind(self, pruner: Pruner) -> None:
        pruner.rewind(getattr(self, "rewind_to", "pretrained"))


class OmpOptions(PluginOptions):
    #: steps of the dense fine-tune that finds the mask; null: training.max_steps
    dense_steps: int | None = Field(default=None, gt=0)


class Omp(_Rewinding):
    """One-shot magnitude pruning: fine-tune dense, take the mask of the fine-tuned weights at the target,
    rewind to the pretrained weights with that mask, fine-tune with the mask fixed."""

    name = "omp"
    Options = OmpOptions

    def phases(self, max_steps: int) -> list[Phase]:
        return [Phase("dense", self.options.dense_steps or max_steps, stage="dense_finetuned"), Phase("final", max_steps)]

    def phase_key(self, index: int, phase: Phase) -> dict[str, Any] | None:
        return {"kind": "dense"} if index == 0 else None

    def on_phase_end(self, index: int, pruner: Pruner) -> None:
        if index == 0:
            pruner.prune(self.target)
            self._rewind(pruner)


class ImpOptions(PluginOptions):
    #: each round prunes this share of the ORIGINAL pool (0.1: 0.1, 0.2, … up to the target), as the
    #: reference IMP code does; the default when neither rounds nor fraction is given
    step: float | None = Field(default=None, gt=0, lt=1)
    #: instead: this many rounds, each removing the same fraction of the remaining weights (geometric)
    rounds: int | None = Field(default=None, gt=0)
    #: instead: each round removes this fraction of the remaining weights; rounds follow, the last clamped
    fraction: float | None = Field(default=None, gt=0, lt=1)
    #: steps of each round's fine-tune; null: training.max_steps
    round_steps: int | None = Field(default=None, gt=0)
    #: rewind point: "pretrained" or "step:N" (weights after N updates of the first round)
    rewind: str = "pretrained"
    #: evaluate each round's model (stage round_<r>); off saves an evaluation per round
    evaluate_rounds: bool = True

    @model_validator(mode="after")
    def _check(self):
        given = [k for k in ("step", "rounds", "fraction") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of step, rounds and fraction, not {' and '.join(given)}")
        if not given:
            self.step = 0.1
        if self.rewind != "pretrained" and not (self.rewind.startswith("step:") and self.rewind[5:].isdigit()):
            raise ValueError(f"rewind must be 'pretrained' or 'step:N', got {self.rewind!r}")
        return self


def imp_sparsities(target: float, *, step: float | None = None, rounds: int | None = None,
                   fraction: float | None = None) -> list[float]:
    """Sparsity after each IMP round, ending exactly at ``target``. Rounds that floating-point error
    would put at (or a hair before) the target are not repeated."""
    if target <= 0:
        return [0.0]
    if step is not None:
        values = [step * r for r in range(1, math.ceil(target / step - 1e-9) + 1)]
    else:
        if rounds is not None:
            fraction = 1 - (1 - target) ** (1 / rounds)
        n = rounds or max(1, math.ceil(math.log(1 - target) / math.log(1 - fraction) - 1e-9))
        values = [1 - (1 - fraction) ** r for r in range(1, n + 1)]
    values = [min(v, target) for v in values]
    values[-1] = target
    out: list[float] = []
    for v in values:  # drop a round within rounding error of the next one
        if out and abs(v - out[-1]) < 1e-9:
            continue
        out.append(v)
    return out


class Imp(_Rewinding):
    """Iterative magnitude pruning: rounds of fine-tune -> prune -> rewind until the target, then a final
    fine-tune with the last mask fixed. By default each round prunes 10% of the original pool (0.1, 0.2,
    …), as the reference does; ``rounds`` or ``fraction`` give the geometric rule instead. Each round is
    evaluated (stage ``round_<r>``, before its prune) and its mask saved (``masks_round_<r>.safetensors``)."""

    name = "imp"
    prunes_at_target_only = False
    Options = ImpOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        o = self.options
        self.schedule = imp_sparsities(self.target, step=o.step, rounds=o.rounds, fraction=o.fraction)
        self.rewind_step = int(o.rewind[5:]) if o.rewind.startswith("step:") else None
        self.rewind_to = "pretrained" if self.rewind_step is None else "rewind"

    def phases(self, max_steps: int) -> list[Phase]:
        n = self.options.round_steps or max_steps
        if self.rewind_step is not None and self.rewind_step > n:
            raise ValueError(f"rewind step {self.rewind_step} is past the first round's {n} steps")
        rounds = [Phase(f"round_{r + 1}", n, stage=f"round_{r + 1}" if self.options.evaluate_rounds else None)
                  for r in range(len(self.schedule))]
        return rounds + [Phase("final", max_steps)]

    def phase_key(self, index: int, phase: Phase) -> dict[str, Any] | None:
        """Round 1 is a dense fine-tune (OMP's, when the steps agree); every later phase is fixed by the
        masks before it: IMP at 0.5 and at 0.9 share their first five rounds, and IMP at 0.5's final
        fine-tune is IMP at 0.9's sixth round when rounds and the final fine-tune take the same steps."""
        rewind = {} if self.rewind_step is None else {"rewind_step": self.rewind_step}
        if index == 0:
            return {"kind": "dense", **rewind}
        return {"kind": "imp", "after": [round(x, 9) for x in self.schedule[:index]], **rewind}

    def on_optimizer_step(self, step: int, pruner: Pruner) -> None:
        super().on_optimizer_step(step, pruner)
        if self.rewind_step is not None and step == self.rewind_step:
            pruner.snapshot("rewind")

    def on_phase_start(self, index: int, pruner: Pruner) -> None:
        if index == 0 and self.rewind_step == 0:
            pruner.snapshot("rewind")

    def on_phase_end(self, index: int, pruner: Pruner) -> None:
        if index < len(self.schedule):
            pruner.prune(self.schedule[index])
            self._rewind(pruner)


@hookimpl
def register_schedules(register):
    register(Parp)
    register(ParpProgressive)
    register(Fixed)
    register(Gmp)
    register(Omp)
    register(Imp)
