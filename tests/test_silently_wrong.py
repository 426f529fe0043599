"""Issue 33, silently wrong results: what plugins hand the engine is checked (scores, sparsities, phases), and
a model is judged and saved only at its schedule's target."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import parpkit
from parpkit import Phase, PruningCriterion, Schedule, hookimpl
from parpkit.errors import ParpkitError, RecipeError
from parpkit.testing import TINY_POOL, FakePruner, crash_and_resume, tiny_model
from tests.conftest import requires_offline, tiny_recipe


class Scores(PruningCriterion):
    """Scores a test sets: ``make(name, param)``."""

    name = "scripted"
    make = staticmethod(lambda name, param: param.detach().abs())

    def scores(self, name, param):
        return type(self).make(name, param)


def _pruner(make) -> FakePruner:
    Scores.make = staticmethod(make)
    return FakePruner(tiny_model(), list(TINY_POOL), Scores(), "global")


@pytest.mark.parametrize("make, message", [
    (lambda n, p: torch.full(p.shape, float("nan")),
     r"criterion 'scripted' returned non-finite scores \(NaN or infinity\) for 8 pool tensors \(layers\.0\.fc1\.weight: 128 "
     r"of 128; .*nothing was pruned"),
    (lambda n, p: torch.where(torch.rand(p.shape) < 0.3, float("nan"), 1.0) if n == "layers.1.fc2.weight" else p.detach().abs(),
     r"for 1 pool tensor \(layers\.1\.fc2\.weight: \d+ of 128\)"),
    (lambda n, p: torch.where(p.detach() > 0, float("inf"), 0.0) if n == "layers.0.fc2.bias" else p.detach().abs(),
     r"non-finite scores .*layers\.0\.fc2\.bias"),
    (lambda n, p: torch.tensor(1.0),
     r"criterion 'scripted' returned scores of shape \(\) for layers\.0\.fc1\.weight; expected \(16, 8\), one score per weight "
     r"\(a 0-d tensor would be broadcast"),
    (lambda n, p: p.detach().abs().t() if p.dim() == 2 else p.detach().abs(), r"shape \(8, 16\) for layers\.0\.fc1\.weight"),
    (lambda n, p: torch.empty(p.shape, device="meta"), r"scores on the meta device \(no values\) for layers\.0\.fc1\.weight"),
    (lambda n, p: p.detach().abs().tolist(), r"returned a list as the scores of layers\.0\.fc1\.weight"),
])
def test_scores_that_are_not_one_finite_number_per_weight_are_refused_and_nothing_pruned(make, message):
    pruner = _pruner(make)
    before = {n: p.detach().clone() for n, p in pruner.params.items()}
    with pytest.raises(ParpkitError, match=message):
        pruner.prune(0.5)
    assert pruner.masks is None and pruner.prune_count == 0
    assert all(torch.equal(before[n], p) for n, p in pruner.params.items())


@pytest.mark.parametrize("method", ["initial_mask", "prune"])
@pytest.mark.parametrize("value", [1.5, -0.2, 1.0, float("nan"), "0.5", True])
def test_a_sparsity_outside_0_1_is_refused_naming_the_schedule(method, value):
    pruner = _pruner(lambda n, p: p.detach().abs())
    pruner.owner = "schedule 'cyclic'"
    with pytest.raises(ParpkitError, match=rf"schedule 'cyclic' asked for pruner\.{method}\(\) at sparsity .*; a sparsity "
                                           r"is a number in \[0, 1\)"):
        getattr(pruner, method)(value)
    assert pruner.masks is None


def test_a_sparsity_that_prunes_every_weight_is_refused():
    pruner = _pruner(lambda n, p: p.detach().abs())
    with pytest.raises(ParpkitError, match=r"sparsity 0\.9999999 prunes every one of the pool's 560 weights"):
        pruner.prune(0.9999999)
    pruner = FakePruner(tiny_model(), list(TINY_POOL), Scores(), "per_row")
    with pytest.raises(ParpkitError, match=r"sparsity 0\.97 in scope per_row prunes every weight of layers\.0\.fc1\.weight \(each of its 16 rows loses all 8 weights\)"):
        pruner.prune(0.97)
    pruner.prune(0.9)  # leaves some of each row
    assert pruner.sparsity == 0.9


@requires_offline
def test_a_recipe_sparsity_that_prunes_every_weight_is_refused_before_compute(tmp_path, capsys):
    from parpkit.cli import main
    from tests.conftest import write_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"pruning.sparsity": 0.9999999}))
    assert main(["validate", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path}: pruning.sparsity: sparsity 0.9999999 prunes every one of the pool's 5,360 weights" in err


# ------------------------------------------------------------------------------------ schedules

class Counting(Schedule):
    """A ramp that counts its own updates and forgets the count on resume (no state_dict): a resumed run ends
    below its target."""

    name = "counting"

    def __init__(self, options=None, **kw: Any):
        super().__init__(options, **kw)
        self.updates, self.total = 0, 1

    def phases(self, max_steps: int) -> list[Phase]:
        self.total = max_steps
        return [Phase("train", max_steps)]

    def now(self) -> float:
        return self.target * min(1.0, self.updates / max(1, self.total))

    def on_start(self, pruner) -> None:
        pruner.initial_mask(self.target / 4)

    def on_optimizer_step(self, step, pruner) -> None:
        self.updates += 1
        pruner.prune(max(self.now(), self.target / 4))

    def before_evaluate(self, pruner) -> None:
        pruner.prune(max(self.now(), self.target / 4))


class Remembering(Counting):
    name = "remembering"

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.updates = state["updates"]


class NoPhases(Counting):
    name = "no_phases"

    def phases(self, max_steps):
        return []


class NegativePhase(Counting):
    name = "negative_phase"

    def phases(self, max_steps):
        return [Phase("warm", -5), Phase("train", max_steps)]


class LazyEvaluate(Counting):
    """Prunes at the target but lets pruned weights regrow and does not zero them before evaluation."""

    name = "lazy"

    def on_optimizer_step(self, step, pruner) -> None:
        pruner.prune(self.target) if step == 1 else None

    def before_evaluate(self, pruner) -> None:
        pass


class BadState(Counting):
    name = "bad_state"

    def state_dict(self):
        return {"seen": {1, 2}}


class SchedulesPlugin:
    @hookimpl
    def register_schedules(self, register):
        for cls in (Counting, Remembering, NoPhases, NegativePhase, LazyEvaluate, BadState):
            register(cls)


def _recipe(schedule: str, **changes) -> dict:
    return tiny_recipe(**{"pruning.schedule": {"name": schedule}, "training.max_steps": 4, "training.save_steps": 2,
                          "evaluation.dense": False, "evaluation.after_prune": False, **changes})


@requires_offline
def test_a_schedule_that_forgets_its_state_on_resume_is_refused_before_judging_and_saving(tmp_path):
    with pytest.raises(ParpkitError, match=r"schedule 'counting' leaves the pool at sparsity 0\.25 \(the sparsity its masks "
                                           r"were last computed at\) before the final evaluation, but its target is 0\.5: the "
                                           r"model is neither judged nor saved\. .*state_dict / load_state_dict"):
        crash_and_resume(_recipe("counting"), tmp_path / "out", plugins=[SchedulesPlugin()])
    assert not (tmp_path / "out" / "metrics.json").exists() and not (tmp_path / "out" / "model").exists()
    # the same ramp that keeps its count resumes to exactly what an uninterrupted run gives
    straight = parpkit.run(_recipe("remembering"), output_dir=tmp_path / "a", plugins=[SchedulesPlugin()], progress=False)
    resumed = crash_and_resume(_recipe("remembering"), tmp_path / "b", plugins=[SchedulesPlugin()])
    assert resumed.final == straight.final and resumed.final["pool_sparsity"] == 0.5
    assert resumed.metrics["wall_time_s"]["attempts"] == 2


@requires_offline
def test_a_schedule_that_leaves_pruned_weights_non_zero_is_refused(tmp_path):
    with pytest.raises(ParpkitError, match=r"schedule 'lazy' leaves [\d,]+ pruned weights non-zero before the final evaluation"):
        parpkit.run(_recipe("lazy"), output_dir=tmp_path / "out", plugins=[SchedulesPlugin()], progress=False)
    assert not (tmp_path / "out" / "model").exists()


@requires_offline
@pytest.mark.parametrize("schedule, message", [
    ("no_phases", r"pruning\.schedule\.options: schedule 'no_phases': phases\(\) returned \[\]; expected a non-empty list "
                  r"of parpkit\.Phase"),
    ("negative_phase", r"pruning\.schedule\.options: schedule 'negative_phase': phase 'warm' has -5 steps; expected a whole "
                       r"number of optimizer steps, 0 or more"),
])
def test_phases_that_train_nothing_or_negative_steps_are_refused_before_compute(tmp_path, schedule, message):
    with pytest.raises(RecipeError, match=message):
        parpkit.run(_recipe(schedule), output_dir=tmp_path / "out", plugins=[SchedulesPlugin()], progress=False)
    assert not (tmp_path / "out").exists()


@requires_offline
def test_a_state_dict_a_checkpoint_cannot_hold_is_named_when_the_run_begins(tmp_path):
    with pytest.raises(ParpkitError, match=r"schedule 'bad_state': state_dict\(\) holds set \{1, 2\} at seen; a checkpoint "
                                           r"keeps JSON values"):
        parpkit.run(_recipe("bad_state"), output_dir=tmp_path / "out", plugins=[SchedulesPlugin()], progress=False)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert not any(e["event"] == "train" for e in log)  # before any training
