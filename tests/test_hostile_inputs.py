"""Issue 33: hostile inputs that were accepted silently, hung, or failed late with a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from parpkit.cli import main
from parpkit.errors import RecipeError
from parpkit.recipe import load_recipe
from tests.conftest import requires_offline, tiny_recipe, write_recipe


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_a_key_given_twice_on_one_line_is_refused_in_the_file_and_in_set(tmp_path, capsys):
    text = write_recipe(tmp_path / "r.yaml", tiny_recipe()).read_text()
    (tmp_path / "r.yaml").write_text(text.replace("options:\n      interval: 3", "options: {interval: 3, interval: 1}"))
    assert "{interval: 3, interval: 1}" in (tmp_path / "r.yaml").read_text()
    with pytest.raises(RecipeError, match=r"r\.yaml: not valid YAML \(line \d+, column \d+\): the key 'interval' is given twice "
                                          r"in one mapping \(first on column \d+\)"):
        load_recipe(tmp_path / "r.yaml")
    write_recipe(tmp_path / "r.yaml", tiny_recipe())
    assert main(["validate", str(tmp_path / "r.yaml"), "--set", "pruning.schedule.options={interval: 3, interval: 1}"]) == 2
    assert "the key 'interval' is given twice in one mapping" in _err(capsys)


# ------------------------------------------------------------------------------------ bounded before compute

def test_calibration_batches_beyond_the_cap_are_refused_before_compute(tmp_path, capsys):
    from tests.conftest import tiny_ctc_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_ctc_recipe(**{
        "pruning.criterion": {"name": "taylor", "options": {"calibration_batches": 1_000_000_000}}}))
    assert main(["validate", str(path)]) == 2
    assert (f"{path}: pruning.criterion.options: criterion 'taylor': calibration_batches is 1000000000; expected a whole "
            "number from 0 to 512") in _err(capsys)


@pytest.mark.parametrize("shape", ["text", "list"])
def test_variables_that_double_each_other_are_refused_at_once(tmp_path, shape):
    import time

    r = tiny_recipe(**{"name": "${v40}" if shape == "text" else "run", "dataset.options.voices": "${v40}" if shape == "list" else ["en-us"]})
    r["vars"] = {"v0": "ab" if shape == "text" else ["en-us"]}
    for i in range(1, 41):
        r["vars"][f"v{i}"] = f"${{v{i - 1}}}${{v{i - 1}}}" if shape == "text" else [f"${{v{i - 1}}}", f"${{v{i - 1}}}"]
    t0 = time.time()
    message = (r"vars\.v\d+: expands to [\d,]+ characters, more than parpkit's 100,000 for one value" if shape == "text"
               else r"vars: the recipe expands to more than 100,000 values once its variables are substituted")
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path / "r.yaml", r))
    assert time.time() - t0 < 10


def test_a_sweep_of_a_million_points_is_refused_before_listing_them(tmp_path, capsys):
    import time

    recipe = tiny_recipe()
    recipe["sweep"] = {"grids": [{"seed": list(range(1000)), "training.learning_rate": [1e-3 * (i + 1) for i in range(1000)]}]}
    path = write_recipe(tmp_path / "s.yaml", recipe)
    t0 = time.time()
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert time.time() - t0 < 20
    assert ("sweep.grids[0]: the sweep has 1,000,000 points (1,000,000 in this grid); parpkit runs at most 10,000 in one "
            "sweep") in _err(capsys)


# ------------------------------------------------------------------------------------ accepted but wrong

@pytest.mark.parametrize("changes, message", [
    ({"backbone.options.config.encoder_layers": -1}, r"backbone\.options: whisper: the config cannot build a model: "
                                                     r"encoder_layers is -1; expected a positive count"),
    ({"backbone.options.config.decoder_layers": 0}, r"decoder_layers is 0; expected a positive count"),
    ({"pruning.criterion": {"name": "random", "options": {"seed": -1}}}, r"pruning\.criterion\.options\.seed: Input should be "
                                                                           r"greater than or equal to 0"),
    ({"pruning.criterion": {"name": "random", "options": {"seed": 2**70}}}, r"pruning\.criterion\.options\.seed: Input should be "
                                                                              r"less than or equal to 4294967295"),
    ({"pruning.criterion": {"name": "sparsegpt", "options": {"dampening": 1e300}}, "pruning.scope": "per_row"},
     r"pruning\.criterion\.options\.dampening: Input should be less than or equal to 1"),
    ({"dataset.options.rate": [-10, 100]}, r"dataset\.options: rate: \[-10, 100\] is not a range within \[80, 450\]"),
    ({"dataset.options.ood_pitch": [[50, 20]]}, r"dataset\.options: ood_pitch\[0\]: \[50, 20\] is not a range within \[0, 100\] "
                                                r"\(lowest first\)"),
])
@requires_offline
def test_values_that_built_something_else_are_refused_before_compute(tmp_path, capsys, changes, message):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**changes))
    assert main(["validate", str(path)]) == 2
    err = _err(capsys)
    assert re.search(message, err), err


def test_a_name_that_leaves_runs_is_refused(tmp_path):
    for name in ("../../x", "/tmp/x", "a/../../b"):
        with pytest.raises(RecipeError, match=r"name: .* would put the run directory outside runs/ \(runs/NAME\); give a plain "
                                              r"name, and output_dir"):
            load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(name=name)))
    assert load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(name="grid/a")))[0].run_dir() == Path("runs/grid/a")


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_cpus_per_point_is_refused(tmp_path, capsys, value):
    recipe = tiny_recipe()
    recipe["sweep"] = {"grids": [{"seed": [1, 2]}]}
    path = write_recipe(tmp_path / "s.yaml", recipe)
    assert main(["sweep", str(path), "--launcher", "ray", "--cpus-per-point", value, "--dry-run"]) == 2
    assert f"--cpus-per-point must be a finite number, got {value}" in _err(capsys)


def test_sweep_point_names_never_collide():
    from parpkit.sweep import SweepSection, points

    plist = points(SweepSection.model_validate({"grids": [{"name": ["a/b", "a_b", "a_b_1"]}]}))
    names = [p.name for p in plist]
    assert len(set(names)) == 3 and "name-a_b_1" in names


# ------------------------------------------------------------------------------------ old or damaged run directories

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from tests.conftest import OFFLINE

    if not OFFLINE:
        pytest.skip("needs the offline extra")
    tmp = tmp_path_factory.mktemp("finished")
    path = write_recipe(tmp / "r.yaml", tiny_recipe(**{"training.max_steps": 2}))
    assert main(["run", str(path), "--output-dir", str(tmp / "out"), "--quiet"]) == 0
    return path, tmp / "out"


@requires_offline
def test_a_finished_run_whose_metrics_lack_wall_time_is_reported_complete(finished, tmp_path, capsys):
    import json
    import shutil

    path, out = finished
    old = tmp_path / "old"
    shutil.copytree(out, old)
    metrics = json.loads((old / "metrics.json").read_text())
    for key in ("wall_time_s", "prunes"):
        del metrics[key]
    (old / "metrics.json").write_text(json.dumps(metrics))
    capsys.readouterr()
    assert main(["run", str(path), "--output-dir", str(old), "--quiet"]) == 0
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert "this run is complete" in err and "lacks what this summary shows (KeyError: 'prunes'); written by an older parpkit?" in err
    assert "Traceback" not in err and f"run directory: {old}" in captured.out


@requires_offline
def test_a_truncated_metrics_json_is_named_not_a_traceback(finished, tmp_path, capsys):
    import shutil

    path, out = finished
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    text = (damaged / "metrics.json").read_text()
    (damaged / "metrics.json").write_text(text[: len(text) // 2])
    before = sorted(p.name for p in damaged.iterdir())
    assert main(["run", str(path), "--output-dir", str(damaged), "--quiet"]) == 2
    err = _err(capsys)
    assert f"{damaged / 'metrics.json'} is damaged (JSONDecodeError:" in err and "pass --fresh to run it again" in err
    assert sorted(p.name for p in damaged.iterdir()) == before


@requires_offline
def test_a_checkpoint_an_older_parpkit_wrote_without_extra_resumes(tmp_path):
    import json

    from parpkit.testing import crash_and_resume

    def age(out: Path) -> None:  # as parpkit wrote checkpoints before it kept "extra" (and checksums)
        for ckpt in out.glob("checkpoints/phase-*/checkpoint-*"):
            state = json.loads((ckpt / "parpkit_state.json").read_text())
            del state["extra"]
            (ckpt / "parpkit_state.json").write_text(json.dumps(state))
            (ckpt / "COMPLETE").write_text("ok")

    result = crash_and_resume(tiny_recipe(**{"training.max_steps": 4, "training.save_steps": 2}), tmp_path / "out", between=age)
    assert result.metrics["best"] is None and result.metrics["curve"] == [] and result.final["pool_sparsity"] == 0.5
