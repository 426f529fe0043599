"""The baselines as the PARP reference code runs them (jefflai108/PARP-wav2vec-PyTorch): clipping after
masking, IMP's 10% steps, PARP-P's equal steps, seeded random masks, the tri-stage LR, whisper's prompt,
and the global batch."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

import parpkit
from parpkit.cli import main
from parpkit.errors import RecipeError
from parpkit.recipe import load_recipe
from parpkit.registry import Plugins
from parpkit.resolve import resolve
from parpkit_plugins.criteria import Magnitude
from parpkit_plugins.schedules import Imp, ImpOptions, ParpProgressive, ProgressiveOptions, imp_sparsities
from tests.conftest import requires_offline, tiny_recipe, write_recipe


class Watching(Magnitude):
    """Magnitude, remembering the raw gradients it observes (before masking and clipping)."""

    name = "watching"
    raw: list[dict[str, torch.Tensor]] = []

    def observe(self, step, params):
        Watching.raw.append({n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None})


class WatchPlugin:
    @parpkit.hookimpl
    def register_criteria(self, register):
        register(Watching)


class ClippedGrads(TrainerCallback):
    """The gradients the optimizer is about to use (after clipping)."""

    def __init__(self):
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.seen.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


@requires_offline
@pytest.mark.parametrize("schedule", [{"name": "fixed"}, {"name": "omp", "options": {"dense_steps": 1}}], ids=["fixed", "omp"])
def test_fixed_masks_zero_gradients_before_a_binding_clip(tmp_path, schedule):
    """One step equals: mask the gradients, then clip; the logged grad_norm is the kept weights' norm."""
    Watching.raw = []
    clipped = ClippedGrads()
    # every parameter in the pool, so the criterion sees every gradient the clip norm counts
    recipe = tiny_recipe(**{"pruning.criterion": {"name": "watching"}, "pruning.schedule": schedule,
                            "pruning.include": [".*"], "training.max_steps": 2, "training.logging_steps": 1,
                            "training.max_grad_norm": 1e-3, "evaluation.dense": False, "evaluation.after_prune": False})
    result = parpkit.run(recipe, output_dir=tmp_path / "out", progress=False, plugins=[WatchPlugin()], callbacks=[clipped])
    masks = result.masks()
    step = len(Watching.raw) - 1  # the last update: under the fixed mask for both schedules
    raw, used = Watching.raw[step], clipped.seen[step]
    kept_norm = torch.sqrt(sum(((g * masks[n]) ** 2).sum() for n, g in raw.items())).item()
    full_norm = torch.sqrt(sum((g ** 2).sum() for g in raw.values())).item()
    assert kept_norm < 0.9 * full_norm  # pruned positions carried gradient: the order matters here
    coef = 1e-3 / (kept_norm + 1e-6)  # torch.nn.utils.clip_grad_norm_
    for name, g in raw.items():
        assert torch.allclose(used[name], g * masks[name] * coef, rtol=1e-4, atol=1e-12), name
    logged = [json.loads(line) for line in (result.run_dir / "log.jsonl").open()]
    norms = [e["grad_norm"] for e in logged if e["event"] == "train" and "grad_norm" in e]
    assert norms[step] == pytest.approx(kept_norm, rel=1e-4)


def test_imp_prunes_ten_percent_of_the_original_pool_per_round_by_default():
    imp = Imp(ImpOptions(), target=0.5)
    assert imp.options.step == 0.1
    assert imp.schedule == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert [p.name for p in imp.phases(7)] == ["round_1", "round_2", "round_3", "round_4", "round_5", "final"]
    assert imp_sparsities(0.85, step=0.1) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85])
    assert imp_sparsities(0.3, step=0.1) == pytest.approx([0.1, 0.2, 0.3])  # 0.30000000000000004 is not a 4th round


def test_imp_geometric_rounds_add_no_duplicate_last_round():
    assert imp_sparsities(0.36, fraction=0.2) == pytest.approx([0.2, 0.36])  # was [0.2, 0.36, 0.36]
    assert imp_sparsities(0.36, rounds=2) == pytest.approx([0.2, 0.36])
    assert imp_sparsities(0.6, fraction=0.3) == pytest.approx([0.3, 0.51, 0.6])
    with pytest.raises(ValueError, match="give one of step, rounds and fraction"):
        ImpOptions(step=0.1, rounds=3)


def test_parp_progressive_rises_by_equal_steps_by_default():
    s = ParpProgressive(ProgressiveOptions(start=0.1, ramp_steps=100, interval=25), target=0.5)
    assert s.options.ramp == "linear"
    assert [s.sparsity_at(t) for t in (0, 25, 50, 75, 100, 200)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.5])


@requires_offline
def test_random_masks_follow_the_recipe_seed(tmp_path):
    def masks(recipe_seed, **options):
        path = write_recipe(tmp_path / "r.yaml", tiny_recipe(seed=recipe_seed, **{"pruning.criterion": {"name": "random", "options": options}}))
        recipe, _ = load_recipe(path)
        resolved = resolve(recipe, Plugins(), str(path))
        model = resolved.backbone.load()
        from parpkit.masks import PoolPruner

        pruner = PoolPruner(model, resolved.select_pool(model), resolved.criterion, "global")
        pruner.prune(0.5)
        return pruner.masks

    m0, m1, fixed1 = masks(0), masks(1), masks(1, seed=0)
    assert any(not torch.equal(m0[k], m1[k]) for k in m0)  # two seeds, two random baselines
    assert all(torch.equal(m0[k], fixed1[k]) for k in m0)  # an explicit option seed wins


@requires_offline
def test_tri_stage_learning_rate_warms_holds_and_decays(tmp_path):
    from parpkit.lr import tri_stage

    recipe = tiny_recipe(**{"training.max_steps": 10, "training.logging_steps": 1, "training.learning_rate": 1e-2,
                            "training.lr_scheduler": "tri_stage",
                            "training.lr_scheduler_kwargs": {"phase_ratio": [0.2, 0.3, 0.5], "final_lr_scale": 0.1},
                            "evaluation.dense": False, "evaluation.after_prune": False})
    result = parpkit.run(recipe, output_dir=tmp_path / "out", progress=False)
    logged = [json.loads(line) for line in (result.run_dir / "log.jsonl").open()]
    lrs = [e["learning_rate"] for e in logged if e["event"] == "train" and "learning_rate" in e]
    f = tri_stage(10, phase_ratio=[0.2, 0.3, 0.5], init_lr_scale=0.01, final_lr_scale=0.1)
    assert lrs == pytest.approx([1e-2 * f(k) for k in range(10)])  # the Trainer logs the rate each update used
    assert lrs[0] == pytest.approx(1e-4) and lrs[2] == pytest.approx(1e-2) and lrs[-1] < lrs[5]


@pytest.mark.parametrize("schedule, kwargs, message", [
    ("bogus", {}, "unknown LR schedule 'bogus'"),
    ("tri_stage", {"phase_ratio": [0.5, 0.5]}, "three shares summing to 1"),
    ("linear", {"num_cycles": 2}, "unexpected keyword argument 'num_cycles'")])
def test_learning_rate_schedules_are_checked_when_the_recipe_loads(tmp_path, schedule, kwargs, message):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.lr_scheduler": schedule, "training.lr_scheduler_kwargs": kwargs}))
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_tri_stage_refuses_warmup_steps_it_would_ignore(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.lr_scheduler": "tri_stage", "training.warmup_steps": 5}))
    with pytest.raises(RecipeError, match=r"training: warmup_steps does not apply to lr_scheduler tri_stage.*phase_ratio"):
        load_recipe(path)
    ok = write_recipe(tmp_path / "ok.yaml", tiny_recipe(**{"training.lr_scheduler": "tri_stage", "training.warmup_steps": 0}))
    assert load_recipe(ok)[0].training.warmup_steps == 0


@requires_offline
def test_whisper_prompt_must_be_unambiguous(tmp_path, capsys):
    multilingual = tiny_recipe()
    multilingual["backbone"]["options"]["config"]["vocab_size"] = 51865
    assert main(["validate", str(write_recipe(tmp_path / "m.yaml", multilingual))]) == 2
    assert "is multilingual (vocabulary of 51865); set backbone.options.language" in " ".join(capsys.readouterr().err.split())
    english = tiny_recipe(**{"backbone.options.language": "en"})
    assert main(["validate", str(write_recipe(tmp_path / "e.yaml", english))]) == 2
    assert "is English-only" in " ".join(capsys.readouterr().err.split())
