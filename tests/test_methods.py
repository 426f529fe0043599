"""The method family on tiny random-initialised whisper and wav2vec2: sparsity at every stage."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from parpkit.cli import main
from parpkit.engine import run
from parpkit.progress import QUIET
from parpkit.recipe import load_recipe
from parpkit.registry import Plugins
from parpkit.resolve import resolve
from tests.conftest import requires_offline, tiny_ctc_recipe, tiny_recipe, write_recipe

pytestmark = requires_offline


def _events(out, kind):
    return [e for e in map(json.loads, (out / "log.jsonl").open()) if e["event"] == kind]


def _prunes(out):
    return _events(out, "prune")


def _run(tmp_path, mapping, name="out"):
    path = write_recipe(tmp_path / f"{name}.yaml", mapping)
    out = tmp_path / name
    assert main(["run", str(path), "--output-dir", str(out), "--quiet"]) == 0
    return out, json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("make", [tiny_recipe, tiny_ctc_recipe], ids=["whisper", "wav2vec2"])
def test_parp_progressive_ramps_to_the_target(tmp_path, make):
    out, metrics = _run(tmp_path, make(**{
        "pruning.schedule": {"name": "parp_progressive", "options": {"interval": 2, "start": 0.1, "ramp": "linear", "ramp_steps": 6}},
        "pruning.sparsity": 0.7, "training.max_steps": 8}))
    prunes = _prunes(out)
    steps = [p["step"] for p in prunes]
    sparsity = [round(p["sparsity"], 6) for p in prunes]
    assert steps == [0, 2, 4, 6, 8, 8]  # the last: the re-prune before scoring
    assert sparsity == [0.1, round(0.1 + 0.6 * 2 / 6, 6), round(0.1 + 0.6 * 4 / 6, 6), 0.7, 0.7, 0.7]
    assert [p.get("before_scoring", False) for p in prunes] == [False] * 5 + [True]
    for p in prunes:  # right after each re-prune the pool is at that step's sparsity
        assert p["pool_zero_fraction"] == pytest.approx(p["sparsity"], abs=1 / metrics["pool_parameters"])
    assert metrics["stages"]["after_prune"]["pool_sparsity"] == pytest.approx(0.1, abs=0.02)
    assert abs(metrics["pool_pruned"] - round(0.7 * metrics["pool_parameters"])) <= 1


def test_cubic_ramp_shape():
    from parpkit_plugins.schedules import ParpProgressive, ProgressiveOptions

    s = ParpProgressive(ProgressiveOptions(start=0.0, ramp="cubic", ramp_steps=100), target=0.8)
    values = [s.sparsity_at(t) for t in (0, 25, 50, 100, 150)]
    assert values[0] == 0 and values[-2] == values[-1] == pytest.approx(0.8)
    assert values[1] == pytest.approx(0.8 * (1 - 0.75 ** 3))
    assert values[1] - values[0] > values[2] - values[1]  # fast first, slow near the target


@pytest.mark.parametrize("make", [tiny_recipe, tiny_ctc_recipe], ids=["whisper", "wav2vec2"])
def test_omp_rewinds_to_pretrained_weights_with_the_fine_tuned_mask(tmp_path, make):
    recipe = make(**{"pruning.schedule": {"name": "omp", "options": {"dense_steps": 3}}, "training.max_steps": 3,
                     "training.learning_rate": 1e-2})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    r, mapping = load_recipe(path)
    resolved = resolve(r, Plugins(), str(path))
    seen = {}
    original = resolved.schedule.on_phase_end

    def spy(index, pruner):
        if index == 0:
            seen["finetuned"] = {n: p.detach().clone() for n, p in pruner.params.items()}
        original(index, pruner)
        if index == 0:
            seen["rewound"] = {n: p.detach().clone() for n, p in pruner.params.items()}
            seen["pretrained"] = {n: pruner.snapshots["pretrained"][n] for n in pruner.params}
            seen["masks"] = {n: m.clone() for n, m in pruner.masks.items()}

    resolved.schedule.on_phase_end = spy
    metrics = run(resolved, QUIET, output_dir=tmp_path / "out", resolved_mapping=mapping)
    assert [p["name"] for p in metrics["phases"]] == ["dense", "final"]
    assert set(metrics["stages"]) == {"dense", "dense_finetuned", "final"}  # no mask before the dense fine-tune
    assert metrics["stages"]["dense_finetuned"]["pool_sparsity"] < 0.5
    n = sum(m.numel() for m in seen["masks"].values())
    assert sum(int((~m).sum()) for m in seen["masks"].values()) == round(0.5 * n)
    for name, mask in seen["masks"].items():
        # the mask ranks the fine-tuned weights ...
        ft = seen["finetuned"][name].abs()
        if mask.any() and (~mask).any():
            assert ft[~mask].max() <= ft[mask].min() or name.endswith("bias")
        # ... and training restarts from the pretrained values at unpruned positions, zero elsewhere
        assert torch.equal(seen["rewound"][name][mask], seen["pretrained"][name][mask])
        assert not seen["rewound"][name][~mask].any()
    final = load_file(str(tmp_path / "out" / "masks.safetensors"))
    assert all(torch.equal(final[n], seen["masks"][n]) for n in final)  # fixed during the final fine-tune


@pytest.mark.parametrize("make", [tiny_recipe, tiny_ctc_recipe], ids=["whisper", "wav2vec2"])
def test_imp_rounds_reach_the_target_and_save_each_mask(tmp_path, make):
    out, metrics = _run(tmp_path, make(**{
        "pruning.schedule": {"name": "imp", "options": {"fraction": 0.3, "round_steps": 2, "rewind": "step:1"}},
        "pruning.sparsity": 0.6, "training.max_steps": 2, "training.keep_checkpoints_when_done": True}))
    expected = [1 - 0.7, 1 - 0.7 ** 2, 0.6]  # 30% of the remaining each round, the last clamped to the target
    phases = [p["name"] for p in metrics["phases"]]
    assert phases == ["round_1", "round_2", "round_3", "final"]
    prunes = _prunes(out)
    assert [round(p["sparsity"], 6) for p in prunes] == [round(s, 6) for s in expected]
    n = metrics["pool_parameters"]
    for r, s in enumerate(expected, 1):
        mask = load_file(str(out / f"masks_round_{r}.safetensors"))
        assert sum(int((~m).sum()) for m in mask.values()) == round(s * n)
    # masks are nested: what a round pruned stays pruned
    m1, m2 = (load_file(str(out / f"masks_round_{r}.safetensors")) for r in (1, 2))
    assert all(not (m2[k] & ~m1[k]).any() for k in m1)
    # round r is evaluated at the sparsity of the round before
    assert metrics["stages"]["round_1"]["pool_sparsity"] < 0.1
    assert metrics["stages"]["round_2"]["pool_sparsity"] == pytest.approx(expected[0], abs=0.01)
    assert metrics["stages"]["round_3"]["pool_sparsity"] == pytest.approx(expected[1], abs=0.01)
    assert abs(metrics["pool_pruned"] - round(0.6 * n)) <= 1
    # the rewind point travels with the pruner's state in every later checkpoint
    state = json.loads((out / "checkpoints" / "phase-0" / "end" / "parpkit_state.json").read_text())
    assert set(state["pruner"]["snapshots"]) == {"rewind"}


def test_imp_options_are_checked(tmp_path, recipe_file):
    from parpkit.errors import RecipeError

    path = recipe_file(**{"pruning.schedule": {"name": "imp", "options": {"fraction": 0.2, "rounds": 3}}})
    with pytest.raises(RecipeError, match="pruning.schedule.options: give one of step, rounds and fraction, not rounds and fraction"):
        resolve(load_recipe(path)[0], Plugins(), str(path))


@pytest.mark.parametrize("make", [tiny_recipe, tiny_ctc_recipe], ids=["whisper", "wav2vec2"])
def test_mask_from_reproduces_the_donor_mask(tmp_path, make):
    donor, _ = _run(tmp_path, make(**{"pruning.schedule": {"name": "parp", "options": {"interval": 2}}, "training.max_steps": 4}), "donor")
    out, metrics = _run(tmp_path, make(**{"pruning.schedule": {"name": "fixed"}, "pruning.mask_from": str(donor),
                                          "training.max_steps": 3, "dataset.options.seed": 5}), "taker")
    a, b = load_file(str(donor / "masks.safetensors")), load_file(str(out / "masks.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_mask_from_with_another_shape_lists_the_differences(tmp_path, capsys):
    donor, _ = _run(tmp_path, tiny_recipe(**{"training.max_steps": 1}), "donor")
    bigger = tiny_recipe(**{"pruning.schedule": {"name": "fixed"}, "pruning.mask_from": str(donor)})
    bigger["backbone"]["options"]["config"]["encoder_ffn_dim"] = 48
    path = write_recipe(tmp_path / "b.yaml", bigger)
    assert main(["run", str(path), "--output-dir", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pruning.mask_from" in err and "model.encoder.layers.0.fc1.weight: shape (32, 16) in the donor, (48, 16) here" in err.replace("\n", "")


def test_mask_from_of_another_scope_is_refused_before_anything_loads(tmp_path, capsys):
    donor, _ = _run(tmp_path, tiny_recipe(**{"training.max_steps": 1}), "donor")  # scope: global
    shares = [float((~m).float().mean()) for m in load_file(str(donor / "masks.safetensors")).values()]
    assert max(shares) - min(shares) > 0.01  # global: 50% over the pool, not in each tensor
    taker = write_recipe(tmp_path / "t.yaml", tiny_recipe(**{"pruning.schedule": {"name": "fixed"}, "pruning.scope": "per_tensor",
                                                             "pruning.mask_from": str(donor)}))
    capsys.readouterr()
    assert main(["validate", str(taker)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"pruning.mask_from: the mask in {donor / 'masks.safetensors'} was ranked with scope global, but pruning.scope " \
           "is per_tensor" in err and "set pruning.scope: global" in err
    assert main(["run", str(taker), "--output-dir", str(tmp_path / "t"), "--quiet"]) == 2
    assert not (tmp_path / "t").exists()


def test_a_missing_donor_mask_is_refused_by_validate_naming_what_is_missing(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    unfinished = tmp_path / "unfinished"  # a run directory that has not written its masks yet
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text("name: unfinished\n")
    for donor, what in ((missing, "no such file or directory"), (unfinished, "a run directory without masks.safetensors "
                                                                             "(has it finished?)")):
        path = write_recipe(tmp_path / "t.yaml", tiny_recipe(**{"pruning.schedule": {"name": "fixed"},
                                                                 "pruning.mask_from": str(donor)}))
        assert main(["validate", str(path)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        shown = donor if donor == missing else donor / "masks.safetensors"
        assert f"pruning.mask_from: no mask file at {shown}: {what}" in err, err


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("make", [tiny_recipe, tiny_ctc_recipe], ids=["whisper", "wav2vec2"])
def test_structured_criterion_prunes_whole_units_with_any_schedule(tmp_path, make, scope):
    schedule = {"name": "parp", "options": {"interval": 2}} if scope == "global" else {"name": "fixed"}
    out, metrics = _run(tmp_path, make(**{"pruning.criterion": {"name": "structured"}, "pruning.scope": scope,
                                          "pruning.schedule": schedule, "training.max_steps": 3}))
    masks = load_file(str(out / "masks.safetensors"))
    fc1 = [k for k in masks if k.endswith(("fc1.weight", "intermediate_dense.weight"))]
    fc2 = [k.replace("fc1", "fc2").replace("intermediate_dense", "output_dense") for k in fc1]
    for up, down in zip(fc1, fc2, strict=True):
        rows = masks[up].all(dim=1)
        assert (masks[up].all(dim=1) | ~masks[up].any(dim=1)).all()  # whole rows kept or pruned
        assert torch.equal(masks[down].all(dim=0), rows)  # the coupled fc2 columns go with them
        if scope == "per_tensor":
            assert int((~rows).sum()) == round(0.5 * rows.numel())
    q = [k for k in masks if k.endswith("q_proj.weight")]
    for name in q:
        rows = masks[name].all(dim=1)
        heads = rows.view(2, -1)  # 2 heads in the tiny configs
        assert (heads.all(dim=1) | ~heads.any(dim=1)).all()  # whole heads
        assert heads.any()  # a layer keeps at least one head
    model = metrics["stages"]["final"]
    assert model["pool_sparsity"] > 0.3


def test_schedules_refuse_mask_from_when_they_find_their_own(tmp_path, capsys):
    donor, _ = _run(tmp_path, tiny_recipe(**{"training.max_steps": 1}), "donor")
    path = write_recipe(tmp_path / "o.yaml", tiny_recipe(**{"pruning.schedule": {"name": "omp"}, "pruning.mask_from": str(donor)}))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "o"), "--quiet"]) == 2
    assert "finds its own masks" in capsys.readouterr().err


def test_prune_events_count_the_weights_a_re_prune_lets_back(tmp_path):
    """PARP at lr 1e-2 re-prunes once, at the end: its event's ``regrown`` is exactly the weights the final
    mask keeps and the first one pruned (the re-prune before scoring, logged too, finds nothing more to let
    back); with an interval past the run's steps the re-prune before scoring is the only one, and its event
    says what it moved; MPI-fixed never moves its mask. ``pruned_max`` and ``kept_min`` say how near a re-prune
    came to moving the mask."""
    out, metrics = _run(tmp_path, tiny_recipe(**{"pruning.schedule": {"name": "parp", "options": {"interval": 6}}}), "parp")
    prunes = _prunes(out)
    assert [p["step"] for p in prunes] == [0, 6, 6] and prunes[0]["regrown"] is None
    first, final = load_file(str(out / "masks_initial.safetensors")), load_file(str(out / "masks.safetensors"))
    moved = sum(int((final[n] & ~first[n]).sum()) for n in first)
    assert moved > 0 and prunes[1]["regrown"] == moved
    assert prunes[1]["pruned_max"] >= prunes[1]["kept_min"] > 0  # global magnitude: it moved, so one pruned weight passed
    assert prunes[2]["before_scoring"] and prunes[2]["regrown"] == 0
    assert prunes[2]["pruned_max"] == 0 < prunes[2]["kept_min"]  # the weights just pruned are zero
    assert "pruned_max" not in prunes[0]  # a first mask has nothing before it
    # at a learning rate too small to pass the threshold in one interval the pruned weights move but stay below it
    out, _ = _run(tmp_path, tiny_recipe(**{"training.learning_rate": 1e-6}), "parp_slow")
    slow = _prunes(out)[1]
    assert slow["step"] == 3 and slow["regrown"] == 0 and 0 < slow["pruned_max"] < slow["kept_min"]
    # lr_sum: the rates of updates 1-3 under the linear decay over 6 updates, 1e-6 x (1 + 5/6 + 4/6); Adam moved no
    # zeroed weight further than that sum (its step is at most about the rate)
    assert slow["lr_sum"] == pytest.approx(2.5e-6, rel=1e-5) and slow["pruned_max"] <= 1.05 * slow["lr_sum"]
    warnings = [e["message"] for e in _events(out, "warning") if "unlikely to move" in e["message"]]
    assert len(warnings) == 1 and "re-prune at update 3" in warnings[0]  # the first re-prune only
    assert not [e for e in _events(tmp_path / "parp", "warning") if "unlikely to move" in e["message"]]  # it moved
    # gmp holds what it prunes at zero, by design: nothing could come back, so nothing to warn of
    out, _ = _run(tmp_path, tiny_recipe(**{"training.learning_rate": 1e-6,
                                          "pruning.schedule": {"name": "gmp", "options": {"initial": 0.1, "interval": 2}}}), "gmp")
    assert [p["pruned_max"] for p in _prunes(out)[1:]] == [0.0, 0.0, 0.0]
    assert not [e for e in _events(out, "warning") if "unlikely to move" in e["message"]]
    # ranked within each row the pool-wide extremes say nothing of whether a weight grows back: not logged
    out, _ = _run(tmp_path, tiny_recipe(**{"pruning.scope": "per_row"}), "parp_row")
    assert [("pruned_max" in p, p["regrown"] is None) for p in _prunes(out)] == [(False, True), (False, False), (False, False),
                                                                                   (False, False)]
    out, _ = _run(tmp_path, tiny_recipe(**{"pruning.schedule": {"name": "parp", "options": {"interval": 400}}}), "parp400")
    prunes = _prunes(out)
    first, final = load_file(str(out / "masks_initial.safetensors")), load_file(str(out / "masks.safetensors"))
    assert [(p["step"], p.get("before_scoring", False)) for p in prunes] == [(0, False), (6, True)]
    moved400 = sum(int((final[n] & ~first[n]).sum()) for n in first)
    assert prunes[1]["regrown"] == moved400 > 0
    assert metrics["mask_iou_initial"] < 1
    out, _ = _run(tmp_path, tiny_recipe(**{"pruning.schedule": {"name": "fixed"}}), "fixed")
    assert [p["regrown"] for p in _prunes(out)] == [None]
    # the report gathers every run's (re-)prunes in prunes.csv; a re-prune logged twice (a run that resumed from
    # a checkpoint before it) is one row, the later entry
    parp = tmp_path / "parp"
    with (parp / "log.jsonl").open("a") as log:
        log.write(json.dumps({**_prunes(parp)[1], "regrown": 12345}) + "\n")
    assert main(["report", str(parp), str(tmp_path / "parp400"), str(tmp_path / "fixed"), "--output-dir", str(tmp_path / "r")]) == 0
    table = list(csv.DictReader((tmp_path / "r" / "prunes.csv").open()))
    assert [(r["method"], r["step"], r["before_scoring"], r["regrown"]) for r in table] == [
        ("fixed", "0", "False", ""), ("parp interval=400", "0", "False", ""), ("parp interval=400", "6", "True", str(moved400)),
        ("parp interval=6", "0", "False", ""), ("parp interval=6", "6", "False", "12345"), ("parp interval=6", "6", "True", "0")]
