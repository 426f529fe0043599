"""Issue 19: inputs that used to fail after compute (or with a traceback, or silently) are refused before
anything loads, in one line naming the file, the key and what was expected (exit code 2)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from parpkit.cli import main
from parpkit.errors import RecipeError
from parpkit.recipe import load_recipe
from tests.conftest import requires_offline, tiny_ctc_recipe, tiny_recipe, write_recipe


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def _refused(tmp_path, capsys, recipe: dict, message: str, *, run: bool = True) -> None:
    """validate and run both exit 2 with ``message`` (a regex) on one line, no traceback, nothing claimed."""
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["validate", str(path)]) == 2
    err = _err(capsys)
    assert re.search(message, err), err
    assert "Traceback" not in err and err.startswith(f"error: {path}:")
    if run:
        assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 2
        err = _err(capsys)
        assert re.search(message, err), err
        assert not (tmp_path / "out").exists()  # nothing claimed, nothing loaded, nothing computed


def _whisper_dir(path: Path) -> Path:
    from transformers import WhisperConfig

    WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------ backbones

@requires_offline
@pytest.mark.parametrize("value, message", [
    (31, r"backbone\.options: whisper: the config cannot build a model: embed_dim must be divisible by num_heads"),
    (-16, r"backbone\.options: whisper: the config cannot build a model: .*negative dimension -16"),
    ("abc", r"backbone\.options: whisper: the config cannot build a model: .*'d_model'.*expected int"),
])
def test_whisper_config_values_that_cannot_build_a_model(tmp_path, capsys, value, message):
    _refused(tmp_path, capsys, tiny_recipe(**{"backbone.options.config.d_model": value}), message)


@pytest.mark.parametrize("value, message", [
    (31, r"backbone\.options: wav2vec2: config: hidden_size 31 is not divisible by num_attention_heads 2"),
    (-32, r"backbone\.options: wav2vec2: the config cannot build a model: .*negative dimension -32"),
    ("wide", r"backbone\.options: wav2vec2: the config cannot build a model: .*'hidden_size'"),
])
def test_wav2vec2_config_values_that_cannot_build_a_model(tmp_path, capsys, value, message):
    _refused(tmp_path, capsys, tiny_ctc_recipe(**{"backbone.options.config.hidden_size": value}), message, run=False)


def test_a_whisper_directory_given_to_wav2vec2_and_empty_model_directories(tmp_path, capsys):
    whisper = _whisper_dir(tmp_path / "whisper")
    _refused(tmp_path, capsys, tiny_ctc_recipe(**{"backbone.options": {"model": str(whisper)}}),
             r"wav2vec2: '.*whisper' is a whisper model, which has no CTC head \(use backbone whisper\)", run=False)
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, capsys, tiny_ctc_recipe(**{"backbone.options": {"model": str(tmp_path / "empty")}}),
             r"backbone\.options: wav2vec2: .*empty: the model directory is empty", run=False)
    # a mistyped relative path (two slashes: no hub id) is named as a missing folder, not looked up on a hub
    _refused(tmp_path, capsys, tiny_ctc_recipe(**{"backbone.options": {"model": "runs/typo/model"}}),
             r"backbone\.options: runs/typo/model: no such model directory", run=False)
    _refused(tmp_path, capsys, tiny_recipe(**{"backbone.options": {"model": str(tmp_path / "empty")}}),
             r"backbone\.options: whisper: .*empty: the model directory is empty", run=False)
    from transformers import Wav2Vec2Config

    Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path / "ctc")
    _refused(tmp_path, capsys, tiny_recipe(**{"backbone.options": {"model": str(tmp_path / "ctc")}}),
             r"backbone\.options: whisper: '.*ctc' holds a wav2vec2 model, not a whisper one", run=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    _refused(tmp_path, capsys, tiny_recipe(**{"backbone.options": {"model": str(tmp_path / "junk")}}),
             r"whisper: .*junk: holds no config\.json", run=False)


# ------------------------------------------------------------------------------------ recipe values

@pytest.mark.parametrize("changes, message", [
    ({"seed": -1}, r"seed: Input should be greater than or equal to 0, got -1"),
    ({"seed": 2**32}, r"seed: Input should be less than or equal to 4294967295"),
    ({"training.learning_rate": float("inf")}, r"training\.learning_rate: Input should be a finite number"),
    ({"training.learning_rate": float("nan")}, r"training\.learning_rate: Input should be a finite number"),
    ({"training.max_steps": 10**9}, r"training\.max_steps: 1,000,000,000 optimizer steps is beyond parpkit's cap of 10,000,000"),
    ({"training.report_to": "tensorbord"}, r"training\.report_to: unknown reporting integration 'tensorbord'; transformers "
                                           r"knows none, all, .*tensorboard"),
    ({"training.report_to": ["none", "tensorboard"]}, r"training\.report_to: 'none' stands alone"),
])
def test_recipe_values_refused_on_load(tmp_path, changes, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe(**changes)))


def test_the_yaml_file_is_read_with_inf_and_nan_and_refused(tmp_path):
    text = write_recipe(tmp_path / "r.yaml", tiny_recipe()).read_text()
    for value in (".inf", ".nan", "-.inf"):
        (tmp_path / "r.yaml").write_text(text.replace("learning_rate: 0.01", f"learning_rate: {value}"))
        assert value in (tmp_path / "r.yaml").read_text()
        with pytest.raises(RecipeError, match=r"training\.learning_rate: Input should be a finite number"):
            load_recipe(tmp_path / "r.yaml")


@requires_offline
def test_a_validation_split_naming_no_split(tmp_path, capsys):
    _refused(tmp_path, capsys, tiny_recipe(**{"evaluation.validation_split": "dev", "evaluation.every_steps": 2}),
             r"evaluation\.validation_split: synthetic_speech has no split 'dev'; it has: train, test")


@requires_offline
def test_an_imp_rewind_past_the_first_round_is_located_at_the_schedule_options(tmp_path, capsys):
    _refused(tmp_path, capsys, tiny_recipe(**{"pruning.schedule": {"name": "imp", "options": {"rewind": "step:50"}}}),
             r"r\.yaml: pruning\.schedule\.options: rewind step 50 is past the first round's \d+ steps")


def test_a_key_given_twice_is_refused_naming_line_and_key(tmp_path):
    text = write_recipe(tmp_path / "r.yaml", tiny_recipe()).read_text()
    (tmp_path / "r.yaml").write_text(text + "name: second\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: not valid YAML \(line \d+, column 1\): the key 'name' is given twice in "
                                          r"one mapping \(first on line 1\)"):
        load_recipe(tmp_path / "r.yaml")
    nested = text.replace("  max_steps:", "  learning_rate: 0.5\n  max_steps:", 1)
    (tmp_path / "r.yaml").write_text(nested)
    with pytest.raises(RecipeError, match=r"the key 'learning_rate' is given twice"):
        load_recipe(tmp_path / "r.yaml")
    (tmp_path / "m.yaml").write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")  # a merge overridden: fine
    from parpkit.recipe import parse_yaml

    assert parse_yaml((tmp_path / "m.yaml").read_text())["other"] == {"x": 3, "y": 2}


def test_variables_referring_to_variables(tmp_path):
    r = tiny_recipe(**{"name": "run-${tag}", "pruning.sparsity": "${s}"})
    r["vars"] = {"tag": "${method}-${s}", "method": "parp", "s": 0.25}
    recipe, mapping = load_recipe(write_recipe(tmp_path / "r.yaml", r))
    assert recipe.name == "run-parp-0.25" and recipe.pruning.sparsity == 0.25
    r["vars"] = {"a": "${b}", "b": "x${a}"}
    with pytest.raises(RecipeError, match=r"vars\.a: variables refer to each other in a cycle: \$\{a\} -> \$\{b\} -> \$\{a\}"):
        load_recipe(write_recipe(tmp_path / "r.yaml", r))
    r["vars"] = {"a": "${nope}"}
    with pytest.raises(RecipeError, match=r"vars\.a: unknown variable \$\{nope\}"):
        load_recipe(write_recipe(tmp_path / "r.yaml", r))


# ------------------------------------------------------------------------------------ datasets

@requires_offline
def test_an_unknown_espeak_voice_or_variant(tmp_path, capsys):
    _refused(tmp_path, capsys, tiny_recipe(**{"dataset.options.voices": ["en-us", "en-xx"]}),
             r"dataset\.options: synthetic_speech: espeak-ng has no voice 'en-xx' \(voices\); its English voices are .*en-us")
    _refused(tmp_path, capsys, tiny_recipe(**{"dataset.options.variants": ["m1", "nope"]}),
             r"dataset\.options: synthetic_speech: espeak-ng has no voice variant 'nope' \(variants\)", run=False)


def test_a_synthetic_corpus_too_large_to_plan(tmp_path):
    from parpkit.registry import Plugins
    from parpkit.resolve import resolve

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"dataset.options.sizes.train": 1e8}))
    with pytest.raises(RecipeError, match=r"dataset\.options: sizes\.train: 100,000,000 utterances; a split holds 0 to 100,000"):
        resolve(load_recipe(path)[0], Plugins(), str(path))


def _wav(path: Path, samples: int) -> str:
    sf.write(path, (np.random.default_rng(0).standard_normal(samples) * 0.1).astype(np.float32), 16000)
    return str(path)


def test_missing_manifest_columns_are_refused_before_loading(tmp_path, capsys):
    a = _wav(tmp_path / "a.wav", 8000)
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": a, "text": "hello"}) + "\n")
    dataset = {"name": "manifest", "options": {"splits": {"train": str(tmp_path / "m.jsonl"), "test": str(tmp_path / "m.jsonl")}}}
    _refused(tmp_path, capsys, tiny_ctc_recipe(dataset=dataset),
             r"dataset\.options: .*m\.jsonl: no column 'audio' \(audio_column\); columns are path, text")
    dataset["options"].update(audio_column="path", speaker_column="who")
    _refused(tmp_path, capsys, tiny_ctc_recipe(dataset=dataset), r"no column 'who' \(speaker_column\)", run=False)


def test_a_one_sample_utterance_for_ctc_is_named_before_training(tmp_path, capsys):
    rows = [{"audio": _wav(tmp_path / "a.wav", 8000), "text": "hello there"},
            {"audio": _wav(tmp_path / "b.wav", 1), "text": "hi"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = {"name": "manifest", "options": {"splits": {"train": str(tmp_path / "m.jsonl"), "test": str(tmp_path / "m.jsonl")}}}
    path = write_recipe(tmp_path / "r.yaml", tiny_ctc_recipe(dataset=dataset, **{"training.max_steps": 2}))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 2
    err = _err(capsys)
    assert "dataset: split 'train': utterance train-000001 is 1 samples long; wav2vec2 needs at least 400 (25 ms)" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "transcripts_dense.jsonl").exists()


# ------------------------------------------------------------------------------------ sweeps and run directories

METHODS = {"parp": {"pruning.schedule": {"name": "parp", "options": {"interval": 1}}},
           "fixed": {"pruning.schedule": {"name": "fixed"}},
           "half": {"pruning.schedule": {"name": "fixed"}, "pruning.sparsity": 0.5}}


def _sweep_recipe(grids, **changes):
    recipe = tiny_recipe(**{"training.max_steps": 2, **changes})
    recipe["sweep"] = {"variants": {"method": METHODS}, "grids": grids}
    return recipe


def test_sweep_axes_that_set_the_same_key_are_refused_naming_both(tmp_path, capsys):
    from parpkit.sweep import SweepSection, points

    with pytest.raises(RecipeError, match=r"sweep\.grids\[0\]: method \(variant half\) and pruning\.sparsity both set "
                                          r"pruning\.sparsity; which one wins would depend on the order of the axes"):
        points(SweepSection.model_validate({"variants": {"method": METHODS},
                                            "grids": [{"method": ["parp", "half"], "pruning.sparsity": [0.3, 0.6]}]}))
    with pytest.raises(RecipeError, match=r"pruning\.schedule\.options\.interval and method \(variant fixed\) set "
                                          r"pruning\.schedule\.options\.interval and pruning\.schedule, one inside the other"):
        points(SweepSection.model_validate({"variants": {"method": METHODS},
                                            "grids": [{"pruning.schedule.options.interval": [2], "method": ["fixed"]}]}))
    path = write_recipe(tmp_path / "s.yaml", _sweep_recipe([{"method": ["half"], "pruning.sparsity": [0.3]}]))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert "both set pruning.sparsity" in _err(capsys)


def test_print_commands_run_what_the_sweep_runs_for_quoted_values(tmp_path):
    from parpkit.recipe import parse_override
    from parpkit.sweep import Point, run_command

    values = {"name": "1e-3", "vars.a": "yes", "vars.b": ".5", "vars.c": [1, "2e5"], "vars.d": "", "vars.e": {"x": "3e2"},
              "output_dir": "runs/a: b", "vars.f": 1e-3}
    line = run_command(Path("r.yaml"), Point("p", (), values), Path("out/p"), Path("out/shared"), [])
    import shlex

    args = shlex.split(line)
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"][1:]  # after sweep=null
    assert {".".join(k): v for k, v in map(parse_override, sets)} == values


def test_an_unexpected_error_in_one_point_does_not_stop_the_sweep_and_a_busy_point_is_skipped(tmp_path, capsys, monkeypatch):
    import parpkit.api
    from parpkit.errors import RunDirBusy

    ran = []

    def fake_run(mapping, output_dir, **kw):
        ran.append(Path(output_dir).name)
        if mapping["pruning"]["sparsity"] == 0.2:
            raise KeyError("a bug")
        if mapping["pruning"]["sparsity"] == 0.4:
            raise RunDirBusy(f"{output_dir} is in use by pid 1 on elsewhere")
        return None

    monkeypatch.setattr(parpkit.api, "run", fake_run)
    path = write_recipe(tmp_path / "s.yaml", _sweep_recipe([{"pruning.sparsity": [0.2, 0.4, 0.6]}]))
    assert main(["sweep", str(path), "--output-dir", str(tmp_path / "grid"), "--quiet"]) == 3  # a point failed
    captured = capsys.readouterr()
    err, out = " ".join(captured.err.split()), " ".join(captured.out.split())
    assert ran == ["sparsity-0.2", "sparsity-0.4", "sparsity-0.6"]  # the points after the bug still ran
    assert "point sparsity-0.2 failed unexpectedly: KeyError: 'a bug'" in err
    assert "point sparsity-0.4 skipped:" in err and "in use by pid 1" in err
    assert "sweep: 1 of 3 points finished" in out and "1 running in another process (sparsity-0.4)" in out
    assert "1 sweep point(s) failed: sparsity-0.2;" in err  # the busy point is not a failure


@requires_offline
def test_only_a_point_whose_axis_sets_the_name_still_runs_inside_the_sweep_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path / "s.yaml", _sweep_recipe([{"name": ["a", "b"]}]))
    assert main(["sweep", str(path), "--only", "name-b", "--print-commands"]) == 0
    line = capsys.readouterr().out.strip()
    assert "--output-dir runs/tiny/name-b" in line and "--shared runs/tiny/shared" in line  # not runs/b/name-b


@requires_offline
def test_empty_output_dirs_and_names_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe())
    assert main(["run", str(path), "--output-dir", "", "--quiet"]) == 2
    assert "--output-dir is empty" in _err(capsys)
    assert main(["run", str(path), "--set", "name=", "--quiet"]) == 2
    assert "name: expected the run directory's name (runs/NAME), got ''" in _err(capsys)
    assert main(["run", str(path), "--set", "output_dir= ", "--quiet"]) == 2
    assert "output_dir: expected a folder for the run" in _err(capsys)
    sweep = write_recipe(tmp_path / "s.yaml", _sweep_recipe([{"pruning.sparsity": [0.3]}]))
    assert main(["sweep", str(sweep), "--output-dir", "", "--quiet"]) == 2
    assert "--output-dir is empty" in _err(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "s.yaml"]  # nothing written here, no runs/


@requires_offline
def test_a_users_own_recipe_yaml_is_not_overwritten_by_a_run_into_its_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(**{"vars": {"s": 0.5}, "pruning.sparsity": "${s}"}))
    before = mine.read_text()
    assert main(["run", "recipe.yaml", "--output-dir", ".", "--quiet"]) == 2
    assert "recipe.yaml was not written by a parpkit run" in _err(capsys)
    assert mine.read_text() == before and not (tmp_path / ".lock").exists()


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory):
    """One tiny run with distillation.weight 0 that is also scored on its training split."""
    import parpkit.engine.lifecycle as lifecycle

    tmp = tmp_path_factory.mktemp("distilled")
    path = write_recipe(tmp / "r.yaml", tiny_recipe(**{"training.max_steps": 2, "distillation": {"weight": 0.0},
                                                       "dataset.eval_split": ["test", "train"]}))
    mp = pytest.MonkeyPatch()
    mp.setattr(lifecycle, "make_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    try:
        import io
        import contextlib

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(["run", str(path), "--output-dir", str(tmp / "out"), "--quiet"])
    finally:
        mp.undo()
    return path, tmp / "out", code, " ".join(err.getvalue().split())


@requires_offline
def test_distillation_with_weight_0_loads_no_teacher_and_training_on_the_scored_split_warns(distilled_run, capsys):
    path, out, code, err = distilled_run
    assert code == 0
    log = [json.loads(line) for line in (out / "log.jsonl").open()]
    teacher = [{k: v for k, v in e.items() if k != "time_s"} for e in log if e["event"] == "teacher"]
    assert teacher == [{"event": "teacher", "skipped": "distillation.weight and hidden_weight are 0"}]
    assert "the teacher teaches nothing: it is not loaded" in err
    warnings = [e for e in log if e["event"] == "warning"]
    assert len(warnings) == 1 and "the training split 'train' is also scored by dataset.eval_split ('train')" in warnings[0]["message"]
    assert err.count("warning: the training split 'train' is also scored") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distillation"]["teacher_loaded"] is False


@requires_offline
def test_a_finished_run_on_a_read_only_mount_is_reported_complete(distilled_run, capsys, monkeypatch):
    from parpkit.engine.rundir import RunDir

    path, out, code, _ = distilled_run
    assert code == 0
    monkeypatch.setattr(RunDir, "acquire", lambda self: (_ for _ in ()).throw(
        PermissionError(13, "Read-only file system", str(self.path / ".lock"))))
    stamp = (out / "metrics.json").stat().st_mtime_ns
    assert main(["run", str(path), "--output-dir", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "this run is complete" in " ".join(captured.err.split())
    assert (out / "metrics.json").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------------ report

def _metrics_run(folder: Path, *, backbone="whisper", dataset="synthetic_speech", sparsity=0.5, wer=0.3, dense=0.2, test=40,
                 **changes) -> Path:
    """A run directory with a hand-written metrics.json (no compute)."""
    folder.mkdir(parents=True)
    final = {"wer": wer, "cer": wer / 2, "pool_sparsity": 0.5, "model_sparsity": 0.01, "splits": {"test": {"wer": wer, "cer": wer / 2}}}
    m = {"recipe": folder.name, "plugins": {"backbone": backbone, "dataset": dataset, "criterion": "magnitude", "schedule": "parp"},
         "target_sparsity": sparsity, "scope": "global", "eval_split": "test", "eval_utterances": test, "eval_splits": {"test": test},
         "stages": {"dense": {"wer": dense, "cer": dense / 2, "pool_sparsity": 0.0, "model_sparsity": 0.0,
                              "splits": {"test": {"wer": dense, "cer": dense / 2}}}, "final": final},
         "mask_iou_initial": 0.9, "steps": 6, "wall_time_s": {"total": 1.0}, "curve": [], **changes}
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


@pytest.mark.parametrize("value", [None, "0.5", True])
def test_report_skips_and_names_a_metrics_json_whose_target_sparsity_is_not_a_number(tmp_path, capsys, value):
    _metrics_run(tmp_path / "runs" / "good")
    bad = _metrics_run(tmp_path / "runs" / "bad", target_sparsity=value)
    assert main(["report", str(tmp_path / "runs")]) == 0
    err = _err(capsys)
    assert f"skipped {bad / 'metrics.json'}: unreadable (ValueError: target_sparsity is {value!r}" in err
    assert "Traceback" not in err


def test_report_refuses_runs_of_different_backbones_or_datasets_in_one_table(tmp_path, capsys):
    _metrics_run(tmp_path / "runs" / "a")
    _metrics_run(tmp_path / "runs" / "b", backbone="wav2vec2", dense=0.9)
    assert main(["report", str(tmp_path / "runs")]) == 2
    err = _err(capsys)
    assert "these runs differ in backbone or dataset and do not belong in one table" in err
    assert "whisper on synthetic_speech: 1 run(s)" in err and "wav2vec2 on synthetic_speech: 1 run(s)" in err
    _metrics_run(tmp_path / "other" / "c")
    d = _metrics_run(tmp_path / "other" / "d", test=120)  # the same plugins, another corpus
    assert main(["report", str(tmp_path / "other")]) == 2
    assert f"scored on different corpora (split 'test' holds 40 in {tmp_path / 'other' / 'c'}; 120 in {d} utterances)" in _err(capsys)


def test_report_console_table_keeps_bracketed_labels(tmp_path, capsys):
    # two runs of one method, sparsity and seed are told apart by their folders: "parp [base]", "parp [r26]"
    _metrics_run(tmp_path / "runs" / "base")
    _metrics_run(tmp_path / "runs" / "r26", wer=0.4)
    assert main(["report", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "parp [base]" in out and "parp [r26]" in out


def test_an_unchanged_sweep_index_is_not_rewritten(tmp_path, monkeypatch):
    from parpkit.sweep import Point, write_index

    plist = [Point("a", (("seed", 1),), {"seed": 1})]
    write_index(tmp_path / "grid", Path("s.yaml"), plist)
    monkeypatch.setattr(Path, "write_text", lambda *a, **k: pytest.fail("rewrote an unchanged sweep.json (read-only mounts)"))
    write_index(tmp_path / "grid", Path("s.yaml"), plist)


def test_plugin_options_refuse_inf_and_nan_too(tmp_path):
    from parpkit.registry import Plugins
    from parpkit.resolve import resolve

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"dataset.options.ood_max_seconds": float("inf")}))
    with pytest.raises(RecipeError, match=r"dataset\.options\.ood_max_seconds: Input should be a finite number"):
        resolve(load_recipe(path)[0], Plugins(), str(path))


def test_fp16_without_a_cuda_device_is_refused_and_bf16_trains_on_the_cpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: fp16 is allowed")
    fp16 = write_recipe(tmp_path / "fp16.yaml", tiny_recipe(**{"training.precision": "fp16"}))
    assert main(["validate", str(fp16)]) == 0  # validate may run where the job's GPUs are not (a login node)
    capsys.readouterr()
    assert main(["run", str(fp16), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 2
    err = _err(capsys)
    assert re.search(r"training\.precision: training\.precision fp16 needs a CUDA device .* use bf16 \(autocast on the "
                     r"CPU\) or fp32", err), err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    # bf16 on the CPU: transformers refuses it unless told "cpu"; the engine tells it, and the run trains
    path = write_recipe(tmp_path / "bf16.yaml", tiny_recipe(**{"training.precision": "bf16", "training.max_steps": 3}))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "bf16"), "--quiet"]) == 0
    losses = [e["loss"] for e in map(json.loads, (tmp_path / "bf16" / "log.jsonl").read_text().splitlines())
              if e["event"] == "train" and "loss" in e]
    assert losses and all(math.isfinite(v) for v in losses)


def test_precision_auto_is_fp32_on_a_cpu_and_bf16_on_a_gpu_that_computes_in_it(tmp_path, monkeypatch):
    """``auto`` (the GPU-scale recipes): on this CPU the run is the fp32 run, to the last bit."""
    from parpkit.engine.training import effective_precision

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert effective_precision("auto") == "fp32" and effective_precision("bf16") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert effective_precision("auto") == "bf16"
    monkeypatch.undo()
    losses = {}
    for precision in ("auto", "fp32"):
        path = write_recipe(tmp_path / f"{precision}.yaml", tiny_recipe(**{"training.precision": precision,
                                                                            "training.max_steps": 3}))
        assert main(["run", str(path), "--output-dir", str(tmp_path / precision), "--quiet"]) == 0
        losses[precision] = [e["loss"] for e in map(json.loads, (tmp_path / precision / "log.jsonl").read_text().splitlines())
                             if e["event"] == "train" and "loss" in e]
    assert losses["auto"] and losses["auto"] == losses["fp32"]
