import pytest
import torch

from parpkit.errors import RecipeError
from parpkit.masks import PoolPruner, compute_masks, select_pool
from parpkit.selection import per_tensor_counts
from parpkit_plugins.criteria import Magnitude, Random, RandomOptions
from tests.conftest import requires_offline


def _scores(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(7, 13, generator=g), "b": torch.randn(5, generator=g), "c": torch.randn(3, 3, 3, generator=g)}


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.33, 0.5, 0.77, 0.999])
def test_mask_prunes_exactly_round_s_n(scope, s):
    scores = _scores()
    n = sum(t.numel() for t in scores.values())
    masks = compute_masks(scores, s, scope)
    assert {k: m.shape for k, m in masks.items()} == {k: t.shape for k, t in scores.items()}
    assert sum(int((~m).sum()) for m in masks.values()) == round(s * n)


def test_global_mask_prunes_the_smallest_scores():
    scores = _scores()
    masks = compute_masks(scores, 0.4, "global")
    kept = torch.cat([scores[k][masks[k]] for k in scores])
    pruned = torch.cat([scores[k][~masks[k]] for k in scores])
    assert pruned.max() <= kept.min()


def test_per_tensor_scope_prunes_each_tensor_at_its_share():
    scores = _scores()
    masks = compute_masks(scores, 0.5, "per_tensor")
    for k, t in scores.items():
        n_pruned = int((~masks[k]).sum())
        assert n_pruned in (int(0.5 * t.numel()), int(0.5 * t.numel()) + 1)
        assert t[~masks[k]].max() <= t[masks[k]].min()


def test_ties_are_broken_deterministically_and_exactly():
    scores = {"x": torch.ones(10), "y": torch.ones(6)}
    masks = compute_masks(scores, 0.5, "global")
    assert int((~masks["x"]).sum()) + int((~masks["y"]).sum()) == 8
    # lower flat index goes first: all of x's first 8 positions
    assert (~masks["x"]).tolist() == [True] * 8 + [False] * 2
    assert masks["y"].all()
    again = compute_masks({"x": torch.ones(10), "y": torch.ones(6)}, 0.5, "global")
    assert all(torch.equal(masks[k], again[k]) for k in masks)


def test_per_tensor_counts_sum_to_the_global_total():
    sizes = [3, 3, 3, 1, 7]
    for s in (0.1, 0.25, 0.5, 0.9):
        counts = per_tensor_counts(sizes, s)
        assert sum(counts) == round(s * sum(sizes))
        assert all(int(s * n) <= c <= int(s * n) + 1 for c, n in zip(counts, sizes, strict=True))


def test_random_criterion_is_fixed_per_seed_and_name():
    w = torch.zeros(4, 4)
    r0 = Random(RandomOptions(seed=0))
    assert torch.equal(r0.scores("a", w), r0.scores("a", w))
    assert not torch.equal(r0.scores("a", w), r0.scores("b", w))
    assert not torch.equal(r0.scores("a", w), Random(RandomOptions(seed=1)).scores("a", w))


def test_pruner_zeroes_in_place_without_new_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    names_before = [n for n, _ in model.named_parameters()]
    pruner = PoolPruner(model, ["0.weight", "2.weight"], Magnitude(), "global")
    pruner.prune(0.5)
    assert [n for n, _ in model.named_parameters()] == names_before  # no weight_orig, no buffers
    assert not list(model.buffers())
    assert pruner.zero_fraction() == pytest.approx(48 / 96)
    assert int((model[0].weight == 0).sum() + (model[2].weight == 0).sum()) == 48
    assert not (model[0].bias == 0).any()


def test_select_pool_rejects_a_pattern_that_matches_nothing():
    names = ["enc.layers.0.fc1.weight", "enc.layers.0.fc1.bias", "enc.norm.weight"]
    assert select_pool(names, [r"enc\.layers\.\d+\.fc1\.weight"]) == ["enc.layers.0.fc1.weight"]
    assert select_pool(names, [r".*fc1.*"], [r".*bias"]) == ["enc.layers.0.fc1.weight"]
    with pytest.raises(RecipeError, match=r"pruning.include\[1\].*matches no parameter"):
        select_pool(names, [r".*fc1.*", r".*fc_1.*"], file="r.yaml")
    with pytest.raises(RecipeError, match=r"pruning.exclude\[0\]"):
        select_pool(names, [r".*fc1.*"], ["nothing"], file="r.yaml")


def test_structured_unit_selection_is_exact_and_keeps_one_unit_per_group():
    from parpkit.units import Member, UnitGroup, select_units, unit_masks

    groups = {f"l{i}": UnitGroup(f"l{i}", "ffn", 4, 1, (Member(f"up{i}", 0), Member(f"down{i}", 1))) for i in range(3)}
    groups["h"] = UnitGroup("h", "heads", 2, 3, (Member("q", 0), Member("o", 1)))
    scores = {"l0": torch.tensor([0.1, 0.2, 0.3, 0.4]), "l1": torch.tensor([5.0, 6, 7, 8]), "l2": torch.tensor([0.0, 0.05, 9, 9]),
              "h": torch.tensor([1.0, 2.0])}
    pruned = select_units(scores, groups, 0.5, "global")
    # 6 of 12 neurons, lowest first, but l0 keeps its best one; heads ranked apart from neurons
    assert sum(int(p.sum()) for n, p in pruned.items() if n != "h") == 6
    assert pruned["l0"].tolist() == [True, True, True, False] and pruned["l2"].tolist() == [True, True, False, False]
    assert pruned["l1"].tolist() == [True, False, False, False]
    assert pruned["h"].tolist() == [True, False]
    per_layer = select_units(scores, groups, 0.5, "per_tensor")
    assert all(int(p.sum()) == g.units // 2 for (n, p), g in zip(per_layer.items(), groups.values(), strict=True))
    shapes = {"up0": torch.Size([4, 5]), "down0": torch.Size([5, 4]), "up1": torch.Size([4, 5]), "down1": torch.Size([5, 4]),
              "up2": torch.Size([4, 5]), "down2": torch.Size([5, 4]), "q": torch.Size([6, 5]), "o": torch.Size([5, 6])}
    masks = unit_masks(pruned, groups, shapes)
    assert masks["up0"][:3].sum() == 0 and masks["up0"][3].all() and masks["down0"][:, :3].sum() == 0
    assert masks["q"][:3].sum() == 0 and masks["q"][3:].all() and masks["o"][:, :3].sum() == 0 and masks["o"][:, 3:].all()


def test_structured_unit_counts_round_down_so_no_kind_exceeds_the_target():
    from parpkit.units import Member, UnitGroup, select_units

    groups = {f"l{i}": UnitGroup(f"l{i}", "ffn", 3, 1, (Member(f"up{i}", 0),)) for i in range(2)}
    groups.update({f"h{i}": UnitGroup(f"h{i}", "heads", 2, 4, (Member(f"q{i}", 0),)) for i in range(3)})
    scores = {n: torch.arange(g.units, dtype=torch.float32) + i for i, (n, g) in enumerate(groups.items())}
    per_layer = select_units(scores, groups, 0.5, "per_tensor")
    assert [int(per_layer[f"l{i}"].sum()) for i in range(2)] == [1, 1]  # 1 of 3 (0.33), not round(1.5) = 2 (0.67)
    glob = select_units(scores, groups, 0.3, "global")
    assert sum(int(glob[f"h{i}"].sum()) for i in range(3)) == 1  # 1 of 6 heads: round(1.8) = 2 would be 0.33 > 0.3
    assert sum(int(glob[f"l{i}"].sum()) for i in range(2)) == 1  # floor(0.3 * 6) = 1
    assert int(select_units({"l": torch.arange(100.0)}, {"l": UnitGroup("l", "ffn", 100, 1, (Member("u", 0),))}, 0.29,
                            "per_tensor")["l"].sum()) == 29  # 0.29 * 100 = 28.999999999999996: not 28


@requires_offline
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_structured_pruning_never_exceeds_the_target_on_the_tiny_model(tmp_path, scope):
    from parpkit.recipe import load_recipe
    from parpkit.registry import Plugins
    from parpkit.resolve import resolve
    from parpkit.units import restrict
    from tests.conftest import tiny_recipe, write_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"pruning.criterion": {"name": "structured"}, "pruning.scope": scope}))
    r = resolve(load_recipe(path)[0], Plugins(), str(path))
    model = r.backbone.load()
    pool = r.select_pool(model)
    groups = restrict(r.backbone.structured_groups(model), set(pool))
    reached = []
    for sparsity in (0.1, 0.3, 0.5, 0.7, 0.9):
        pruner = PoolPruner(model, pool, r.criterion, scope, groups=groups)
        pruner.prune(sparsity)
        reached.append(sum(int((~m).sum()) for m in pruner.masks.values()) / pruner.size)
    assert all(share <= sparsity for share, sparsity in zip(reached, (0.1, 0.3, 0.5, 0.7, 0.9), strict=True)), reached
    assert reached[2] == pytest.approx(0.493, abs=1e-3)  # 0.5: half of every kind; the output biases stay


# ------------------------------------------------------------------------------------------ fast selection

def _reference(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: a stable sort by score, the first k positions."""
    prune = torch.zeros(flat.numel(), dtype=torch.bool)
    prune[torch.sort(flat, stable=True).indices[:k]] = True
    return prune


def _tied_pool(seed: int, n: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "integers":  # a few distinct values: ties everywhere
        return torch.randint(0, 5, (n,), generator=g).float()
    if kind == "zeros":  # a re-prune: most of the pool exactly zero, the rest |randn|
        x = torch.randn(n, generator=g).abs()
        x[torch.rand(n, generator=g) < 0.6] = 0
        return x
    if kind == "equal":
        return torch.full((n,), 0.25)
    return torch.randn(n, generator=g)  # signed, as movement scores are


@pytest.mark.parametrize("kind", ["integers", "zeros", "equal", "signed"])
@pytest.mark.parametrize("n", [1, 7, 1000, 70_001])
def test_selection_equals_a_stable_sort_with_many_ties(kind, n):
    from parpkit.selection import _mask_without_sync, kth_smallest, lowest_k

    flat = _tied_pool(n, n, kind)
    for k in sorted({0, 1, n // 3, n // 2, (6 * n) // 10, n - 1, n}):
        expected = _reference(flat, k)
        assert torch.equal(lowest_k(flat, k), expected), (kind, n, k)
        if 0 < k < n:  # the CUDA path (no host sync) gives the same mask, run here on the CPU
            got = _mask_without_sync(flat, kth_smallest(flat, k), k, torch.empty(n, dtype=torch.bool))
            assert torch.equal(got, expected), (kind, n, k)


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_pool_masks_equal_the_sort_reference_for_both_scopes(scope):
    g = torch.Generator().manual_seed(3)
    shapes = {"a": (64, 130), "b": (130,), "c": (7, 9, 11), "d": (1,), "e": (300, 300)}
    scores = {n: torch.randint(0, 9, s, generator=g).float() * (torch.rand(s, generator=g) < 0.7) for n, s in shapes.items()}
    for s in (0.0, 0.3, 0.5, 0.77, 0.95):
        masks = compute_masks(scores, s, scope)
        if scope == "global":
            flat = torch.cat([t.reshape(-1) for t in scores.values()])
            expected = (~_reference(flat, round(s * flat.numel()))).split([t.numel() for t in scores.values()])
        else:
            counts = per_tensor_counts([t.numel() for t in scores.values()], s)
            expected = [~_reference(t.reshape(-1), k) for t, k in zip(scores.values(), counts, strict=True)]
        for (name, mask), want in zip(masks.items(), expected, strict=True):
            assert mask.shape == scores[name].shape and torch.equal(mask.reshape(-1), want), (scope, s, name)


def test_mask_upkeep_zeroes_weights_and_gradients_exactly():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    pruner = PoolPruner(model, ["0.weight", "0.bias", "1.weight"], Magnitude(), "global")
    pruner.prune(0.5)
    model(torch.randn(3, 8)).sum().backward()
    pruner.zero_pruned_grads()
    for n, p in pruner.params.items():
        assert not p[~pruner.masks[n]].any() and not p.grad[~pruner.masks[n]].any()
        assert p.grad[pruner.masks[n]].abs().sum() > 0
    assert pruner.zero_fraction() == pytest.approx(0.5, abs=1 / pruner.size)


def test_lowest_k_rows_is_a_stable_sort_per_row_for_one_count_or_one_per_row():
    """The CPU's threshold-per-row selection against the rule itself (a stable sort of every row): ties,
    -inf, every count, counts that differ by one between rows and counts that differ more."""
    from parpkit.selection import lowest_k_rows

    def rule(s, k):
        order = torch.argsort(s, dim=1, stable=True)
        k = torch.full((s.shape[0],), k) if isinstance(k, int) else k
        return torch.zeros(s.shape, dtype=torch.bool).scatter_(1, order, torch.arange(s.shape[1])[None] < k[:, None])

    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        rows, cols = torch.randint(1, 12, (2,), generator=g).tolist()
        s = torch.randint(0, 3, (rows, cols), generator=g).float() if trial % 2 else torch.randn(rows, cols, generator=g)
        s[0, 0] = float("-inf") if trial % 3 == 0 else s[0, 0]
        k = int(torch.randint(0, cols + 1, (1,), generator=g))
        assert torch.equal(lowest_k_rows(s, k), rule(s, k))
        by_one = torch.randint(max(0, k - 1), k + 1, (rows,), generator=g).clamp(max=cols)
        assert torch.equal(lowest_k_rows(s, by_one), rule(s, by_one))
        anything = torch.randint(0, cols + 1, (rows,), generator=g)
        assert torch.equal(lowest_k_rows(s, anything), rule(s, anything))
