"""Runs that survive a crash: SIGKILL mid-training, resume, same masks and metrics as a run left alone."""

import json

import pytest
import torch
from safetensors.torch import load_file

from parpkit.cli import main
from parpkit.engine import run
from parpkit.errors import ParpkitError
from parpkit.progress import QUIET
from parpkit.recipe import load_recipe
from parpkit.registry import Plugins
from parpkit.resolve import resolve
from tests.conftest import requires_offline, run_and_kill, same_results, tiny_recipe, write_recipe

pytestmark = requires_offline


def _recipe(**changes):
    return tiny_recipe(**{"training.max_steps": 10, "training.save_steps": 2, "pruning.schedule.options": {"interval": 3},
                          "training.learning_rate": 3e-3, **changes})


@pytest.mark.parametrize("schedule", [{"name": "parp", "options": {"interval": 3}},
                                      {"name": "imp", "options": {"rounds": 2, "round_steps": 4}}], ids=["parp", "imp"])
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path, schedule):
    path = write_recipe(tmp_path / "r.yaml", _recipe(**{"pruning.schedule": schedule}))
    alone, killed = tmp_path / "alone", tmp_path / "killed"
    assert main(["run", str(path), "--output-dir", str(alone), "--quiet"]) == 0

    # kill once a complete checkpoint of the second phase (imp) or of the only one (parp) exists
    run_and_kill(path, killed, phase=1 if schedule["name"] == "imp" else 0)
    # re-running into the same directory resumes, also with checkpoints and logs written at other intervals
    # (settings that change no number); the directory's recipe.yaml is then the one it finished with
    again = write_recipe(tmp_path / "again.yaml", _recipe(**{"pruning.schedule": schedule, "training.save_steps": 3,
                                                             "training.logging_steps": 1, "training.keep_checkpoints": 9,
                                                             "training.keep_checkpoints_when_done": True}))
    assert main(["run", str(again), "--output-dir", str(killed), "--quiet"]) == 0
    events = [json.loads(line) for line in (killed / "log.jsonl").open()]
    resumed = next(i for i, e in enumerate(events) if e["event"] == "resume")
    same_results(alone, killed)
    # the training loss is the mean over every update, the killed attempt's included (the Trainer's own counts
    # only the updates after the checkpoint it resumed from)
    la, lk = (json.loads((d / "metrics.json").read_text()) for d in (alone, killed))
    assert la["train_loss_updates"] == lk["train_loss_updates"] == la["steps"] == lk["steps"]
    assert lk["train_loss"] == pytest.approx(la["train_loss"], rel=1e-6)
    if schedule["name"] == "parp":  # one phase: the Trainer's own mean, where it trained every update in one sitting
        logged = [json.loads(line) for line in (alone / "log.jsonl").open()]
        assert next(e["train_loss"] for e in logged if e["event"] == "train" and "train_loss" in e) == pytest.approx(la["train_loss"], rel=1e-6)
    assert load_recipe(killed / "recipe.yaml", [])[0].training.save_steps == 3
    # ... and the phase it resumed keeps the new intervals, not those of the checkpoint it resumed from (2)
    resume = events[resumed]
    phase_end = next((i for i, e in enumerate(events) if i > resumed and e["event"] == "phase"), len(events))
    steps = sorted({e["step"] for e in events[resumed:phase_end] if e["event"] == "train"})  # (a phase's summary repeats)
    assert len(steps) > 1 and all(b - a == 1 for a, b in zip(steps, steps[1:]))  # logged every update
    start = int(resume["checkpoint"].rsplit("-", 1)[1])
    saved = sorted(int(p.name.split("-")[1]) for p in (killed / "checkpoints" / f"phase-{resume['phase']}").glob("checkpoint-*"))
    assert [n for n in saved if start < n < saved[-1]] == [n for n in range(start + 1, saved[-1]) if n % 3 == 0]
    assert not (alone / "checkpoints").exists()  # complete runs drop them


def test_an_incomplete_checkpoint_is_never_used(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", _recipe(**{"training.keep_checkpoints_when_done": True}))
    alone, broken = tmp_path / "alone", tmp_path / "broken"
    assert main(["run", str(path), "--output-dir", str(alone), "--quiet"]) == 0
    assert main(["run", str(path), "--output-dir", str(broken), "--quiet"]) == 0
    # make it look killed during the save of checkpoint-10, after checkpoint-8 completed
    (broken / "metrics.json").unlink()
    last = broken / "checkpoints" / "phase-0" / "checkpoint-10"
    (last / "COMPLETE").unlink()
    (last / "model.safetensors").write_bytes(b"half a file")
    assert main(["run", str(path), "--output-dir", str(broken), "--quiet"]) == 0
    resume = [json.loads(line) for line in (broken / "log.jsonl").open() if json.loads(line)["event"] == "resume"]
    assert resume[-1]["checkpoint"].endswith("checkpoint-8")
    same_results(alone, broken)
    # the resumed run's wall time counts the first attempt up to checkpoint-8, then its own
    before = json.loads((broken / "checkpoints" / "phase-0" / "checkpoint-8" / "parpkit_state.json").read_text())["elapsed"]
    done = [json.loads(line) for line in (broken / "log.jsonl").open() if json.loads(line)["event"] == "done"][-1]
    wall = json.loads((broken / "metrics.json").read_text())["wall_time_s"]
    assert before["attempts"] == 1 and wall["attempts"] == 2
    assert 0 < before["train"] <= before["total"]
    assert wall["total"] == pytest.approx(before["total"] + done["time_s"], abs=0.5)
    assert wall["train"] > before["train"] and wall["evaluate"] >= before["evaluate"]  # (rounded to 0.1 s: a fast evaluation adds 0.0)
    assert json.loads((alone / "metrics.json").read_text())["wall_time_s"]["attempts"] == 1


def test_finished_runs_and_other_recipes_in_the_same_directory(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", _recipe(**{"training.max_steps": 2}))
    out = tmp_path / "out"
    assert main(["run", str(path), "--output-dir", str(out), "--quiet"]) == 0
    assert main(["run", str(path), "--output-dir", str(out), "--quiet"]) == 0
    assert "this run is complete" in " ".join(capsys.readouterr().err.split())
    logged = write_recipe(tmp_path / "l.yaml", _recipe(**{"training.max_steps": 2, "training.logging_steps": 1,
                                                           "vars": {"a_later_arms_rate": 0.1}}))
    assert main(["run", str(logged), "--output-dir", str(out), "--quiet"]) == 0  # logs more often, a new var: the same run
    assert "this run is complete" in " ".join(capsys.readouterr().err.split())
    other = write_recipe(tmp_path / "o.yaml", _recipe(**{"training.max_steps": 3}))
    assert main(["run", str(other), "--output-dir", str(out), "--quiet"]) == 2
    assert "holds a run of a different recipe" in " ".join(capsys.readouterr().err.split())
    assert main(["run", str(other), "--output-dir", str(out), "--quiet", "--fresh"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


def _poisoned(tmp_path, step: int):
    """A 6-step recipe, resolved, whose ``step``-th training batch makes the loss NaN; and its mapping."""
    path = write_recipe(tmp_path / "r.yaml", _recipe(**{"training.max_steps": 6}))
    recipe, mapping = load_recipe(path)
    resolved = resolve(recipe, Plugins(), str(path))
    collate = resolved.backbone.collate
    calls = {"n": 0}

    def poisoned(batch):
        out = collate(batch)
        calls["n"] += 1
        if calls["n"] == step:
            out["input_features"] = out["input_features"] * float("nan")
        return out

    resolved.backbone.collate = poisoned
    return resolved, mapping


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    resolved, mapping = _poisoned(tmp_path, 4)
    with pytest.raises(ParpkitError, match=r"loss became nan at step 4; stopped, the last good checkpoint is .*checkpoint-2") as err:
        run(resolved, QUIET, output_dir=tmp_path / "out", resolved_mapping=mapping)
    # what to do says what happens: a changed recipe is refused in a directory with results (not resumed)
    assert "pass --fresh or a new --output-dir" in str(err.value) and "rerun into this directory to resume" not in str(err.value)
    good = tmp_path / "out" / "checkpoints" / "phase-0" / "checkpoint-2"
    weights = load_file(str(good / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_checkpoint_damaged_in_place_is_never_named_the_last_good_one(tmp_path):
    from transformers import TrainerCallback

    resolved, mapping = _poisoned(tmp_path, 5)

    class Damage(TrainerCallback):  # after checkpoint-4 is marked complete: bytes overwritten, not truncated
        def on_save(self, args, state, control, **kw):
            if state.global_step == 4:
                weights = tmp_path / "out" / "checkpoints" / "phase-0" / "checkpoint-4" / "model.safetensors"
                data = weights.read_bytes()
                weights.write_bytes(data[:len(data) // 2] + b"\xff" * 64 + data[len(data) // 2 + 64:])

    with pytest.raises(ParpkitError, match=r"loss became nan at step 5; stopped, the last good checkpoint is .*checkpoint-2\."):
        run(resolved, QUIET, output_dir=tmp_path / "out", resolved_mapping=mapping, callbacks=[Damage()])


def test_resume_flag_without_a_checkpoint_is_an_error(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", _recipe(**{"training.max_steps": 2}))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet", "--resume"]) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_a_run_directory_written_before_a_new_recipe_key_is_still_recognised(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", _recipe(**{"training.max_steps": 1}))
    out = tmp_path / "out"
    assert main(["run", str(path), "--output-dir", str(out), "--quiet"]) == 0
    # as an older release wrote it: without keys that were added since (at their defaults)
    text = (out / "recipe.yaml").read_text()
    older = "\n".join(line for line in text.splitlines() if not line.startswith(("distillation:", "sweep:", "  report_to:")))
    assert older != text
    (out / "recipe.yaml").write_text(older + "\n")
    capsys.readouterr()
    assert main(["run", str(path), "--output-dir", str(out), "--quiet"]) == 0
    assert "this run is complete" in " ".join(capsys.readouterr().err.split())
