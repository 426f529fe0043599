"""Sweeps, shared work, learning curves and reports on the tiny random-initialised whisper."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import parpkit
from parpkit.cli import main
from parpkit.errors import RecipeError
from parpkit.sweep import SweepSection, points, sweep_of
from tests.conftest import requires_offline, same_results, tiny_recipe, write_recipe

pytestmark = requires_offline

METHODS = {"parp": {"pruning.schedule": {"name": "parp", "options": {"interval": 1}}},
           "fixed": {"pruning.schedule": {"name": "fixed"}},
           "omp": {"pruning.schedule": {"name": "omp", "options": {"dense_steps": 2}}}}


def _sweep_recipe(grids, **changes):
    recipe = tiny_recipe(**{"training.max_steps": 2, "training.save_steps": 1, **changes})
    recipe["sweep"] = {"variants": {"method": METHODS}, "grids": grids}
    return recipe


def test_points_cross_zip_and_deduplicate():
    sweep = SweepSection.model_validate({"variants": {"method": METHODS}, "grids": [
        {"method": ["parp", "fixed"], "pruning.sparsity": [0.3, 0.6]},
        {"cross": {"method": ["parp"]}, "zip": {"pruning.sparsity": [0.3, 0.9], "seed": [0, 1]}}]})
    plist = points(sweep)
    assert [p.name for p in plist] == ["method-parp_sparsity-0.3", "method-parp_sparsity-0.6", "method-fixed_sparsity-0.3",
                                       "method-fixed_sparsity-0.6", "method-parp_sparsity-0.3_seed-0",
                                       "method-parp_sparsity-0.9_seed-1"]
    assert plist[-1].overrides == {"pruning.schedule": {"name": "parp", "options": {"interval": 1}}, "pruning.sparsity": 0.9, "seed": 1}
    with pytest.raises(RecipeError, match="method has no variant 'imp'"):
        points(SweepSection.model_validate({"variants": {"method": METHODS}, "grids": [{"method": ["imp"]}]}))
    with pytest.raises(ValueError, match="zip lists must have the same length"):
        SweepSection.model_validate({"grids": [{"zip": {"seed": [0, 1], "pruning.sparsity": [0.5]}}]})


def test_report_rows_keep_points_apart_that_differ_in_more_than_sparsity_and_seed():
    from parpkit.report import grouped, method_of

    metrics = {"target_sparsity": 0.5, "plugins": {"schedule": "parp", "criterion": "magnitude"}}
    labels = [{"method": "parp", "pruning.sparsity": 0.5, "seed": seed} for seed in (0, 1)]
    labels.append({"method": "parp", "pruning.sparsity": 0.5, "training.learning_rate": 0.001})
    labels.append({"pruning.schedule.options.interval": 20, "pruning.sparsity": 0.5})
    methods = [method_of(metrics, lab) for lab in labels]
    assert methods == ["parp", "parp", "parp learning_rate=0.001", "parp interval=20"]
    rows = [{"method": m, "target_sparsity": 0.5, "seed": i, "wer": w, "cer": None, "per": None, "splits": {"test": {"wer": w}},
             "pool_sparsity": 0.5, "model_sparsity": 0.4, "steps": 2, "wall_time_s": 1.0, "mask_iou_initial": None}
            for i, (m, w) in enumerate(zip(methods, [0.2, 0.4, 0.9, 0.7]))]
    groups = {g["method"]: g for g in grouped(rows)}
    assert groups["parp"]["seeds"] == 2 and groups["parp"]["scores"]["test"] == pytest.approx((0.3, 0.1))
    assert groups["parp learning_rate=0.001"]["seeds"] == 1 and groups["parp learning_rate=0.001"]["scores"]["test"] == (0.9, 0.0)


def test_a_sweep_killed_after_its_first_point_finishes_on_rerun_and_reports(tmp_path, capsys):
    path = write_recipe(tmp_path / "sweep.yaml", _sweep_recipe([{"method": ["parp", "fixed"], "pruning.sparsity": [0.3, 0.6]}]))
    out = tmp_path / "grid"
    assert main(["sweep", str(path), "--output-dir", str(out), "--dry-run"]) == 0
    assert "4 points" in capsys.readouterr().out and not (out / "shared").exists()

    proc = subprocess.Popen([sys.executable, "-m", "parpkit.cli", "sweep", str(path), "--output-dir", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "method-parp_sparsity-0.3" / "metrics.json"
    deadline = time.time() + 300
    while not first.exists():
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stamp = first.stat().st_mtime_ns
    assert main(["sweep", str(path), "--output-dir", str(out), "--quiet"]) == 0
    assert first.stat().st_mtime_ns == stamp  # the finished point was not run again
    runs = sorted(p.name for p in out.iterdir() if (p / "metrics.json").exists())
    assert runs == ["method-fixed_sparsity-0.3", "method-fixed_sparsity-0.6", "method-parp_sparsity-0.3", "method-parp_sparsity-0.6"]
    # the dense model was evaluated once for all four
    shared_dense = [p for p in (out / "shared").iterdir() if p.name.startswith("dense-") and p.is_dir()]
    assert len(shared_dense) == 1
    dense = {json.dumps(json.loads((out / r / "metrics.json").read_text())["stages"]["dense"]["splits"]) for r in runs}
    assert len(dense) == 1

    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    report = out / "report"
    table = (report / "table.md").read_text().splitlines()
    assert table[0].startswith("| method | sparsity | seeds | WER test")
    assert len([line for line in table[2:] if line.startswith("| ")]) == 4
    assert {line.split("|")[1].strip() for line in table[2:] if line.startswith("| ")} == {"parp", "fixed"}
    assert (report / "wer_vs_sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((report / "heatmaps").glob("*.png"))) == 4
    with (report / "mask_iou.csv").open() as f:
        matrix = list(csv.reader(f))
    assert len(matrix) == 5 and all(float(matrix[i][i]) == 1.0 for i in range(1, 5))
    values = [[float(v) for v in row[1:]] for row in matrix[1:]]
    assert all(values[i][j] == values[j][i] and 0 < values[i][j] <= 1 for i in range(4) for j in range(4))


def test_omp_points_share_one_dense_fine_tune_and_get_the_same_result(tmp_path):
    path = write_recipe(tmp_path / "sweep.yaml", _sweep_recipe([{"method": ["omp"], "pruning.sparsity": [0.3, 0.6]}]))
    out = tmp_path / "grid"
    assert main(["sweep", str(path), "--output-dir", str(out), "--quiet"]) == 0
    logs = {p.name: [json.loads(line) for line in (p / "log.jsonl").open()] for p in out.iterdir() if (p / "log.jsonl").exists()}
    trained = {name: [e for e in log if e["event"] == "train" and e["step"] <= 2 and "loss" in e] for name, log in logs.items()}
    shared = {name: [e for e in log if e["event"] == "shared" and e.get("phase") == "dense"] for name, log in logs.items()}
    assert sorted(len(v) for v in shared.values()) == [0, 1]  # one point trained the dense phase, the other took it
    taker = next(name for name, v in shared.items() if v)
    assert not trained[taker]  # … without training it
    metrics = json.loads((out / taker / "metrics.json").read_text())
    assert metrics["shared_phases"] == ["dense"] and "dense_finetuned" in metrics["stages"]
    # the same point alone, nothing shared: identical results
    commands = subprocess.run([sys.executable, "-m", "parpkit.cli", "sweep", str(path), "--output-dir", str(out), "--print-commands"],
                              capture_output=True, text=True, check=True).stdout.splitlines()
    command = next(c for c in commands if f"--output-dir {out / taker}" in c)
    args = shlex.split(command)[1:]
    alone = tmp_path / "alone"
    args = args[:args.index("--output-dir")] + ["--output-dir", str(alone), "--quiet"]
    assert main(args) == 0
    assert (alone / "recipe.yaml").read_text() == (out / taker / "recipe.yaml").read_text()  # the command runs the same recipe
    same_results(alone, out / taker)
    alone_metrics = json.loads((alone / "metrics.json").read_text())
    assert alone_metrics["shared_phases"] == []
    assert metrics["train_loss_updates"] == alone_metrics["train_loss_updates"] == alone_metrics["steps"]
    assert metrics["train_loss"] == pytest.approx(alone_metrics["train_loss"], rel=1e-6)


def test_learning_curve_leaves_training_alone_and_keep_best_picks_the_best_point(tmp_path):
    base = {"training.max_steps": 6, "pruning.schedule": {"name": "parp", "options": {"interval": 2}}}
    plain = parpkit.run(tiny_recipe(**base), output_dir=tmp_path / "plain", progress=False)
    curve = parpkit.run(tiny_recipe(**base, **{"evaluation.every_steps": 2}), output_dir=tmp_path / "curve", progress=False)
    points_ = curve.metrics["curve"]
    assert [p["step"] for p in points_] == [2, 4, 6] and all(p["split"] == "test" for p in points_)
    assert all(p["pool_sparsity"] == pytest.approx(0.5, abs=1e-3) for p in points_)  # scored as judged: re-pruned
    same_results(plain.run_dir, curve.run_dir)  # scoring the curve changed nothing
    assert points_[-1]["wer"] == curve.final["wer"]  # the last point is the final model

    best = parpkit.run(tiny_recipe(**base, **{"evaluation.every_steps": 2, "evaluation.keep_best": True, "training.learning_rate": 3e-2}),
                       output_dir=tmp_path / "best", progress=False)
    wers = [p["wer"] for p in best.metrics["curve"]]
    assert best.metrics["best"]["step"] == best.metrics["curve"][wers.index(min(wers))]["step"]
    assert best.final["wer"] == min(wers)
    masks = best.masks()
    weights = load_file(str(best.model_dir / "model.safetensors"))
    assert all(not weights[n][~m].any() for n, m in masks.items())  # the best checkpoint is exactly sparse
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * best.metrics["pool_parameters"])


def test_compare_masks_matrix_and_layers(tmp_path, capsys):
    a = parpkit.run(tiny_recipe(**{"training.max_steps": 1}), output_dir=tmp_path / "a", progress=False)
    b = parpkit.run(tiny_recipe(**{"training.max_steps": 1, "pruning.criterion": {"name": "random"}}), output_dir=tmp_path / "b",
                    progress=False)
    assert main(["compare-masks", str(a.run_dir), str(b.run_dir), "--output", str(tmp_path / "cmp")]) == 0
    with (tmp_path / "cmp" / "mask_iou.csv").open() as f:
        rows = list(csv.reader(f))
    ma, mb = a.masks(), b.masks()
    inter = sum(int((ma[n] & mb[n]).sum()) for n in ma)
    union = sum(int((ma[n] | mb[n]).sum()) for n in ma)
    assert rows[0] == ["run", "a", "b"] and float(rows[1][1]) == float(rows[2][2]) == 1.0
    assert float(rows[1][2]) == pytest.approx(inter / union, abs=1e-6)
    assert 0.2 < inter / union < 0.5  # half the pool kept by each, independently: about 1/3
    with (tmp_path / "cmp" / "mask_iou_layers.csv").open() as f:
        layers = {r["layer"] for r in csv.DictReader(f)}
    assert layers == {"model.encoder.layers.0", "model.decoder.layers.0"}
    assert (tmp_path / "cmp" / "mask_iou.png").exists()
    # a run's mask against its first mask: PARP at a high learning rate moves it
    assert 0 < a.metrics["mask_iou_initial"] <= 1
    assert torch.equal(torch.tensor(b.metrics["mask_iou_initial"]), torch.tensor(1.0))  # random scores never move


def _fake_run(folder, *, seed=0, wer=0.5, splits=("test",), pool=("a",), finished=True):
    """A run directory as `parpkit run` leaves it, without running anything: recipe, metrics, masks."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(f"name: fake\nseed: {seed}\n")
    if not finished:
        return folder
    scores = {s: {"wer": wer + i / 10, "cer": wer / 2} for i, s in enumerate(splits)}
    final = {**scores[splits[0]], "pool_sparsity": 0.5, "model_sparsity": 0.3, "splits": scores}
    (folder / "metrics.json").write_text(json.dumps({
        "stages": {"final": final}, "plugins": {"backbone": "whisper", "dataset": "d", "criterion": "magnitude", "schedule": "parp"},
        "scope": "global", "target_sparsity": 0.5, "steps": 2, "wall_time_s": {"total": 1.0}, "eval_split": list(splits)}))
    save_file({n: (torch.arange(8) % 2).bool() for n in pool}, str(folder / "masks.safetensors"))
    return folder


def test_report_names_unfinished_runs_counts_each_run_once_and_never_averages_a_repeated_seed(tmp_path, capsys):
    from parpkit.report import collect

    sweep = tmp_path / "sweep"
    a = _fake_run(sweep / "a", wer=0.2)
    _fake_run(sweep / "killed", finished=False)
    (sweep / "sweep.json").write_text(json.dumps({"points": [{"name": n, "axes": {}} for n in ("a", "killed", "never")]}))
    rows, skipped = collect([a, sweep / "a", sweep])  # the same run three ways
    assert [r["run"] for r in rows] == [str(a)]
    assert skipped == [f"{sweep / 'killed'}: not finished (no metrics.json)", f"{sweep / 'never'}: not finished (no metrics.json)"]
    # two runs alike but for something no sweep axis names (here the pool), both seed 0: two rows, told apart
    other = _fake_run(tmp_path / "elsewhere" / "a", wer=0.4, pool=("b",))
    rows, _ = collect([a, other])
    assert sorted(r["method"] for r in rows) == ["parp [elsewhere/a]", "parp [sweep/a]"]
    # report: runs scored on different splits, masks of different pools; the overlap is left out, named
    third = _fake_run(tmp_path / "third", wer=0.3, splits=("test", "ood"))
    capsys.readouterr()
    assert main(["report", str(a), str(other), str(third), "--output", str(tmp_path / "rep")]) == 0
    out, err = capsys.readouterr()
    assert "no mask overlap:" in " ".join(err.split()) and "Traceback" not in err
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "| WER test | WER ood |" in table and "0.400" in table  # third's ood score: 0.3 + 0.1
    assert not (tmp_path / "rep" / "mask_iou.csv").exists()


def test_compare_masks_labels_tell_mask_files_and_same_named_runs_apart(tmp_path, capsys):
    x = _fake_run(tmp_path / "sweepA" / "p")
    y = _fake_run(tmp_path / "sweepB" / "p")
    z = _fake_run(tmp_path / "q")
    assert main(["compare-masks", str(x / "masks.safetensors"), str(y), str(z / "masks.safetensors"),
                 "--output", str(tmp_path / "cmp")]) == 0
    with (tmp_path / "cmp" / "mask_iou.csv").open() as f:
        assert next(csv.reader(f)) == ["run", "sweepA/p", "sweepB/p", "q"]


def test_sweep_points_that_come_out_the_same_recipe_run_once_and_errors_name_the_point(tmp_path, capsys):
    base = _sweep_recipe([{"method": ["fixed"], "pruning.sparsity": [0.5]}, {"method": ["fixed"]}])  # 0.5 is the base value
    base["pruning"]["sparsity"] = 0.5
    path = write_recipe(tmp_path / "sweep.yaml", base)
    assert main(["sweep", str(path), "--output-dir", str(tmp_path / "grid"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "1 points" in out and "sweep point method-fixed is the same recipe as method-fixed_sparsity-0.5: left out" in " ".join(err.split())
    # two variant labels with the same overrides: one point, and the sweep says which label it dropped
    twins = _sweep_recipe([{"method": ["fixed", "also_fixed"]}])
    twins["sweep"]["variants"]["method"]["also_fixed"] = {"pruning.schedule": {"name": "fixed"}}
    assert main(["sweep", str(write_recipe(tmp_path / "twins.yaml", twins)), "--output-dir", str(tmp_path / "t"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "1 points" in out and "sweep point method-also_fixed is the same recipe as method-fixed: left out" in " ".join(err.split())
    # --set on a key a point sets itself (or on a key below one a point's variant replaces whole) would be lost
    grid = write_recipe(tmp_path / "grid.yaml", _sweep_recipe([{"pruning.sparsity": [0.3, 0.6]}, {"method": ["fixed"]}]))
    capsys.readouterr()
    assert main(["sweep", str(grid), "--output-dir", str(tmp_path / "g"), "--dry-run", "--set", "pruning.sparsity=0.7"]) == 2
    assert ("(sweep point sparsity-0.3): --set pruning.sparsity=0.7: the point sets pruning.sparsity itself, so this setting "
            "would be lost") in " ".join(capsys.readouterr().err.split())
    assert main(["sweep", str(grid), "--output-dir", str(tmp_path / "g"), "--dry-run", "--set", "pruning.schedule.options.interval=4"]) == 2
    assert "(sweep point method-fixed): --set pruning.schedule.options.interval=4: the point sets pruning.schedule itself" in " ".join(capsys.readouterr().err.split())
    assert main(["sweep", str(grid), "--output-dir", str(tmp_path / "g"), "--dry-run", "--set", "training.max_steps=3"]) == 0
    with pytest.raises(RecipeError, match=r"sweep\.grids\.0\.cross\.pruning\.sparsity: .*an axis's list of values cannot be a "
                                          "variable"):
        sweep_of({"vars": {"sps": [0.3, 0.5]}, "sweep": {"grids": [{"pruning.sparsity": "${sps}"}]}}, "r.yaml")
    with pytest.raises(ValueError, match="a grid needs at least one axis"):
        SweepSection.model_validate({"grids": [{}]})
    with pytest.raises(ValueError, match="variants table 'method' has no labels"):
        SweepSection.model_validate({"variants": {"method": {}}, "grids": [{"seed": [0]}]})
    # a point that fails at run time is named by the recipe file and the point, not "<recipe>"
    bad = _sweep_recipe([{"pruning.mask_from": [str(tmp_path / "missing")]}], **{"pruning.schedule": {"name": "fixed"}})
    path = write_recipe(tmp_path / "bad.yaml", bad)
    capsys.readouterr()
    assert main(["sweep", str(path), "--output-dir", str(tmp_path / "bad"), "--quiet"]) == 3  # points failed
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path} (sweep point mask_from-" in err and "<recipe>" not in err


def test_imp_at_a_lower_target_shares_its_final_fine_tune_with_the_next_round_of_a_higher_one(tmp_path):
    imp = {"pruning.schedule": {"name": "imp", "options": {"step": 0.3, "round_steps": 2, "evaluate_rounds": False}},
           "training.keep_checkpoints_when_done": True}
    recipe = tiny_recipe(**{"training.max_steps": 2, **imp})
    recipe["sweep"] = {"grids": [{"pruning.sparsity": [0.3, 0.6]}]}
    out = tmp_path / "grid"
    path = write_recipe(tmp_path / "sweep.yaml", recipe)
    assert main(["sweep", str(path), "--output-dir", str(out), "--quiet"]) == 0
    low, high = (json.loads((out / f"sparsity-{s}" / "metrics.json").read_text()) for s in ("0.3", "0.6"))
    assert low["shared_phases"] == [] and high["shared_phases"] == ["round_1", "round_2"]
    taken = [json.loads(line) for line in (out / "sparsity-0.6" / "log.jsonl").open() if '"shared"' in line]
    assert [e["trained_by"] for e in taken if e.get("phase") == "round_2"] == [str(out / "sparsity-0.3")]
    # killed in its final phase, resumed: the phases its first attempt took are still reported
    (out / "sparsity-0.6" / "metrics.json").unlink()
    shutil.rmtree(out / "sparsity-0.6" / "checkpoints" / "phase-2")
    assert main(["sweep", str(path), "--output-dir", str(out), "--quiet", "--only", "sparsity-0.6"]) == 0
    again = json.loads((out / "sparsity-0.6" / "metrics.json").read_text())
    # (its final phase, stored by its first attempt, is taken back from the shared folder too)
    assert again["shared_phases"] == ["round_1", "round_2", "final"] and again["wall_time_s"]["attempts"] == 2
    assert again["stages"] == high["stages"]
    # the same point alone, nothing shared: the same masks, weights and scores
    alone = parpkit.run(tiny_recipe(**{"training.max_steps": 2, "pruning.sparsity": 0.6, **imp}), output_dir=tmp_path / "alone",
                        progress=False)
    assert alone.metrics["shared_phases"] == []
    same_results(tmp_path / "alone", out / "sparsity-0.6")
    # the phases taken count in the training loss as the run that trained them measured them
    assert again["train_loss_updates"] == alone.metrics["train_loss_updates"] == alone.metrics["steps"]
    assert again["train_loss"] == pytest.approx(alone.metrics["train_loss"], rel=1e-6)


def test_shared_work_is_keyed_on_contents_distillation_and_version(tmp_path, monkeypatch):
    """Changed transcripts under the same manifest paths, a distillation section, another parpkit version:
    each gets its own dense scores and dense fine-tune; nothing changed: shared as before."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    for i in range(6):
        sf.write(tmp_path / f"{i}.wav", (rng.standard_normal(8000 + 1000 * i) * 0.1).astype(np.float32), 16000)

    def manifests(words):
        for split, ids in (("train", range(4)), ("test", range(4, 6))):
            (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"audio": f"{i}.wav", "text": f"{words} {i}"}) + "\n"
                                                             for i in ids))

    dataset = {"name": "manifest", "options": {"splits": {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "test")}}}
    omp = {"dataset": dataset, "training.max_steps": 1, "pruning.schedule": {"name": "omp"}}
    shared = tmp_path / "shared"

    def point(name, *, share=True, **changes):
        result = parpkit.run(tiny_recipe(**omp, **changes), output_dir=tmp_path / name, progress=False,
                             shared=shared if share else None)
        refs = [json.loads(line)["reference"] for line in (result.run_dir / "transcripts_dense.jsonl").open()]
        took_dense = any('"stage": "dense"' in line for line in (result.run_dir / "log.jsonl").open() if '"shared"' in line)
        return result, refs, took_dense

    manifests("hello there")
    first, refs, took = point("first")
    assert refs == ["hello there 4", "hello there 5"] and not took and first.metrics["shared_phases"] == []
    # the same manifests edited in place: new references, new scores, no phase trained on the old ones
    manifests("good night")
    edited, refs, took = point("edited")
    assert refs == ["good night 4", "good night 5"] and not took and edited.metrics["shared_phases"] == []
    alone, _, _ = point("alone", share=False)
    assert edited.metrics["stages"] == alone.metrics["stages"]
    # nothing changed: the dense scores and the dense fine-tune are taken
    again, refs, took = point("again")
    assert took and again.metrics["shared_phases"] == ["dense"] and again.metrics["stages"] == alone.metrics["stages"]
    # a distillation section changes the dense fine-tune (not the pretrained model's scores)
    distilled, _, took = point("distilled", **{"distillation": {"weight": 0.5}})
    assert took and distilled.metrics["shared_phases"] == []
    # another parpkit version shares nothing with this one
    monkeypatch.setattr(parpkit.version, "__version__", parpkit.__version__ + "+other")
    other, _, took = point("other")
    assert not took and other.metrics["shared_phases"] == [] and other.metrics["stages"] == alone.metrics["stages"]
