"""Schedules on a real (tiny, random-initialised) whisper fine-tuned through the engine."""

import pytest
import torch
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


def _log(run_dir, event: str) -> list[dict]:
    import json

    return [row for row in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if row.get("event") == event]


class MicroBatches(TrainerCallback):
    """Counts forward/backward passes: every micro-batch ends in ``on_substep_end`` but the last of an update,
    which ends in ``on_step_end``."""

    def __init__(self):
        self.sub, self.updates = 0, 0

    def on_substep_end(self, args, state, control, **kw):
        self.sub += 1

    def on_step_end(self, args, state, control, **kw):
        self.updates += 1


def test_parp_reprunes_every_interval_optimizer_updates_not_micro_batches_under_accumulation(tmp_path, recipe_file):
    """Two micro-batches of 2 per update: the interval (3) counts updates, the schedule sees each update's
    gradients once (complete), and the log's prune rows carry the weights each re-prune let back."""
    path = recipe_file(**{"training.max_steps": 6, "training.batch_size": 2, "training.gradient_accumulation_steps": 2,
                          "pruning.schedule.options": {"interval": 3}})
    recipe, mapping = load_recipe(path)
    resolved = resolve(recipe, Plugins(), str(path))
    seen, original = [], resolved.schedule.on_gradients
    resolved.schedule.on_gradients = lambda step, pruner: (seen.append(step), original(step, pruner))
    counter = MicroBatches()
    metrics = run(resolved, QUIET, output_dir=tmp_path / "run", resolved_mapping=mapping, callbacks=[counter])
    assert (counter.updates, counter.sub) == (6, 6)  # 12 micro-batches, 6 updates
    assert seen == [0, 1, 2, 3, 4, 5]  # once per update, after its last micro-batch
    assert metrics["batch"]["global"] == 4 and metrics["prunes"] == 4  # the first mask, steps 3 and 6, before judging
    prunes = _log(tmp_path / "run", "prune")
    assert [p["step"] for p in prunes] == [0, 3, 6, 6] and prunes[3]["before_scoring"]  # the last: before scoring
    assert prunes[0]["regrown"] is None and all(isinstance(p["regrown"], int) for p in prunes[1:]) and prunes[1]["regrown"] > 0


def test_fixed_masks_hold_at_every_update_under_accumulation(tmp_path, recipe_file):
    pruner, rows, metrics = _run_with_recorder(tmp_path, recipe_file, **{
        "training.max_steps": 4, "training.batch_size": 2, "training.gradient_accumulation_steps": 2,
        "pruning.schedule": {"name": "fixed"}})
    target = round(0.5 * pruner.size)
    assert len(rows) == 4 and all(r["regrown"] == 0 and r["zeros"] == target for r in rows)
    assert metrics["pool_pruned"] == target


class Weights(TrainerCallback):
    """After every update: copies of a few weights, and which of them the optimizer holds state for."""

    NAMES = ("model.encoder.layers.0.fc1.weight", "model.encoder.layers.0.self_attn_layer_norm.weight",
             "model.decoder.layers.0.fc2.bias", "model.decoder.embed_tokens.weight")  # the last is proj_out's (tied)

    def __init__(self):
        self.rows = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        params = dict(model.named_parameters())
        state_of = getattr(optimizer, "optimizer", optimizer).state
        self.rows.append({n: (params[n].detach().clone(), params[n] in state_of) for n in self.NAMES})


def test_frozen_transformer_start_trains_only_the_output_layer_for_its_updates(tmp_path, recipe_file):
    """freeze_transformer_steps 3 under accumulation: updates 1-3 move only whisper's output projection (tied
    to the token embedding); the blocks, layer norms and biases start moving, and get optimizer state, at
    update 4. PARP's re-prune at update 3 finds the mask where it was; the frozen updates count."""
    path = recipe_file(**{"training.max_steps": 6, "training.batch_size": 2, "training.gradient_accumulation_steps": 2,
                          "training.freeze_transformer_steps": 3, "training.lr_scheduler": "constant",
                          "pruning.schedule.options": {"interval": 3}})
    recipe, mapping = load_recipe(path)
    resolved = resolve(recipe, Plugins(), str(path))
    weights = Weights()
    run(resolved, QUIET, output_dir=tmp_path / "run", resolved_mapping=mapping, callbacks=[weights])
    rows = weights.rows
    assert len(rows) == 6
    for name in Weights.NAMES[:3]:
        assert all(torch.equal(rows[0][name][0], rows[k][name][0]) for k in (1, 2)), name  # frozen through update 3
        assert not any(rows[k][name][1] for k in (0, 1, 2)), name  # … with no optimizer state
        assert not torch.equal(rows[2][name][0], rows[3][name][0]) and rows[3][name][1], name  # moving from update 4
    proj = "model.decoder.embed_tokens.weight"
    assert all(not torch.equal(rows[k][proj][0], rows[k + 1][proj][0]) for k in range(5)) and rows[0][proj][1]
    freeze, thaw = _log(tmp_path / "run", "freeze"), _log(tmp_path / "run", "thaw")
    assert [(f["step"], f["until"]) for f in freeze] == [(0, 3)] and [t["step"] for t in thaw] == [3]
    assert freeze[0]["frozen"] == thaw[0]["thawed"] > 0
    prunes = _log(tmp_path / "run", "prune")
    assert [(p["step"], p["regrown"]) for p in prunes[:2]] == [(0, None), (3, 0)]  # nothing moved while frozen
    assert prunes[2]["step"] == 6 and prunes[2]["regrown"] > 0


def test_a_frozen_start_must_end_before_training_does_and_runs_in_one_process(tmp_path, capsys, monkeypatch):
    from parpkit.cli import main
    from parpkit.engine.lifecycle import check_this_machine
    from tests.conftest import write_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.freeze_transformer_steps": 6}))
    assert main(["validate", str(path)]) == 2
    assert "freeze_transformer_steps 6 is not below max_steps 6" in capsys.readouterr().err
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.freeze_transformer_steps": 2}))
    assert main(["validate", str(path)]) == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    recipe, _ = load_recipe(path)
    with pytest.raises(parpkit.ParpkitError, match="not supported under several processes"):
        check_this_machine(resolve(recipe, Plugins(), str(path)))


def _first_update(tmp_path, recipe_file, name, **changes):
    path = recipe_file(**{"training.max_steps": 1, "training.logging_steps": 1, "training.learning_rate": 1e-5,
                          "training.group_by_length": False, "pruning.schedule": {"name": "fixed"}, **changes})
    recipe, mapping = load_recipe(path)
    run(resolve(recipe, Plugins(), str(path)), QUIET, output_dir=tmp_path / name, resolved_mapping=mapping)
    (row,) = [r for r in _log(tmp_path / name, "train") if "grad_norm" in r]  # not the phase's summary
    return row


def test_accumulated_micro_batches_give_the_mean_loss_and_gradient_not_their_sum(tmp_path, recipe_file):
    """One update of the same 4 utterances, as one batch of 4 or as 2 micro-batches of 2: the logged loss and
    the gradient norm are a mean either way (whisper's forward takes **kwargs, so the Trainer, given a token
    count, had summed the micro-batches' mean losses: both twice as large under 2 micro-batches)."""
    whole = _first_update(tmp_path, recipe_file, "whole", **{"training.batch_size": 4})
    split = _first_update(tmp_path, recipe_file, "split", **{"training.batch_size": 2,
                                                             "training.gradient_accumulation_steps": 2})
    assert split["loss"] == pytest.approx(whole["loss"], rel=0.25)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=0.25)
