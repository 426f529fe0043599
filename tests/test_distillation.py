"""Distillation from the dense teacher, label-free training data, and regrowth-aware optimizer state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import parpkit
from parpkit.cli import main
from parpkit.masks import PoolPruner
from parpkit.recipe import load_recipe
from parpkit.registry import Plugins
from parpkit.resolve import resolve
from parpkit_plugins.criteria import Magnitude
from parpkit_plugins.schedules import Parp, ParpOptions
from tests.conftest import requires_offline, run_and_kill, same_results, tiny_ctc_recipe, tiny_recipe, write_recipe


def _pretrained(path):
    recipe, _ = load_recipe(path)
    return resolve(recipe, Plugins(), str(path)).backbone.load()  # seeded: the same weights the run started from


@requires_offline
def test_weight_one_and_an_identical_teacher_give_the_divergence_only_and_no_gradient(tmp_path):
    def first_step(weight):
        path = write_recipe(tmp_path / f"r{weight}.yaml", tiny_recipe(**{
            "distillation": {"weight": weight, "temperature": 2.0}, "pruning.sparsity": 0.0, "pruning.schedule": {"name": "fixed"},
            "training.max_steps": 1, "training.logging_steps": 1, "evaluation.dense": False, "evaluation.after_prune": False}))
        result = parpkit.run(path, output_dir=tmp_path / f"out{weight}", progress=False)
        train = [json.loads(line) for line in (result.run_dir / "log.jsonl").open() if '"train"' in line]
        return next(e for e in train if "loss" in e), result

    kd, result = first_step(1.0)
    task, _ = first_step(0.0)
    assert kd["loss"] == 0.0 and task["loss"] > 1  # weight 1: the divergence only; the task loss is left out
    # the student is the teacher: the divergence has no gradient (to rounding: the gradient-free teacher
    # pass may take another attention kernel), while the task loss alone has a large one
    assert kd["grad_norm"] < 1e-6 * task["grad_norm"] and task["grad_norm"] > 1
    teacher = result.metrics["distillation"]
    assert teacher["weight"] == 1.0 and teacher["teacher"] is None and teacher["teacher_memory_mb"] > 0 and teacher["teacher_seconds"] > 0


@requires_offline
def test_the_teacher_is_the_dense_pretrained_model_and_never_changes(tmp_path, monkeypatch):
    from parpkit.engine import lifecycle

    made = []
    original = lifecycle.make_teacher
    monkeypatch.setattr(lifecycle, "make_teacher", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"distillation": {"weight": 0.5, "hidden_weight": 0.1},
                                                            "training.max_steps": 4, "training.learning_rate": 1e-2}))
    result = parpkit.run(path, output_dir=tmp_path / "out", progress=False)
    teacher = made[0].teacher.state_dict()
    pretrained = _pretrained(path).state_dict()
    assert all(torch.equal(teacher[k], pretrained[k]) for k in pretrained)  # dense (copied before the first prune), unchanged
    assert all(not p.requires_grad for p in made[0].teacher.parameters()) and not made[0].teacher.training
    student = load_file(str(result.model_dir / "model.safetensors"))
    assert any(not torch.equal(student[k], pretrained[k]) for k in student)  # while the student trained
    assert result.final["pool_sparsity"] == pytest.approx(0.5, abs=1e-3)


@requires_offline
def test_a_distilled_run_resumes_after_sigkill_to_the_same_weights(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{
        "distillation": {"weight": 0.7, "temperature": 3.0}, "training.max_steps": 8, "training.save_steps": 2,
        "training.learning_rate": 3e-3, "pruning.schedule.options": {"interval": 3}}))
    alone, killed = tmp_path / "alone", tmp_path / "killed"
    assert main(["run", str(path), "--output-dir", str(alone), "--quiet"]) == 0
    run_and_kill(path, killed)
    assert main(["run", str(path), "--output-dir", str(killed), "--quiet"]) == 0
    assert "resume" in (killed / "log.jsonl").read_text()
    same_results(alone, killed)


@requires_offline
def test_label_free_training_audio_needs_distillation_and_gets_the_teachers_transcripts(tmp_path, capsys):
    from parpkit.progress import QUIET
    from parpkit_plugins.datasets.synthetic_speech import SyntheticOptions, SyntheticSpeech

    utts = SyntheticSpeech(SyntheticOptions(sizes={"train": 6, "test": 2}, speakers={"train": 2, "test": 1}),
                           cache_dir=tmp_path / "synth").load_split("train", QUIET)
    rows = []
    for u in utts:
        sf.write(tmp_path / f"{u.id}.wav", u.audio, 16000)
        rows.append({"audio": f"{u.id}.wav", "text": u.text})
    (tmp_path / "unlabelled.jsonl").write_text("".join(json.dumps({"audio": r["audio"]}) + "\n" for r in rows[:4]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    dataset = {"name": "manifest", "options": {"splits": {"train": str(tmp_path / "unlabelled.jsonl"),
                                                          "test": str(tmp_path / "test.jsonl")}}}
    plain = write_recipe(tmp_path / "plain.yaml", tiny_recipe(**{"dataset": dataset, "training.max_steps": 1}))
    assert main(["run", str(plain), "--output-dir", str(tmp_path / "plain"), "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "4 of the 4 utterances of 'train' have no transcript; unlabelled audio trains only with distillation" in err
    distilled = write_recipe(tmp_path / "d.yaml", tiny_recipe(**{"dataset": dataset, "training.max_steps": 2,
                                                                 "distillation": {"weight": 0.5}}))
    result = parpkit.run(distilled, output_dir=tmp_path / "d", progress=False)
    labels = [json.loads(line) for line in (result.run_dir / "pseudo_labels.jsonl").open()]
    assert [r["id"] for r in labels] == ["train-000000", "train-000001", "train-000002", "train-000003"]
    # the targets are the teacher's own transcripts: the pretrained model decoding the audio
    from parpkit_plugins.backbones.whisper import WhisperBackbone

    recipe, _ = load_recipe(distilled)
    backbone = resolve(recipe, Plugins(), str(distilled)).backbone
    assert isinstance(backbone, WhisperBackbone)
    teacher = backbone.load().eval()
    audio = [sf.read(tmp_path / r["audio"], dtype="float32")[0] for r in rows[:4]]
    assert [r["text"] for r in labels] == backbone.transcribe(teacher, audio)
    assert result.metrics["distillation"]["pseudo_labelled"] == 4


@requires_offline
def test_ctc_distillation_matches_frame_posteriors(tmp_path):
    result = parpkit.run(tiny_ctc_recipe(**{"distillation": {"weight": 0.5, "temperature": 1.0}, "training.max_steps": 2,
                                            "training.logging_steps": 1}), output_dir=tmp_path / "out", progress=False)
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "log.jsonl").open() if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert result.metrics["distillation"]["teacher_seconds"] > 0


def test_parp_can_reset_adam_moments_of_regrown_weights():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4, bias=False)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    pruner = PoolPruner(model, ["weight"], Magnitude(), "global")
    pruner.optimizer = opt
    schedule = Parp(ParpOptions(interval=3, reset_moments="regrown"), target=0.5)
    schedule.on_start(pruner)
    first = pruner.masks["weight"].clone()
    x = torch.randn(32, 16)
    for step in range(1, 4):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        if step < 3:
            continue
        schedule.on_optimizer_step(step, pruner)
    regrown = pruner.masks["weight"] & ~first
    assert regrown.any() and schedule.moments_reset == int(regrown.sum())
    state = opt.state[model.weight]
    assert not state["exp_avg"][regrown].any() and not state["exp_avg_sq"][regrown].any()
    assert state["exp_avg_sq"][pruner.masks["weight"] & first].all()  # kept all along: untouched
    assert Parp(ParpOptions(), target=0.5).options.reset_moments == "keep"  # the reference keeps them
