"""Learning-rate schedules: transformers' by name, plus ``tri_stage``, the warm-up / hold / exponential
decay schedule of the wav2vec2 and PARP reference code (fairseq's ``tri_stage``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

TRI_STAGE_DEFAULTS = {"phase_ratio": [0.1, 0.4, 0.5], "init_lr_scale": 0.01, "final_lr_scale": 0.05}


def scheduler_names() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    return sorted({s.value for s in SchedulerType} | {"tri_stage"})


def tri_stage(total_steps: int, phase_ratio: list[float] = (0.1, 0.4, 0.5), init_lr_scale: float = 0.01,
              final_lr_scale: float = 0.05) -> Callable[[int], float]:
    """The LR multiplier at each step: linear warm-up from ``init_lr_scale`` to 1 over the first share of
    the steps, hold at 1, then exponential decay to ``final_lr_scale`` over the last share, and stay."""
    warmup, hold, decay = (int(total_steps * r) for r in phase_ratio)

    def multiplier(step: int) -> float:
        if step < warmup:
            return init_lr_scale + (1 - init_lr_scale) * step / warmup
        step -= warmup
        if step < hold:
            return 1.0
        step -= hold
        if step < decay:
            return math.exp(math.log(final_lr_scale) * step / decay)
        return final_lr_scale

    return multiplier


def check_scheduler(name: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ValueError (with what was expected) unless ``name`` with ``kwargs`` builds a schedule."""
    names = scheduler_names()
    if name not in names:
        raise ValueError(f"unknown LR schedule {name!r}; known: {', '.join(names)}")
    if name == "tri_stage":
        unknown = set(kwargs) - set(TRI_STAGE_DEFAULTS)
        if unknown:
            raise ValueError(f"tri_stage takes {', '.join(TRI_STAGE_DEFAULTS)}; not {', '.join(sorted(unknown))}")
        o = {**TRI_STAGE_DEFAULTS, **kwargs}
        ratio = o["phase_ratio"]
        if not (isinstance(ratio, (list, tuple)) and len(ratio) == 3 and all(isinstance(r, (int, float)) and r >= 0 for r in ratio)
                and abs(sum(ratio) - 1) < 1e-6):
            raise ValueError(f"tri_stage phase_ratio must be three shares summing to 1, got {ratio!r}")
        for key in ("init_lr_scale", "final_lr_scale"):
            if not (isinstance(o[key], (int, float)) and 0 < o[key] <= 1):
                raise ValueError(f"tri_stage {key} must be in (0, 1], got {o[key]!r}")
        return
    from transformers import get_scheduler

    try:  # build it once on a dummy optimizer: wrong or missing arguments fail here, not after data loads
        get_scheduler(name, optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), num_warmup_steps=1,
                      num_training_steps=10, scheduler_specific_kwargs=dict(kwargs))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"LR schedule {name!r} with {dict(kwargs)}: {exc}") from None


def make_tri_stage(optimizer: torch.optim.Optimizer, total_steps: int, kwargs: Mapping[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, tri_stage(total_steps, **{**TRI_STAGE_DEFAULTS, **kwargs}))
