"""Pruning that sees activations: the run context and its calibration contract, the per_row scope, Wanda,
SparseGPT, gradual magnitude pruning, one-shot runs, and the one preflight of validate and run."""

from __future__ import annotations

import json

import pytest
import torch

import parpkit
from parpkit.cli import main
from parpkit.errors import ParpkitError, PluginError, RecipeError
from parpkit.masks import PoolPruner
from parpkit.registry import Plugins
from parpkit.selection import PoolLayout, keep_masks
from parpkit.testing import TINY_POOL, FakePruner, drive, tiny_batches, tiny_context, tiny_model
from parpkit_plugins.activation_criteria import SparseGPT, SparseGPTOptions, Wanda
from parpkit_plugins.criteria import Magnitude
from parpkit_plugins.schedules import Gmp, GmpOptions
from tests.conftest import requires_offline, run_and_kill, same_results, tiny_recipe, write_recipe


# --------------------------------------------------------------------------------- per_row scope

def test_per_row_scope_prunes_exactly_its_share_of_every_row_and_a_bias_as_one_row():
    g = torch.Generator().manual_seed(0)
    scores = {"w": torch.rand(5, 7, generator=g), "b": torch.rand(6, generator=g),
              "ties": torch.zeros(2, 4)}
    masks, _ = keep_masks(PoolLayout({n: t.shape for n, t in scores.items()}), scores.__getitem__, 0.4, "per_row")
    assert ((~masks["w"]).sum(1) == round(0.4 * 7)).all()  # 3 of 7 in every row
    for r in range(5):  # … the lowest of that row
        pruned = scores["w"][r][~masks["w"][r]]
        assert pruned.max() < scores["w"][r][masks["w"][r]].min()
    assert int((~masks["b"]).sum()) == round(0.4 * 6)  # the bias is one row of 6
    assert (~masks["ties"]).tolist() == [[True, True, False, False]] * 2  # equal scores: the lower index goes first


# --------------------------------------------------------------------------------- the calibration contract

def test_capture_inputs_leaves_out_padding_and_removes_every_hook():
    model = tiny_model()
    context = tiny_context(model, batches=2)
    seen: dict[str, list[torch.Tensor]] = {}
    rows = context.capture_inputs(["layers.0.fc1", "layers.1.fc2"], lambda m, x: seen.setdefault(m, []).append(x), batches=2)
    real = sum(int(b.inputs["lengths"].sum()) for b in tiny_batches(2, 4))
    assert rows == {"layers.0.fc1": real, "layers.1.fc2": real}
    first = torch.cat(seen["layers.0.fc1"])
    assert first.shape == (real, 8) and first.abs().max() < 100  # the padding (filled with 100) never reached it
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert model.training  # put back as it was

    def fail(module, x):
        raise RuntimeError("observer failed")
    with pytest.raises(RuntimeError):
        context.capture_inputs(["layers.0.fc1"], fail, batches=1)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_a_module_that_sees_no_input_is_an_error_not_an_all_zero_statistic():
    model = tiny_model()
    model.unused = torch.nn.Linear(8, 8)
    context = tiny_context(model, [*TINY_POOL, "unused.weight"])
    with pytest.raises(ParpkitError, match="'unused' saw no real"):
        context.capture_inputs(["layers.0.fc1", "unused"], lambda m, x: None, batches=1)


def test_a_context_at_check_time_has_no_calibration_batches():
    context = parpkit.RunContext(tiny_model(), TINY_POOL, training=parpkit.TrainingSettings(max_steps=5, batch_size=2),
                                 loaded=False)
    assert context.max_steps == 5 and context.module_of("layers.1.fc2.bias") == ("layers.1.fc2", "bias")
    assert list(context.modules) == ["layers.0.fc1", "layers.0.fc2", "layers.1.fc1", "layers.1.fc2"]
    with pytest.raises(ParpkitError, match="only once the model is loaded"):
        context.calibration_batches(1)


# --------------------------------------------------------------------------------- wanda

def test_wanda_scores_each_weight_by_its_size_times_its_input_norm_over_real_positions():
    model = tiny_model()
    context = tiny_context(model, batches=2)
    wanda = Wanda()
    wanda.calibrate(context)
    x = torch.cat([b.inputs["inputs"][torch.arange(6)[None, :] < b.inputs["lengths"][:, None]] for b in tiny_batches(2, 4)])
    w = model.layers[0]["fc1"].weight  # the norm per position: sqrt of the mean square over the real positions
    assert torch.allclose(wanda.scores("layers.0.fc1.weight", w), w.abs() * x.norm(dim=0)[None, :] / len(x) ** 0.5, rtol=1e-5)
    bias = model.layers[0]["fc1"].bias
    assert torch.equal(wanda.scores("layers.0.fc1.bias", bias), bias.abs())
    # per_row: every row loses its share, and in a row the weight on a loud input outlives a larger one on a quiet input
    pruner = PoolPruner(model, TINY_POOL, wanda, "per_row", context=context)
    pruner.prune(0.5)
    assert ((~pruner.masks["layers.0.fc1.weight"]).sum(1) == 4).all()


# --------------------------------------------------------------------------------- sparsegpt

@pytest.mark.parametrize("scope", ["per_tensor", "per_row"])
def test_every_activation_criterion_prunes_exact_counts_and_zeroes_what_it_prunes(scope):
    for criterion in (Wanda(), SparseGPT(SparseGPTOptions(block_size=4))):
        model = tiny_model()
        pruner = PoolPruner(model, TINY_POOL, criterion, scope, context=tiny_context(model))
        pruner.prune(0.5)
        for n, p in pruner.params.items():
            assert torch.all(p[~pruner.masks[n]] == 0)  # what the mask prunes is zero
            if scope == "per_row" and p.dim() == 2:
                assert ((~pruner.masks[n]).sum(1) == p.shape[1] // 2).all()
        assert sum(int((~m).sum()) for m in pruner.masks.values()) == pruner.size // 2


@pytest.mark.parametrize("scope", ["per_tensor", "per_row"])
def test_sparsegpt_reconstructs_a_layer_almost_as_well_as_least_squares_on_its_mask_and_better_than_wanda(scope):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 32, generator=g)
    Z = torch.randn(400, 32, generator=g)
    X = Z * torch.linspace(0.2, 3, 32) + 0.5 * (Z @ torch.randn(32, 32, generator=g)) / 32 ** 0.5  # scaled, mixed inputs
    hessian = X.T.double() @ X.double() / len(X)
    param = torch.nn.Parameter(W.clone())
    keep = SparseGPT(SparseGPTOptions()).prune_layer(param, hessian, 16 * 16, scope)
    assert int((~keep).sum()) == 256 and torch.all(param[~keep] == 0)
    Y = X @ W.T
    error = float(((X @ param.detach().T - Y) ** 2).sum())
    best = sum(float(((X[:, k] @ torch.linalg.lstsq(X[:, k], Y[:, r:r + 1]).solution - Y[:, r:r + 1]) ** 2).sum())
               for r, k in enumerate(keep))  # the optimal kept weights for the same mask
    wanda = W.clone().scatter_(1, (W.abs() * X.norm(dim=0)).argsort(1)[:, :16], 0.0)
    assert best <= error <= 1.1 * best  # greedy (columns left to right, damped), so not the optimum, but near it
    assert error < 0.9 * float(((X @ wanda.T - Y) ** 2).sum())
    assert error < 0.9 * float(((X @ (W * keep).T - Y) ** 2).sum())  # the update, not only the mask, does part of the work


def test_sparsegpt_updates_match_sequential_optimal_brain_surgeon_column_by_column():
    """The blocked, Cholesky-based update equals the plain rule on the same mask: for each column in order,
    a pruned weight w_i moves the row by -w_i/[H⁻¹]ᵢᵢ · H⁻¹[:, i], then column i leaves H⁻¹."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 20, generator=g).double()
    X = torch.randn(100, 20, generator=g).double() @ torch.randn(20, 20, generator=g).double()
    hessian = X.T @ X / 100
    param = torch.nn.Parameter(W.float().clone())
    keep = SparseGPT(SparseGPTOptions(block_size=8)).prune_layer(param, hessian, 60, "per_tensor")
    damped = hessian + 0.01 * torch.diagonal(hessian).mean() * torch.eye(20, dtype=torch.float64)
    for r in range(6):
        w, hinv = W[r].clone(), torch.linalg.inv(damped)
        for i in range(20):
            if not keep[r, i]:
                w = w - w[i] / hinv[i, i] * hinv[:, i]
            hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
        assert torch.allclose(param[r].double(), w, atol=1e-4)


# --------------------------------------------------------------------------------- gmp and the ramps

def test_gmp_ramps_cubically_every_interval_and_keeps_its_masks_nested():
    model = tiny_model()
    pruner = FakePruner(model, TINY_POOL, Magnitude(), "global")
    gmp = Gmp(GmpOptions(initial=0.1, start_step=2, end_step=8, interval=2), target=0.6)
    gmp.phases(10)
    masks = []
    original = pruner.set_masks
    pruner.set_masks = lambda m: (masks.append({n: t.clone() for n, t in m.items()}), original(m))[1]
    seen = drive(gmp, pruner, 10)
    expected = [parpkit.cubic_ramp(0.1, 0.6, t) for t in (0, 2 / 6, 4 / 6, 1)]
    assert pruner.history == pytest.approx(expected)  # at step 0 (the first mask), 4, 6 and 8
    assert seen == pytest.approx([expected[0]] * 3 + [expected[1]] * 2 + [expected[2]] * 2 + [0.6] * 3)
    for a, b in zip(masks, masks[1:]):  # a magnitude ramp with a fixed mask only ever prunes more
        assert all(bool((b[n] <= a[n]).all()) for n in a)
    assert pruner.zero_fraction() >= 0.6 - 1e-3
    assert parpkit.linear_ramp(0.2, 0.6, 0.5) == pytest.approx(0.4) and parpkit.cubic_ramp(0.2, 0.6, 2.0) == 0.6


# --------------------------------------------------------------------------------- preflight: errors before anything loads

@pytest.mark.parametrize("changes, key, text", [
    ({"pruning.schedule": {"name": "gmp", "options": {"end_step": 50}}}, "pruning.schedule", "end_step 50 is past training.max_steps 6"),
    ({"pruning.schedule": {"name": "parp_progressive", "options": {"ramp_steps": 40}}}, "pruning.schedule",
     "ramp_steps 40 is past training.max_steps 6"),
    ({"pruning.criterion": {"name": "sparsegpt"}}, "pruning.scope", "ranks in scope per_tensor or per_row, not 'global'"),
    ({"pruning.schedule": {"name": "omp"}, "pruning.mask_from": "elsewhere"}, "pruning.mask_from", "takes no starting mask"),
    ({"pruning.criterion": {"name": "wanda"}, "pruning.include": [r"model\.encoder\.conv1\.weight", r".*fc1\.weight"]},
     "pruning.criterion", "belongs to a Conv1d"),
    ({"pruning.criterion": {"name": "wanda"}, "pruning.scope": "per_row"}, "pruning.criterion",
     "the pool also holds 13 bias tensors"),
])
def test_plugin_checks_fail_before_any_data_or_model_loads_with_file_and_key(tmp_path, capsys, changes, key, text):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**changes))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {key}: " in err and text in " ".join(err.split()) and "Traceback" not in err
    with pytest.raises(RecipeError, match=text.split(" ")[0]):
        parpkit.run(path, output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before the run directory (or any data or weights) existed


def test_a_third_party_check_error_is_located_and_an_unknown_hook_lists_the_known_ones(tmp_path):
    class Picky(parpkit.PruningCriterion):
        name = "picky"

        def check(self, context):
            if context.max_steps < 100:
                raise ValueError(f"needs at least 100 steps, got {context.max_steps}")

        def scores(self, name, param):
            return param.detach().abs()

    class Plugin:
        @parpkit.hookimpl
        def register_criteria(self, register):
            register(Picky)

    with pytest.raises(RecipeError, match=r"^<recipe>: pruning\.criterion: needs at least 100 steps, got 6$"):
        parpkit.run(tiny_recipe(**{"pruning.criterion": {"name": "picky"}}), output_dir=tmp_path / "o", plugins=[Plugin()],
                    progress=False)

    class Misspelled:
        @parpkit.hookimpl
        def register_criterion(self, register):  # the hook is register_criteria
            pass

    with pytest.raises(PluginError, match="register_backbones, register_criteria, register_schedules, register_datasets"):
        Plugins(extra=[(Misspelled(), "misspelled")])


# --------------------------------------------------------------------------------- real runs

@requires_offline
def test_a_one_shot_run_prunes_and_judges_without_training(tmp_path):
    result = parpkit.run(tiny_recipe(**{"pruning.criterion": {"name": "wanda"}, "pruning.calibration": {"utterances": 8},
                                        "pruning.scope": "per_row", "pruning.schedule": {"name": "fixed"},
                                        "pruning.exclude": [r".*\.bias"],
                                        "training.max_steps": 0, "evaluation.after_prune": False}),
                         output_dir=tmp_path / "o", progress=False)
    assert result.metrics["steps"] == 0 and set(result.stages) == {"dense", "final"}
    assert result.metrics["pool_pruned"] >= result.metrics["pool_parameters"] // 2
    events = [json.loads(line) for line in (result.run_dir / "log.jsonl").open()]
    assert not [e for e in events if e["event"] in ("train", "phase")]
    prune = [e for e in events if e["event"] == "prune"]
    assert len(prune) == 1 and prune[0]["seconds"] >= 0


@requires_offline
@pytest.mark.parametrize("changes", [
    {"pruning.schedule": {"name": "gmp", "options": {"initial": 0.1, "interval": 2}}},
    {"pruning.criterion": {"name": "sparsegpt", "options": {"prune_biases": True}}, "pruning.calibration": {"utterances": 4},
     "pruning.scope": "per_tensor",
     "pruning.schedule": {"name": "parp", "options": {"interval": 3}}},
], ids=["gmp", "sparsegpt-parp"])
def test_gmp_and_a_sparsegpt_parp_run_resume_after_sigkill_with_identical_masks_and_weights(tmp_path, changes):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.max_steps": 9, "training.save_steps": 3,
                                                           "evaluation.dense": False, **changes}))
    alone, killed = tmp_path / "alone", tmp_path / "killed"
    assert main(["run", str(path), "--output-dir", str(alone), "--quiet"]) == 0
    run_and_kill(path, killed)
    assert main(["run", str(path), "--output-dir", str(killed), "--quiet"]) == 0
    assert "resume" in [json.loads(line)["event"] for line in (killed / "log.jsonl").open()]
    same_results(alone, killed)
    metrics = json.loads((alone / "metrics.json").read_text())
    assert metrics["stages"]["final"]["pool_sparsity"] >= 0.5 - 1e-3
    prunes = [json.loads(line) for line in (alone / "log.jsonl").open() if '"prune"' in line]
    assert len(prunes) >= 3  # gmp: 0.1 at step 0, then the ramp; parp: first mask and the re-prunes


def test_wanda_regrowth_reads_a_checkpoint_as_the_next_re_prune_does(tmp_path):
    """benchmarks/wanda_regrowth.py rebuilds the run's calibration batches and ranks a checkpoint's weights:
    on the last checkpoint of a Wanda PARP run, its ``wanda_now`` count is what the run's own re-prune before
    evaluation let back (final mask against the mask in force), and the pretrained weights give back the
    run's first mask."""
    import subprocess
    import sys
    from pathlib import Path

    from parpkit.engine.checkpoints import read_state

    result = parpkit.run(tiny_recipe(**{"pruning.criterion": {"name": "wanda"}, "pruning.calibration": {"utterances": 8},
                                        "pruning.scope": "per_row", "pruning.exclude": [r".*\.bias"],
                                        "pruning.schedule": {"name": "parp", "options": {"interval": 3}},
                                        "training.max_steps": 5, "training.save_steps": 5,
                                        "training.keep_checkpoints_when_done": True}),
                         output_dir=tmp_path / "o", progress=False)
    [ckpt] = result.run_dir.glob("checkpoints/phase-*/checkpoint-5")
    out = tmp_path / "w.json"
    script = Path(__file__).parents[1] / "benchmarks" / "wanda_regrowth.py"
    subprocess.run([sys.executable, str(script), str(result.run_dir), "--checkpoint", str(ckpt), "--json", str(out)],
                   check=True, capture_output=True)
    got = json.loads(out.read_text())
    assert got["first_mask_reproduced"] == 1.0 and got["step"] == 5
    in_force = {n: m.bool() for n, m in read_state(ckpt)["pruner"]["masks"].items()}
    final = result.masks()
    assert got["zeroed"] == sum(int((~m).sum()) for m in in_force.values()) > 0
    assert got["come_back"]["wanda_now"] == sum(int((final[n] & ~in_force[n]).sum()) for n in final)
    assert got["come_back"]["wanda_now"] > 0  # at lr 1e-2 the zeroed weights of this tiny model do come back
    # the bars (each row's threshold over the input's norm) are the ones the re-prune used
    assert got["zeroed_at_or_over_their_bar"] == got["come_back"]["wanda_now"]


def test_a_structured_criterion_that_needs_activations_is_calibrated_before_every_prune():
    from parpkit import StructuredCriterion, ffn_group

    class QuietNeurons(StructuredCriterion):
        """Prune the FFN neurons whose outputs (fc2's inputs) carry the least over the calibration set."""
        name = "quiet_neurons"
        needs = "activations"

        def __init__(self, options=None, **kw):
            super().__init__(options, **kw)
            self.calls, self.energy = 0, {}

        def calibrate(self, context):
            self.calls += 1
            sums = {}
            rows = context.capture_inputs(["layers.0.fc2", "layers.1.fc2"],
                                          lambda m, x: sums.__setitem__(m, sums.get(m, 0) + x.abs().sum(0)))
            self.energy = {m: sums[m] / rows[m] for m in sums}

        def unit_scores(self, group, params):
            return self.energy[group.name.replace("fc1", "fc2")]

    model = tiny_model()
    context = tiny_context(model, scope="per_tensor")
    groups = [ffn_group(model, f"layers.{i}.fc1", f"layers.{i}.fc1", f"layers.{i}.fc2") for i in range(2)]
    criterion = QuietNeurons()
    pruner = PoolPruner(model, list(TINY_POOL), criterion, "per_tensor", groups=groups, context=context)
    pruner.prune(0.5)
    assert criterion.calls == 1
    for i in range(2):
        energy = criterion.energy[f"layers.{i}.fc2"]
        quiet = set(torch.argsort(energy)[: energy.numel() // 2].tolist())
        pruned_rows = {r for r in range(energy.numel()) if not pruner.masks[f"layers.{i}.fc1.weight"][r].any()}
        assert pruned_rows == quiet  # the units chosen from what calibrate measured
    pruner.prune(0.5)
    assert criterion.calls == 2
