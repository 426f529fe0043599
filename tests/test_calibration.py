"""The calibration set and what is built on it: layer-by-layer calibration through the pruned blocks, Wanda's
per-position norms, SparseGPT's dead columns, per-row counts and nested masks, N:M patterns and OWL."""

from __future__ import annotations

import json

import pytest
import torch

import parpkit
from parpkit.cli import main
from parpkit.context import RunContext, TrainingSettings
from parpkit.errors import RecipeError
from parpkit.masks import PoolPruner
from parpkit.selection import apportion, n_of_m_prune, row_counts
from parpkit.testing import TINY_POOL, FakePruner, TinyBlock, drive, tiny_batches, tiny_context, tiny_model, tiny_positions
from parpkit_plugins.activation_criteria import OwlOptions, SparseGPT, SparseGPTOptions, Wanda
from parpkit_plugins.criteria import Magnitude
from parpkit_plugins.schedules import Gmp, GmpOptions
from tests.conftest import requires_offline, tiny_recipe, write_recipe

WEIGHTS = [n for n in TINY_POOL if n.endswith("weight")]


def _weights_of(blocks: int) -> list[str]:
    return [f"layers.{i}.{fc}.weight" for i in range(blocks) for fc in ("fc1", "fc2")]


def _reference_norms(state, masks, pool, data, blocks: int, before) -> dict[str, torch.Tensor]:
    """Per-position input norms of each pool layer as a plain forward pass from the first layer measures
    them, with the pool tensors ``before(k)`` (k: the layer's place in the pool, in call order) pruned by
    their final masks: what the cached walk must give."""
    out = {}
    for k, name in enumerate(pool):
        model = tiny_model(blocks=blocks)
        model.load_state_dict(state)
        params = dict(model.named_parameters())
        for earlier in before(k):
            params[earlier].data.mul_(masks[earlier])
        context = RunContext(model, pool, training=TrainingSettings(1, 4), calibration=data, positions=tiny_positions,
                             warn=lambda _: None)
        sums: dict[str, torch.Tensor] = {}
        module = name.rpartition(".")[0]
        rows = context.capture_inputs([module], lambda m, x: sums.__setitem__(m, sums.get(m, 0) + x.double().pow(2).sum(0)))
        out[name] = (sums[module] / rows[module]).sqrt().float()
    return out


def _counted_wanda(monkeypatch, by: str, blocks: int = 3):
    """Wanda per_row at 0.5 over ``blocks`` tiny blocks walked ``by`` block or layer, counting each block's
    real forward passes (a block standing in with its kept outputs does not run)."""
    data = tiny_batches(3, 4)
    model = tiny_model(blocks=blocks)
    pool = _weights_of(blocks)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runs: list[int] = []
    forward = TinyBlock.forward
    monkeypatch.setattr(TinyBlock, "forward", lambda self, x: (runs.append(id(self)), forward(self, x))[1])
    context = RunContext(model, pool, training=TrainingSettings(1, 4), calibration=data, positions=tiny_positions,
                         warn=lambda _: None, sequential=by)
    wanda = Wanda()
    pruner = PoolPruner(model, pool, wanda, "per_row", context=context)
    pruner.prune(0.5)
    passes = [runs.count(id(b)) for b in model.layers]
    # the walk pruned layers only for the ones after them: the weights are the pruner's to change (masks applied)
    assert all(torch.equal(p.detach(), state[n] * pruner.masks[n]) for n, p in pruner.params.items())
    return wanda, pruner, passes, (state, pruner.masks, pool, data, blocks)


# --------------------------------------------------------------------------------- the calibration set

def test_the_old_calibration_batches_option_is_refused_saying_what_to_write(tmp_path, capsys):
    for name in ("wanda", "sparsegpt"):
        path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{
            "pruning.criterion": {"name": name, "options": {"calibration_batches": 4}}, "pruning.scope": "per_row"}))
        assert main(["validate", str(path)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "pruning.criterion.options: calibration_batches is no longer an option" in err
        assert "pruning.calibration: {utterances: N, split: train}" in err and "4 × 8 = 32" in err


def test_a_calibration_split_the_dataset_lacks_is_refused_before_anything_loads(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{
        "pruning.criterion": {"name": "wanda"}, "pruning.scope": "per_row", "pruning.exclude": [r".*\.bias"],
        "pruning.calibration": {"utterances": 16, "split": "nope"}}))
    assert main(["validate", str(path)]) == 2
    assert "pruning.calibration.split: synthetic_speech has no split 'nope'" in " ".join(capsys.readouterr().err.split())


def test_the_calibration_set_is_drawn_with_the_seed_whatever_the_training_batch():
    from parpkit.engine.lifecycle import calibration_set_utterances

    utts = list(range(50))
    first = calibration_set_utterances(utts, 3, 16)
    assert first == calibration_set_utterances(utts, 3, 16) and len(set(first)) == 16
    assert calibration_set_utterances(utts, 3, 24)[:16] == first  # more utterances: the same ones and then some
    assert calibration_set_utterances(utts, 4, 16) != first
    assert sorted(calibration_set_utterances(utts[:5], 3, 16)) == utts[:5]  # a small split gives all it has


def test_a_layer_that_saw_fewer_rows_than_ten_times_its_width_is_a_warning_once():
    said: list[str] = []
    model = tiny_model()
    context = tiny_context(model, batches=2, warn=said.append)  # 8 inputs to fc1, 16 to fc2: fewer than 80 / 160 rows
    context.capture_inputs(["layers.0.fc1", "layers.1.fc2"], lambda m, x: None)
    assert len(said) == 1 and "2 layers saw fewer real positions than 10 × their input width" in said[0]
    assert "layers.1.fc2" in said[0] and "for 16 inputs" in said[0] and "pruning.calibration.utterances" in said[0]
    context.capture_inputs(["layers.0.fc1"], lambda m, x: None)
    assert len(said) == 1  # named once per run
    enough = tiny_context(tiny_model(), batches=20, warn=said.append)
    enough.capture_inputs(["layers.0.fc1"], lambda m, x: None)
    assert len(said) == 1


# --------------------------------------------------------------------------------- layer by layer

def test_sequential_calibration_runs_each_block_from_cached_inputs_and_measures_it_through_the_pruned_ones(monkeypatch):
    wanda, pruner, passes, setting = _counted_wanda(monkeypatch, "block")
    # every block ran twice per batch (measured, then pruned for its outputs), the last once: never from the first again
    assert passes == [2 * 3, 2 * 3, 3]
    pool = setting[2]
    reference = _reference_norms(*setting, before=lambda k: [n for n in pool if n.split(".")[1] < pool[k].split(".")[1]])
    for name in pool:
        assert torch.allclose(wanda.norms[name], reference[name], rtol=1e-5, atol=1e-7), name


def test_calibration_by_layer_runs_each_block_once_and_measures_each_layer_through_the_pruned_layers_before_it(monkeypatch):
    wanda, pruner, passes, setting = _counted_wanda(monkeypatch, "layer")
    assert passes == [3, 3, 3]  # one pass: its outputs are already the pruned block's
    pool = setting[2]
    reference = _reference_norms(*setting, before=lambda k: pool[:k])  # pool order is call order: fc1, fc2, …
    for name in pool:
        assert torch.allclose(wanda.norms[name], reference[name], rtol=1e-5, atol=1e-7), name


class _Either(torch.nn.Module):
    """A block whose batches call its two layers in different orders (by the sign of their first input)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x) + self.b(x) if float(x.reshape(-1)[0]) > 0 else self.b(x) + self.a(x)


def test_calibration_by_layer_refuses_batches_that_call_a_blocks_layers_in_different_orders():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([_Either()])

        def forward(self, inputs, labels, lengths=None):
            return self.layers[0](inputs)

    data = tiny_batches(6, 4)
    signs = {float(b.inputs["inputs"].reshape(-1)[0]) > 0 for b in data}
    assert signs == {True, False}
    pool = ["layers.0.a.weight", "layers.0.b.weight"]
    context = RunContext(Model(), pool, training=TrainingSettings(1, 4), calibration=data, warn=lambda _: None,
                         sequential="layer")
    with pytest.raises(parpkit.ParpkitError, match="call the block's layers in one order"):
        context.sequential(["layers.0.a", "layers.0.b"], lambda m, x: None, lambda b, ms: None)
    assert all(not m._forward_pre_hooks for m in context.model.modules())

    def fail(block, members):
        raise ValueError("pruning failed")
    one_order = [b for b in data if float(b.inputs["inputs"].reshape(-1)[0]) > 0]
    context = RunContext(Model(), pool, training=TrainingSettings(1, 4), calibration=one_order, warn=lambda _: None,
                         sequential="layer")
    with pytest.raises(ValueError, match="pruning failed"):  # an error while a layer is pruned ends every batch's thread
        context.sequential(["layers.0.a", "layers.0.b"], lambda m, x: None, fail)


def test_sequential_wanda_differs_from_one_pass_over_the_unpruned_model_after_the_first_block():
    model = tiny_model(blocks=3)
    one_pass, sequential = Wanda(Wanda.Options(one_pass=True)), Wanda()
    for criterion in (one_pass, sequential):
        model_copy = tiny_model(blocks=3)
        model_copy.load_state_dict(model.state_dict())
        PoolPruner(model_copy, _weights_of(3), criterion, "per_row",
                   context=tiny_context(model_copy, _weights_of(3), warn=lambda _: None)).prune(0.5)
    assert torch.equal(one_pass.norms["layers.0.fc1.weight"], sequential.norms["layers.0.fc1.weight"])
    assert not torch.allclose(one_pass.norms["layers.2.fc1.weight"], sequential.norms["layers.2.fc1.weight"])


def test_a_model_whose_blocks_are_containers_calibrates_layer_by_layer():
    """A numbered block the model never calls (its layers are called one by one) falls back to the layers."""
    class Loose(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"fc1": torch.nn.Linear(8, 16), "fc2": torch.nn.Linear(16, 8)})
                                              for _ in range(2))

        def forward(self, inputs, labels, lengths=None):
            x = inputs
            for layer in self.layers:
                x = x + layer["fc2"](torch.relu(layer["fc1"](x)))
            return x

    torch.manual_seed(0)
    model = Loose()
    context = RunContext(model, WEIGHTS, training=TrainingSettings(1, 4), calibration=tiny_batches(2, 4),
                         positions=tiny_positions, warn=lambda _: None)
    order = []
    context.sequential([n.rpartition(".")[0] for n in WEIGHTS], lambda m, x: None, lambda b, ms: order.append((b, ms)))
    assert order == [(m, [m]) for m in ("layers.0.fc1", "layers.0.fc2", "layers.1.fc1", "layers.1.fc2")]


# --------------------------------------------------------------------------------- wanda: norms per position

def test_wanda_norms_are_per_position_so_scores_do_not_grow_with_the_positions_a_layer_saw():
    data = tiny_batches(2, 4)
    scores = []
    for calibration in (data, data + data + data):  # three times the positions, the same statistics
        model = tiny_model()
        context = RunContext(model, WEIGHTS, training=TrainingSettings(1, 4), calibration=calibration,
                             positions=tiny_positions, warn=lambda _: None)
        wanda = Wanda()
        PoolPruner(model, WEIGHTS, wanda, "global", context=context).prune(0.5)
        scores.append({n: wanda.scores(n, dict(tiny_model().named_parameters())[n]) for n in WEIGHTS})
    for n in WEIGHTS:
        assert torch.allclose(scores[0][n], scores[1][n], rtol=1e-5)


# --------------------------------------------------------------------------------- sparsegpt

def test_sparsegpt_zeroes_the_weights_of_dead_input_columns_and_prunes_them_first():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 12, generator=g)
    dead = torch.tensor([1, 4, 9])
    X[:, dead] = 0.0  # inputs that are always zero
    param = torch.nn.Parameter(torch.randn(8, 12, generator=g) * 3)
    keep = SparseGPT(SparseGPTOptions(block_size=4)).prune_layer(param, X.T.double() @ X.double() / 300, 8 * 4, "per_row")
    assert torch.all(param[:, dead] == 0)  # the reference zeroes them: they multiply nothing
    assert not keep[:, dead].any()  # and with 4 of 12 to prune in each row, the 3 dead ones go first
    assert ((~keep).sum(1) == 4).all()


def test_sparsegpt_per_row_counts_are_per_row_not_per_column_block():
    """Each row loses its count wherever its least useful weights are, not the same number in every block."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(400, 16, generator=g)
    W = torch.randn(6, 16, generator=g)
    W[:, :8] *= 20  # the first block of columns carries the large weights
    param = torch.nn.Parameter(W.clone())
    keep = SparseGPT(SparseGPTOptions(block_size=8)).prune_layer(param, X.T.double() @ X.double() / 400, 6 * 8, "per_row")
    assert ((~keep).sum(1) == 8).all()
    assert (~keep[:, 8:]).sum() > (~keep[:, :8]).sum() + 20  # the per-block rule would have pruned 4 + 4 in each row


def test_sparsegpt_masks_are_nested_under_a_gradual_schedule():
    model = tiny_model()
    pruner = FakePruner(model, WEIGHTS, SparseGPT(SparseGPTOptions(block_size=4)), "per_row",
                        context=tiny_context(model, WEIGHTS, warn=lambda _: None))
    masks = []
    original = pruner.set_masks
    pruner.set_masks = lambda m: (masks.append({n: t.clone() for n, t in m.items()}), original(m))[1]
    gmp = Gmp(GmpOptions(initial=0.2, start_step=2, end_step=8, interval=2), target=0.75)
    gmp.phases(10)
    drive(gmp, pruner, 10)
    assert len(masks) >= 4
    for a, b in zip(masks, masks[1:]):  # a weight pruned at a lower sparsity stays pruned
        assert all(bool((b[n] <= a[n]).all()) for n in a)
    assert pruner.zero_fraction() == pytest.approx(0.75, abs=1e-3)


# --------------------------------------------------------------------------------- N:M

@pytest.mark.parametrize("pattern", [(2, 4), (4, 8)])
@pytest.mark.parametrize("make", [Magnitude, Wanda, lambda: SparseGPT(SparseGPTOptions(block_size=8))],
                         ids=["magnitude", "wanda", "sparsegpt"])
def test_n_of_m_masks_keep_exactly_n_of_every_m_consecutive_weights(pattern, make):
    n, m = pattern
    model = tiny_model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    context = tiny_context(model, WEIGHTS, pattern=pattern, warn=lambda _: None)
    pruner = PoolPruner(model, WEIGHTS, make(), "per_row", context=context, pattern=pattern)
    pruner.prune(1 - n / m)
    for name, keep in pruner.masks.items():
        rows, cols = keep.shape
        assert (keep.reshape(rows, cols // m, m).sum(2) == n).all(), name
        assert torch.all(pruner.params[name][~keep] == 0)
    if isinstance(pruner.criterion, Magnitude):  # the n largest of each group
        w = before["layers.0.fc1.weight"].abs().reshape(16, -1, m)
        kept = pruner.masks["layers.0.fc1.weight"].reshape(16, -1, m)
        assert (w.masked_fill(~kept, float("inf")).amin(2) >= w.masked_fill(kept, -1).amax(2)).all()


def test_n_of_m_selection_takes_ties_in_index_order():
    assert n_of_m_prune(torch.zeros(1, 8), 2, 4).tolist() == [[True, True, False, False] * 2]
    pinned = torch.tensor([[False, False, False, True] * 2])
    assert n_of_m_prune(torch.arange(8.0)[None], 2, 4, pinned).tolist() == [[True, False, False, True] * 2]


@pytest.mark.parametrize("changes, key, text", [
    ({"pruning.pattern": 124}, "pruning.pattern", "write pattern: '2:4'"),
    ({"pruning.pattern": "2:4"}, "pruning", "set scope: per_row"),
    ({"pruning.pattern": "2:4", "pruning.scope": "per_row", "pruning.sparsity": 0.6}, "pruning", "set sparsity: 0.5"),
    ({"pruning.pattern": "3:5", "pruning.scope": "per_row", "pruning.sparsity": 0.4}, "pruning.pattern",
     "rows whose length is not a multiple of 5"),
    ({"pruning.pattern": "2:4", "pruning.scope": "per_row", "pruning.criterion": {"name": "wanda", "options": {"owl": {}}},
      "pruning.exclude": [r".*\.bias"]}, "pruning.criterion", "use one or the other"),
    ({"pruning.criterion": {"name": "wanda", "options": {"owl": {"spread": 0.1}}}, "pruning.exclude": [r".*\.bias"]},
     "pruning.criterion", "set pruning.scope to per_row or per_tensor"),
    ({"pruning.pattern": "2:4", "pruning.scope": "per_row", "pruning.schedule": {"name": "gmp"}}, "pruning.pattern",
     "schedule 'gmp' prunes at lower sparsities on its way to the target"),
    ({"pruning.pattern": "2:4", "pruning.scope": "per_row", "pruning.schedule": {"name": "imp", "options": {"rounds": 2}}},
     "pruning.pattern", "use a schedule that prunes at one sparsity"),
])
def test_patterns_and_owl_are_checked_before_anything_loads(tmp_path, capsys, changes, key, text):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**changes))
    assert main(["validate", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{key}: " in err and text in err and "Traceback" not in err


def test_a_schedule_that_ramps_cannot_prune_in_a_pattern():
    model = tiny_model()
    pruner = PoolPruner(model, WEIGHTS, Magnitude(), "per_row", pattern=(2, 4))
    with pytest.raises(parpkit.ParpkitError, match="the 2:4 pattern prunes exactly 0.5 of every row; the schedule asked for"):
        pruner.prune(0.3)


# --------------------------------------------------------------------------------- OWL

def test_apportion_is_exact_and_respects_caps():
    assert apportion(10, [1.0, 1.0, 2.0], [100, 100, 100]) == [3, 2, 5]
    assert apportion(10, [0.0, 1.0, 9.0], [5, 5, 5]) == [0, 5, 5]
    assert sum(apportion(777, [0.3, 0.1, 0.4], [400, 300, 500])) == 777
    assert row_counts(10, 4).tolist() == [3, 3, 2, 2]


@pytest.mark.parametrize("scope", ["per_row", "per_tensor"])
@pytest.mark.parametrize("make", [lambda o: Wanda(Wanda.Options(owl=o)), lambda o: SparseGPT(SparseGPTOptions(owl=o, block_size=4))],
                         ids=["wanda", "sparsegpt"])
def test_owl_spreads_the_sparsity_over_blocks_and_keeps_the_pool_total_at_the_target(scope, make):
    model = tiny_model(blocks=4)
    with torch.no_grad():  # an outlier-heavy input feature into block 2
        model.layers[2]["fc1"].weight[:, 3] *= 40
    pool = _weights_of(4)
    criterion = make(OwlOptions(threshold=5, spread=0.1))
    pruner = PoolPruner(model, pool, criterion, scope, context=tiny_context(model, pool, warn=lambda _: None))
    pruner.prune(0.5)
    size = sum(p.numel() for p in pruner.params.values())
    assert sum(int((~m).sum()) for m in pruner.masks.values()) == round(0.5 * size)  # the pool's total, exactly
    block = [sum(int((~pruner.masks[f"layers.{b}.{fc}.weight"]).sum()) for fc in ("fc1", "fc2")) / (2 * 128)
             for b in range(4)]
    assert block[2] == min(block) and max(block) - min(block) == pytest.approx(0.2, abs=0.02)  # ± spread, outliers kept
    if scope == "per_row":  # each row loses floor or ceil of its tensor's share
        for keep in pruner.masks.values():
            per_row = (~keep).sum(1)
            assert int(per_row.max() - per_row.min()) <= 1


# --------------------------------------------------------------------------------- a run

@requires_offline
def test_a_one_shot_run_calibrates_on_its_calibration_set_and_logs_it(tmp_path):
    result = parpkit.run(tiny_recipe(**{"pruning.criterion": {"name": "sparsegpt"}, "pruning.scope": "per_row",
                                        "pruning.pattern": "2:4",
                                        "pruning.calibration": {"utterances": 6, "batch_size": 4, "sequential": "layer"},
                                        "pruning.schedule": {"name": "fixed"}, "pruning.exclude": [r".*\.bias"],
                                        "training.max_steps": 0, "evaluation.dense": False, "evaluation.after_prune": False}),
                         output_dir=tmp_path / "o", progress=False)
    events = [json.loads(line) for line in (result.run_dir / "log.jsonl").open()]
    [used] = [e for e in events if e["event"] == "calibration_set"]
    assert used["utterances"] == 6 and used["batches"] == 2 and used["split"] == "train"
    assert any(e["event"] == "warning" and "10 × their input width" in e["message"] for e in events)
    for name, keep in result.masks().items():
        assert (keep.reshape(keep.shape[0], -1, 4).sum(2) == 2).all(), name


@requires_offline
def test_a_dense_reference_run_neither_calibrates_nor_changes_a_weight(tmp_path):
    """Sparsity 0 (the zero-shot rows of the results) has nothing to rank: the calibration set is never
    forwarded, no reconstruction touches the weights, and the final model scores as the dense one."""
    result = parpkit.run(tiny_recipe(**{"pruning.criterion": {"name": "sparsegpt"}, "pruning.scope": "per_tensor",
                                        "pruning.sparsity": 0.0, "pruning.schedule": {"name": "fixed"}, "pruning.exclude": [r".*\.bias"],
                                        "training.max_steps": 0, "evaluation.after_prune": False}),
                         output_dir=tmp_path / "o", progress=False)
    events = [json.loads(line) for line in (result.run_dir / "log.jsonl").open()]
    assert not [e for e in events if e["event"] in ("calibrate", "calibration_set")]
    assert all(bool(keep.all()) for keep in result.masks().values())
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["stages"]["final"]["splits"] == metrics["stages"]["dense"]["splits"]
