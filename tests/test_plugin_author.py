"""Issue 33, what an outside plugin author missed: test helpers (crash_and_resume, check_dataset, a FakePruner that
records what a schedule asks), a plugin's options from the command line, the constructor keywords written down,
and an activation criterion's calibration as its own event in the log."""

from __future__ import annotations

import json

import pytest

from parpkit import Dataset, Schedule
from parpkit.cli import main
from parpkit.interfaces import Backbone, Criterion
from parpkit.testing import TINY_POOL, FakePruner, crash_and_resume, tiny_model, tiny_recipe
from parpkit_plugins.criteria import Magnitude
from tests.conftest import requires_offline


class ApplyAtEnd(Schedule):
    name = "apply_at_end"

    def on_start(self, pruner):
        pruner.initial_mask(self.target)

    def on_optimizer_step(self, step, pruner):
        if step == 2:
            pruner.snapshot("two")

    def before_evaluate(self, pruner):
        pruner.apply()


def test_fake_pruner_records_the_schedules_own_calls_only():
    from parpkit.testing import drive

    pruner = FakePruner(tiny_model(), TINY_POOL, Magnitude(), "global")
    drive(ApplyAtEnd(target=0.5), pruner, steps=3)
    # initial_mask's own prune and the apply every new mask makes are the pruner's business, not the schedule's
    assert pruner.calls == [("initial_mask", (0.5,)), ("snapshot", ("two",)), ("apply", ())]
    assert pruner.history == [0.5]


def test_plugins_options_shows_what_a_plugin_is_and_takes(capsys):
    assert main(["plugins", "--options", "parp"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "schedule parp (parpkit_plugins.schedules.Parp, parpkit" in out
    assert "Initial mask from the pretrained weights at the target" in out  # the docstring
    assert "constructed as Schedule(options, target=<the recipe's pruning.sparsity>)" in out
    assert "parp options (recipe: pruning.schedule.options)" in out
    assert "interval" in out and "re-prune at the target every this many optimizer steps" in out and "50" in out
    assert main(["plugins", "--options", "random"]) == 0
    assert "constructed as Criterion(options, seed=<the recipe's seed>)" in " ".join(capsys.readouterr().out.split())
    assert main(["plugins", "--options", "nonesuch"]) == 2
    assert "--options: no plugin named 'nonesuch'; plugins: " in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("cls, keyword", [(Dataset, "cache_dir=path"), (Backbone, "cache_dir=path"),
                                          (Criterion, "seed=recipe.seed"), (Schedule, "target=recipe.pruning.sparsity")])
def test_the_constructor_keywords_are_documented_on_the_interfaces(cls, keyword):
    assert keyword in " ".join((cls.__doc__ or "").split())


@requires_offline
def test_an_activation_criterion_logs_its_calibration_apart_from_the_prune(tmp_path):
    import parpkit

    recipe = tiny_recipe(**{"pruning.criterion": {"name": "wanda"}, "pruning.calibration": {"utterances": 8},
                            "pruning.scope": "per_row", "pruning.exclude": [".*\\.bias"], "training.max_steps": 2,
                            "evaluation.dense": False,
                            "evaluation.after_prune": False})
    parpkit.run(recipe, output_dir=tmp_path / "out", progress=False)
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    events = [e["event"] for e in log]
    calibrations = [e for e in log if e["event"] == "calibrate"]
    # before the first mask, and before the re-prune PARP makes to judge (interval 3 > 2 steps)
    assert len(calibrations) == 2 and all(e["criterion"] == "wanda" and e["seconds"] >= 0
                                          for e in calibrations)
    assert events.index("calibrate") < events.index("prune")


@requires_offline
def test_crash_and_resume_says_when_the_recipe_writes_no_checkpoint(tmp_path):
    with pytest.raises(AssertionError, match=r"the run finished after 0 complete checkpoint\(s\), before the stop after 1: "
                                             r"set training\.save_steps"):
        crash_and_resume(tiny_recipe(**{"training.max_steps": 1}), tmp_path / "out")
