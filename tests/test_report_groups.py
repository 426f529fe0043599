"""Issue 33: ``parpkit report`` averages as seeds only runs whose recipes differ in the seed alone, refuses a table
over different corpora (naming the runs), and never prints a NaN error rate as a blank."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from parpkit.cli import main
from parpkit.testing import apply_changes, tiny_recipe


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def _run(folder: Path, *, wer: float, seed: int = 0, references: tuple[str, ...] = ("hello there", "good morning"),
         environment: dict | None = None, **changes) -> Path:
    """A finished run written by hand: recipe.yaml (the tiny recipe with ``changes``), metrics.json, transcripts."""
    folder.mkdir(parents=True)
    recipe = apply_changes(tiny_recipe(**changes), {"seed": seed})
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    final = {"wer": wer, "cer": wer / 2, "pool_sparsity": 0.5, "model_sparsity": 0.01, "splits": {"test": {"wer": wer, "cer": wer / 2}}}
    dense = {"wer": 0.9, "cer": 0.5, "pool_sparsity": 0.0, "model_sparsity": 0.0, "splits": {"test": {"wer": 0.9, "cer": 0.5}}}
    m = {"recipe": "tiny", "plugins": {"backbone": "whisper", "dataset": "synthetic_speech", "criterion": "magnitude", "schedule": "parp"},
         "target_sparsity": 0.5, "scope": "global", "eval_split": "test", "eval_utterances": len(references),
         "eval_splits": {"test": len(references)}, "stages": {"dense": dense, "final": final}, "mask_iou_initial": 0.9,
         "steps": 6, "wall_time_s": {"total": 1.0}, "curve": []}
    if environment is not None:
        m["environment"] = environment
    (folder / "metrics.json").write_text(json.dumps(m))
    rows = [{"split": "test", "id": f"test-{i:06d}", "reference": ref, "hypothesis": ref, "edits": i, "words": len(ref.split())}
            for i, ref in enumerate(references)]
    (folder / "transcripts_final.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_runs_of_different_configurations_are_not_averaged_as_seeds(tmp_path, capsys):
    runs = tmp_path / "runs"
    _run(runs / "a0", wer=0.30, seed=0)
    _run(runs / "a1", wer=0.40, seed=1)
    _run(runs / "b0", wer=0.80, seed=0, **{"backbone.options.config.d_model": 32, "training.learning_rate": 0.001})
    assert main(["report", str(runs), "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    a = next(line for line in lines if "d_model=16" in line)
    b = next(line for line in lines if "d_model=32" in line)
    assert "parp d_model=16 learning_rate=0.01" in a and "│ 2 │" in a and "0.350 ± 0.050" in a  # the two seeds of a
    assert "parp d_model=32 learning_rate=0.001" in b and "│ 1 │" in b and "0.800" in b
    # runs that differ only in the seed (and in bookkeeping such as save_steps) stay one row of seeds
    same = tmp_path / "same"
    _run(same / "s0", wer=0.30, seed=0)
    _run(same / "s1", wer=0.50, seed=1, **{"training.save_steps": 2, "name": "other"})
    assert main(["report", str(same)]) == 0
    assert "0.400 ± 0.100" in capsys.readouterr().out


def test_runs_scored_on_different_corpora_are_refused_in_one_table_and_compare(tmp_path, capsys):
    runs = tmp_path / "runs"
    a = _run(runs / "seed0", wer=0.3)
    b = _run(runs / "seed1", wer=0.4, references=("one two", "three four"), **{"dataset.options.seed": 1,
                                                                               "pruning.schedule.name": "fixed"})
    for args in (["report", str(runs)], ["report", str(runs), "--compare", "parp", "fixed"]):
        assert main(args) == 2
        err = _err(capsys)
        assert "these runs were scored on different corpora (split 'test' holds other utterances or references in" in err
        assert str(a) in err and str(b) in err and "Traceback" not in err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_error_rate_is_named_not_printed_blank(tmp_path, capsys, value):
    runs = tmp_path / "runs"
    _run(runs / "good", wer=0.3)
    bad = _run(runs / "bad", wer=value, seed=1)
    assert main(["report", str(runs)]) == 0
    err = _err(capsys)
    assert f"skipped {bad / 'metrics.json'}: unreadable (ValueError: wer is {value!r}, expected a number" in err


def _scored(folder: Path, schedule: str, lr: float, seed: int, validation: float, validation_ood: float) -> Path:
    """A hand-written run of ``schedule`` at learning rate ``lr``, scored on two validation splits."""
    _run(folder, wer=validation, seed=seed, **{"training.learning_rate": lr, "pruning.schedule": {"name": schedule}})
    m = json.loads((folder / "metrics.json").read_text())
    m["plugins"]["schedule"] = schedule
    m["stages"]["final"]["splits"] = {"validation": {"wer": validation}, "validation_ood": {"wer": validation_ood}}
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


def test_report_choose_applies_the_rule_per_method_and_says_when_the_choice_is_an_end_of_the_grid(tmp_path, capsys):
    runs = tmp_path / "runs"
    _scored(runs / "p1", "parp", 3e-5, 0, 0.30, 0.50)    # mean 0.40
    _scored(runs / "p2", "parp", 1e-4, 0, 0.20, 0.40)    # with seed 1: 0.21 and 0.41, mean 0.31
    _scored(runs / "p3", "parp", 1e-4, 1, 0.22, 0.42)
    _scored(runs / "p4", "parp", 3e-4, 0, 0.21, 0.40)    # mean 0.305: the lowest, at the top of the grid
    _scored(runs / "f1", "fixed", 3e-5, 0, 0.25, 0.35)   # mean 0.30: the lowest, at the bottom of the grid
    _scored(runs / "f2", "fixed", 1e-4, 0, 0.30, 0.40)
    by = ["--choose", "training.learning_rate", "--by", "validation,validation_ood"]
    assert main(["report", str(runs), *by, "--within", "0.01", "--output-dir", str(tmp_path / "r")]) == 0
    table = list(csv.DictReader((tmp_path / "r" / "choice.csv").open()))
    got = {(t["method"], float(t["value"])): (int(t["seeds"]), float(t["mean"]), t["chosen"], t["note"]) for t in table}
    assert got[("parp", 1e-4)][:3] == (2, pytest.approx(0.31), "True")  # within 0.01 of 0.305: the lower rate
    assert got[("parp", 3e-4)][2] == "False" and got[("parp", 3e-5)][1] == pytest.approx(0.40)
    assert got[("fixed", 3e-5)][2:] == ("True", "the lowest value tried: a value beyond it may be better")
    assert float(table[0]["wer_validation"]) == pytest.approx(0.25)  # fixed, 3e-5 first: methods, then values, in order
    assert "**0.0001**" in (tmp_path / "r" / "choice.md").read_text()
    # with no tolerance the lowest mean wins outright, and it is an end of the grid
    assert main(["report", str(runs), *by, "--output-dir", str(tmp_path / "r0")]) == 0
    chosen = [t for t in csv.DictReader((tmp_path / "r0" / "choice.csv").open()) if t["chosen"] == "True"]
    assert [(t["method"], float(t["value"]), t["note"]) for t in chosen] == [
        ("fixed", 3e-5, "the lowest value tried: a value beyond it may be better"),
        ("parp", 3e-4, "the highest value tried: a value beyond it may be better; the values were run on different seeds")]
    # --prefer higher takes the higher of tied values; a split named twice counts once
    assert main(["report", str(runs), *by[:3], "validation,validation_ood,validation", "--within", "0.01", "--prefer", "higher",
                 "--output-dir", str(tmp_path / "rh")]) == 0
    chosen = [t for t in csv.DictReader((tmp_path / "rh" / "choice.csv").open()) if t["chosen"] == "True"]
    assert [(t["method"], float(t["value"]), float(t["mean"])) for t in chosen] == [
        ("fixed", 3e-5, pytest.approx(0.30)), ("parp", 3e-4, pytest.approx(0.305))]
    # a method run at one value only (a grid half run) is chosen, and says that nothing was compared
    _scored(runs / "o1", "omp", 1e-4, 0, 0.25, 0.35)
    assert main(["report", str(runs), *by, "--output-dir", str(tmp_path / "ro")]) == 0
    chosen = {t["method"]: t for t in csv.DictReader((tmp_path / "ro" / "choice.csv").open()) if t["chosen"] == "True"}
    assert (float(chosen["omp"]["value"]), chosen["omp"]["note"]) == (1e-4, "the only value tried: nothing was compared")
    capsys.readouterr()
    assert main(["report", str(runs), "--choose", "training.learning_rate", "--by", "validation,test_long",
                 "--output-dir", str(tmp_path / "refused")]) == 2
    assert "was not scored on test_long" in _err(capsys)
    assert not (tmp_path / "refused").exists()  # refused before any report file was written
    assert main(["report", str(runs), "--by", "validation"]) == 2
    assert "--by, --within and --prefer go with --choose" in _err(capsys)
    assert main(["report", str(runs), "--prefer", "higher"]) == 2
    assert main(["report", str(runs), "--choose", "training.learning_rate"]) == 2
    assert "--choose needs --by" in _err(capsys)
    assert main(["report", str(runs), *by, "--within", "-0.1"]) == 2
    assert "give a tolerance of 0 or more" in _err(capsys)


@pytest.mark.parametrize("curve", [[{"step": 2, "phase": 0, "wer": 0.5}], [{"step": 2, "phase": 0, "split": "validation"}],
                                   [{"step": 2, "split": "validation", "wer": float("nan")}], ["step 2"], "0.5"])
def test_a_damaged_learning_curve_skips_its_run_naming_it(tmp_path, capsys, curve):
    runs = tmp_path / "runs"
    good = _run(runs / "good", wer=0.3)
    m = json.loads((good / "metrics.json").read_text())
    (good / "metrics.json").write_text(json.dumps({**m, "curve": [{"step": 2, "phase": 0, "split": "validation", "wer": 0.5}]}))
    bad = _run(runs / "bad", wer=0.4, seed=1)
    (bad / "metrics.json").write_text(json.dumps({**m, "curve": curve}))
    assert main(["report", str(runs), "--output-dir", str(tmp_path / "rep")]) == 0
    assert f"skipped {bad / 'metrics.json'}: unreadable (ValueError: curve" in _err(capsys)
    assert (tmp_path / "rep" / "learning_curves.png").is_file()  # the good run's curve


@pytest.mark.parametrize("index", ['{"points": ["a", {"name": "b"}]}', '{"points": [{"name": "a", "axes": {"meth',
                                   '{"points": [{"name": "a", "axes": ["parp"]}]}', "[]"])
def test_a_damaged_sweep_index_is_named_not_every_metrics_json(tmp_path, capsys, index):
    runs = tmp_path / "runs"
    _run(runs / "a", wer=0.3)
    _run(runs / "b", wer=0.4, seed=1)
    (runs / "sweep.json").write_text(index)
    assert main(["report", str(runs)]) == 2
    err = _err(capsys)
    assert f"error: {runs / 'sweep.json'}: not a sweep index parpkit can read" in err and "metrics.json" not in err


def test_report_choose_refuses_the_sparsity_variables_and_mappings_saying_why(tmp_path, capsys):
    runs = tmp_path / "runs"
    for i, lr in enumerate((1e-4, 3e-4)):  # a sweep over vars.lr: each recipe.yaml keeps vars and the value it set
        _run(runs / f"p{i}", wer=0.3 + i / 10, **{"vars.lr": lr, "training.learning_rate": lr})
    for key, message in (
            ("pruning.sparsity", "--choose pruning.sparsity: the rule chooses a value for every method and sparsity, so it "
                                 "cannot choose the sparsity"),
            ("vars.lr", "--choose vars.lr: variables are left out of the configuration compared (each run's recipe.yaml "
                        "holds the values they set); choose the key it sets: training.learning_rate"),
            ("pruning.schedule", f"{runs / 'p0'}: its pruning.schedule is a mapping (pruning.schedule.name, "
                                 "pruning.schedule.options.interval); choose one of its keys that holds a number")):
        assert main(["report", str(runs), "--choose", key, "--by", "test", "--output-dir", str(tmp_path / "rep")]) == 2
        assert message in _err(capsys)
        assert not (tmp_path / "rep").exists()
    assert main(["report", str(runs), "--choose", "training.learning_rate", "--by", "test"]) == 0


def test_report_says_when_seeds_ran_on_machines_that_round_floats_differently(tmp_path):
    """The machine a run was scored on (metrics.json's environment) goes into table.csv, and table.md says
    when the runs of one table ran on more than one kind (another CPU's kernels or thread count, a GPU, or
    unrecorded)."""
    avx2 = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "gpu": None}
    runs = tmp_path / "runs"
    _run(runs / "s0", wer=0.30, seed=0, environment=avx2)
    _run(runs / "s1", wer=0.40, seed=1, environment=avx2)
    assert main(["report", str(runs), "--output-dir", str(tmp_path / "one")]) == 0
    assert [r["machine"] for r in csv.DictReader((tmp_path / "one" / "table.csv").open())] == ["CPU (AVX2 kernels)"] * 2
    assert "more than one kind" not in (tmp_path / "one" / "table.md").read_text()
    _run(runs / "s2", wer=0.35, seed=2, environment={**avx2, "cpu_capability": "AVX512"})
    _run(runs / "s3", wer=0.35, seed=3, environment={**avx2, "gpu": "NVIDIA H100 80GB HBM3"})
    _run(runs / "s4", wer=0.35, seed=4)
    _run(runs / "s5", wer=0.35, seed=5, environment={**avx2, "threads": 1})
    _run(runs / "s6", wer=0.35, seed=6, environment={**avx2, "threads": 2})
    assert main(["report", str(runs), "--output-dir", str(tmp_path / "mixed")]) == 0
    text = " ".join((tmp_path / "mixed" / "table.md").read_text().split())
    assert ("The runs ran on more than one kind of machine or thread count (CPU (AVX2 kernels): 2; CPU (AVX2 kernels, "
            "1 thread): 1; CPU (AVX2 kernels, 2 threads): 1; CPU (AVX512 kernels): 1; NVIDIA H100 80GB HBM3: 1; not "
            "recorded: 1), which round floats differently") in text
    assert [r["machine"] for r in csv.DictReader((tmp_path / "mixed" / "table.csv").open())].count("") == 1
