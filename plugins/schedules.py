"""Built-in schedules: ``parp`` (prune, adjust with all weights free, re-prune), ``parp_progressive``
(PARP-P), ``fixed`` (MPI-fixed / random baselines), ``omp`` and ``imp`` (lottery-ticket baselines)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from parpkit import Phase, PluginOptions, Pruner, Schedule, hookimpl


class ParpOptions(PluginOptions):
    #: re-prune at the target every this many optimizer steps
    interval: int = Field(default=50, gt=0)


class Parp(Schedule):
    """Initial mask from the pretrained weights at the target, zeroed once; then train with no mask
    enforcement (pruned weights get gradients and may regrow) and re-rank the whole pool every
    ``interval`` steps and before every evaluation and save, so what is judged is exactly at target."""

    name = "parp"
    Options = ParpOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        self.last_prune_step = 0

    def on_start(self, pruner: Pruner) -> None:
        pruner.initial_mask(self.target)

    def on_optimizer_step(self, step: int, pruner: Pruner) -> None:
        if step % self.options.interval == 0:
            pruner.prune(self.target)
            self.last_prune_step = step

    def before_evaluate(self, pruner: Pruner) -> None:
        pruner.prune(self.target)

    def state_dict(self) -> dict[str, Any]:
        return {"last_prune_step": self.last_prune_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_prune_step = int(state.get("last_prune_step", 0))


class Fixed(Schedule):
    """The initial mask (from the pretrained weights) kept throughout: pruned weights stay zero
    (their gradients are zeroed before each update and the weights after it). With the magnitude
    criterion this is the MPI-fixed baseline; with ``random`` the random-mask baseline."""

    name = "fixed"

    def on_start(self, pruner: Pruner) -> None:
        pruner.initial_mask(self.target)

    def on_pre_optimizer_step(self, step: int, pruner: Pruner) -> None:
        pruner.zero_pruned_grads()

    def on_optimizer_step(self, step: int, pruner: Pruner) -> None:
        pruner.apply()

    def before_evaluate(self, pruner: Pruner) -> None:
        pruner.apply()


class ProgressiveOptions(ParpOptions):
    #: sparsity of the first mask
    start: float = Field(default=0.1, ge=0, lt=1)
    #: optimizer steps over which sparsity rises to the target; null: all of training.max_steps
    ramp_steps: int | None = Field(default=None, gt=0)
    ramp: Literal["linear", "cubic"] = "cubic"


class ParpProgressive(Parp):
    """PARP-P: PARP whose sparsity starts at ``start`` and rises at each re-prune to the target
    (linear, or cubic as in Zhu & Gupta 2017: fast at first, slow near the target), then stays there."""

    name = "parp_progressive"
    Options = ProgressiveOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        if self.options.start > self.target:
            raise ValueError(f"start ({self.options.start}) is above the target sparsity ({self.target})")
        self.ramp_steps = self.options.ramp_steps
        self.step = 0

    def phases(self, max_steps: int) -> list[Phase]:
        self.ramp_steps = self.ramp_steps or max_steps
        return super().phases(max_steps)

    def sparsity_at(self, step: int) -> float:
        s0, s1 = self.options.start, self.target
        t = min(1.0, step / self.ramp_steps) if self.ramp_steps else 1.0
        if self.options.ramp == "linear":
            return s0 + (s1 - s0) * t
        return s1 + (s0 - s1) * (1 - t) ** 3

    def on_start(self, pruner: Pruner) -> None:
        pruner.initial_mask(self.options.start)

    def on_optimizer_step(self, step: int, pruner: Pruner) -> None:
        self.step = step
        if step % self.options.interval == 0:
            pruner.prune(self.sparsity_at(step))
            self.last_prune_step = step

    def before_evaluate(self, pruner: Pruner) -> None:
        pruner.prune(self.sparsity_at(self.step))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step": self.step, "ramp_steps": self.ramp_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.step = int(state.get("step", 0))
        self.ramp_steps = state.get("ramp_steps", self.ramp_steps)


class _Rewinding(Fixed):
    """Shared by OMP and IMP: fixed masks during each phase, rewinds between phases."""

    accepts_mask_from = False

    def on_start(self, pruner: Pruner) -> None:
        pass  # the first phase is dense

    def on_pre_optimizer_step(self, step: int, pruner: Pruner) -> None:
        pruner.zero_pruned_grads()

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

    def on_phase_end(self, index: int, pruner: Pruner) -> None:
        if index == 0:
            pruner.prune(self.target)
            self._rewind(pruner)


class ImpOptions(PluginOptions):
    #: prune rounds before the final fine-tune; each removes a fraction of the remaining weights
    rounds: int | None = Field(default=None, gt=0)
    #: the per-round fraction; with rounds null, rounds = what reaches the target (the last is clamped)
    fraction: float | None = Field(default=None, gt=0, lt=1)
    #: steps of each round's fine-tune; null: training.max_steps
    round_steps: int | None = Field(default=None, gt=0)
    #: rewind point: "pretrained" or "step:N" (weights after N updates of the first round)
    rewind: str = "pretrained"

    @model_validator(mode="after")
    def _check(self):
        if (self.rounds is None) == (self.fraction is None):
            raise ValueError("give exactly one of rounds and fraction")
        if self.rewind != "pretrained" and not (self.rewind.startswith("step:") and self.rewind[5:].isdigit()):
            raise ValueError(f"rewind must be 'pretrained' or 'step:N', got {self.rewind!r}")
        return self


class Imp(_Rewinding):
    """Iterative magnitude pruning: rounds of fine-tune -> prune a fraction of the remaining weights ->
    rewind, until the target; then a final fine-tune with the last mask fixed. Each round is evaluated
    (stage ``round_<r>``, before its prune) and its mask saved (``masks_round_<r>.safetensors``)."""

    name = "imp"
    Options = ImpOptions

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        o = self.options
        if o.rounds is not None:
            self.fraction = 1 - (1 - self.target) ** (1 / o.rounds) if self.target > 0 else 0.0
            n = o.rounds
        else:
            self.fraction = o.fraction
            n = max(1, math.ceil(math.log(1 - self.target) / math.log(1 - o.fraction))) if self.target > 0 else 1
        self.schedule = [min(self.target, 1 - (1 - self.fraction) ** r) for r in range(1, n + 1)]
        self.schedule[-1] = self.target
        self.rewind_step = int(o.rewind[5:]) if o.rewind.startswith("step:") else None
        self.rewind_to = "pretrained" if self.rewind_step is None else "rewind"

    def phases(self, max_steps: int) -> list[Phase]:
        n = self.options.round_steps or max_steps
        if self.rewind_step is not None and self.rewind_step > n:
            raise ValueError(f"rewind step {self.rewind_step} is past the first round's {n} steps")
        rounds = [Phase(f"round_{r + 1}", n, stage=f"round_{r + 1}") for r in range(len(self.schedule))]
        return rounds + [Phase("final", max_steps)]

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
    register(Omp)
    register(Imp)
