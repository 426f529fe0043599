"""Built-in schedules: ``parp`` (prune, adjust with all weights free, re-prune) and ``fixed``."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from parpkit import Schedule, hookimpl
from parpkit.interfaces import PluginOptions
from parpkit.masks import Pruner


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
        pruner.prune(self.target)

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
        pruner.prune(self.target)

    def on_pre_optimizer_step(self, step: int, pruner: Pruner) -> None:
        pruner.zero_pruned_grads()

    def on_optimizer_step(self, step: int, pruner: Pruner) -> None:
        pruner.apply()

    def before_evaluate(self, pruner: Pruner) -> None:
        pruner.apply()


@hookimpl
def register_schedules(register):
    register(Parp)
    register(Fixed)
