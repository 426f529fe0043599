"""Schedules on a real (tiny, random-initialised) whisper fine-tuned through the engine."""

import pytest
from transformers import TrainerCallback

import parpkit
from parpkit.engine import run
from parpkit.progress import QUIET
from parpkit.recipe import load_recipe
from parpkit.registry import Plugins
from parpkit.resolve import resolve
from tests.conftest import requires_offline, tiny_recipe

pytestmark = requires_offline


class PoolRecorder(TrainerCallback):
    """After every update (and after the schedule acted on it): how many pool weights are zero, and
    whether any position pruned by the previous masks is non-zero now (regrowth)."""

    def __init__(self, pruner_ref):
        self.pruner_ref = pruner_ref
        self.rows = []

    def on_optimizer_step(self, args, state, control, **kw):
        pruner = self.pruner_ref()
        zeros = sum(int((p == 0).sum()) for p in pruner.params.values())
        regrown = sum(int(((p != 0) & ~self.masks_seen[n]).sum()) for n, p in pruner.params.items())
        self.rows.append({"step": state.global_step + 1, "zeros": zeros, "regrown": regrown,
                          "prunes": pruner.prune_count})
        self.masks_seen = {n: m.clone() for n, m in pruner.masks.items()}


def _run_with_recorder(tmp_path, recipe_file, **changes):
    path = recipe_file(**changes)
    recipe, mapping = load_recipe(path)
    resolved = resolve(recipe, Plugins(), str(path))
    holder = {}
    original = resolved.schedule.on_start

    def on_start(pruner):  # capture the engine's pruner when the schedule first sees it
        holder["pruner"] = pruner
        original(pruner)
        recorder.masks_seen = {n: m.clone() for n, m in pruner.masks.items()}

    resolved.schedule.on_start = on_start
    recorder = PoolRecorder(lambda: holder["pruner"])
    metrics = run(resolved, QUIET, output_dir=tmp_path / "run", resolved_mapping=mapping, callbacks=[recorder])
    return holder["pruner"], recorder.rows, metrics


def test_parp_regrows_between_reprunes_and_is_at_target_after_each(tmp_path, recipe_file):
    pruner, rows, metrics = _run_with_recorder(tmp_path, recipe_file, **{"training.max_steps": 6,
                                                                         "pruning.schedule.options": {"interval": 3}})
    target = round(0.5 * pruner.size)
    at_reprune = [r for r in rows if r["step"] % 3 == 0]
    between = [r for r in rows if r["step"] % 3 != 0]
    assert [r["step"] for r in at_reprune] == [3, 6]
    # right after each re-prune: exactly at target (zeros may only exceed it by weights that are zero anyway)
    assert all(r["zeros"] == target for r in at_reprune)
    # between re-prunes the pruned weights received updates and grew back
    assert all(r["regrown"] > 0 for r in between)
    assert all(r["zeros"] < target for r in between)
    assert [r["prunes"] for r in rows] == [1, 1, 2, 2, 2, 3]
    # what was judged and saved is at target to within one weight
    assert abs(metrics["pool_pruned"] - target) <= 1
    assert metrics["stages"]["final"]["pool_sparsity"] == pytest.approx(0.5, abs=1 / pruner.size)


def test_fixed_keeps_pruned_weights_zero_at_every_step(tmp_path, recipe_file):
    pruner, rows, metrics = _run_with_recorder(tmp_path, recipe_file, **{"training.max_steps": 5,
                                                                         "pruning.schedule": {"name": "fixed"}})
    target = round(0.5 * pruner.size)
    assert len(rows) == 5
    assert all(r["regrown"] == 0 for r in rows)
    assert all(r["zeros"] == target for r in rows)
    assert all(r["prunes"] == 1 for r in rows)  # the mask was never recomputed
    assert metrics["pool_pruned"] == target


def test_random_criterion_with_fixed_schedule_is_the_random_baseline(tmp_path, recipe_file):
    pruner, rows, _ = _run_with_recorder(tmp_path, recipe_file, **{"training.max_steps": 2, "pruning.schedule": {"name": "fixed"},
                                                                   "pruning.criterion": {"name": "random"}, "pruning.sparsity": 0.3})
    w = pruner.params["model.encoder.layers.0.fc1.weight"]
    kept = pruner.masks["model.encoder.layers.0.fc1.weight"]
    # a random mask prunes large weights too (a magnitude mask would not)
    assert w.abs()[kept].min() < w.abs().max() / 10
    assert rows[-1]["zeros"] == round(0.3 * pruner.size)


def test_parp_with_fix_from_step_reprunes_until_then_and_keeps_the_mask_fixed_after():
    """The control arm: PARP's re-prunes until fix_from_step, one there, then the mask of `fixed`."""
    from parpkit.testing import TINY_POOL, FakePruner, drive, tiny_model
    from parpkit_plugins.criteria import Magnitude
    from parpkit_plugins.schedules import Parp, ParpOptions

    pruner = FakePruner(tiny_model(), TINY_POOL, Magnitude(), "global")
    parp = Parp(ParpOptions(interval=2, fix_from_step=5), target=0.5)
    drive(parp, pruner, 8)
    prunes = [i for i, (name, _) in enumerate(pruner.calls) if name in ("prune", "initial_mask")]
    grads = [i for i, (name, _) in enumerate(pruner.calls) if name == "zero_pruned_grads"]
    assert len(pruner.history) == 1 + 3  # the first mask, steps 2 and 4, and the last one at step 5; none to evaluate
    assert parp.fixed and parp.last_prune_step == 5
    assert len(grads) == 3 and min(grads) > max(prunes)  # pruned gradients zeroed at steps 6, 7 and 8 only
    assert ("reset_optimizer_state", ()) in pruner.calls


def test_fix_from_step_past_max_steps_is_refused_before_anything_loads(tmp_path, capsys):
    from parpkit.cli import main
    from tests.conftest import tiny_recipe, write_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"pruning.schedule": {"name": "parp", "options": {"fix_from_step": 9}}}))
    assert main(["validate", str(path)]) == 2
    assert "pruning.schedule: fix_from_step 9 is past training.max_steps 6" in capsys.readouterr().err


def test_keep_best_chooses_only_among_points_at_the_target_sparsity(tmp_path, monkeypatch):
    """PARP-P scores points on its ramp, below the target: a less sparse model scores better there, and
    keep_best must not pick it. (Validation WER is made the model's sparsity, so the ramp's first point
    would win.)"""
    from parpkit.engine import lifecycle
    from parpkit.masks import model_zero_fraction

    real = lifecycle.evaluate

    def evaluate(backbone, dataset, model, utts, progress, label, *a, **k):
        rates = real(backbone, dataset, model, utts, progress, label, *a, **k)
        return {**rates, "wer": model_zero_fraction(model)} if label.startswith("validating") else rates

    monkeypatch.setattr(lifecycle, "evaluate", evaluate)
    result = parpkit.run(tiny_recipe(**{
        "training.max_steps": 6, "evaluation.every_steps": 2, "evaluation.keep_best": True,
        "pruning.schedule": {"name": "parp_progressive", "options": {"start": 0.1, "ramp_steps": 4, "interval": 2}}}),
        output_dir=tmp_path / "out", progress=False)
    curve = result.metrics["curve"]
    assert [p["step"] for p in curve] == [2, 4, 6]
    assert [p["sparsity"] for p in curve] == pytest.approx([0.3, 0.5, 0.5])
    assert curve[0]["wer"] < min(curve[1]["wer"], curve[2]["wer"])  # the ramp's point scores best
    assert result.metrics["best"]["step"] in (4, 6)
    assert result.metrics["best"]["wer"] == min(curve[1]["wer"], curve[2]["wer"])
    assert result.final["pool_sparsity"] == pytest.approx(0.5, abs=1e-3)
