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
    with backbone.native(teacher):  # the teacher as published: its own window, not the training one
        assert [r["text"] for r in labels] == backbone.transcribe(teacher, audio)
    assert result.metrics["distillation"]["pseudo_labelled"] == 4


def _group_norm_ctc(**changes) -> dict:
    """The tiny wav2vec2 as wav2vec2-base is built: group-norm feature encoder, no attention mask."""
    mapping = tiny_ctc_recipe(**changes)
    mapping["backbone"]["options"]["config"].update(feat_extract_norm="group", do_stable_layer_norm=False)
    return mapping


def _ctc_teacher(tmp_path, mapping):
    """A CTC model over the vocabulary the run builds, saved as a run saves its model (a stand-in fine-tune)."""
    from parpkit.progress import QUIET

    resolved = _whisper(write_recipe(tmp_path / "teacher.yaml", mapping))
    backbone = resolved.backbone
    backbone.prepare(list(resolved.dataset.load_split("train", QUIET)), "words")
    torch.manual_seed(1)
    model = backbone.load()
    with torch.no_grad():
        model.lm_head.weight.normal_()  # another head than the student's: a divergence to learn
    backbone.save(model, tmp_path / "teacher")
    return tmp_path / "teacher"


@requires_offline
def test_ctc_distillation_matches_frame_posteriors(tmp_path):
    teacher = _ctc_teacher(tmp_path, _group_norm_ctc())
    result = parpkit.run(_group_norm_ctc(**{"distillation": {"weight": 0.5, "temperature": 1.0, "teacher": str(teacher)},
                                            "training.max_steps": 2, "training.logging_steps": 1}),
                         output_dir=tmp_path / "out", progress=False)
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "log.jsonl").open() if '"loss"' in line]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert result.metrics["distillation"]["teacher_seconds"] > 0


@requires_offline
def test_ctc_distillation_leaves_padding_frames_out_without_an_attention_mask(tmp_path):
    """wav2vec2-base takes no attention mask: the utterances' lengths travel beside the model inputs, and
    the divergence averages over real frames only."""
    import torch.nn.functional as F

    from parpkit.engine.distill import Distiller
    from parpkit.interfaces import Utterance
    from parpkit.recipe import DistillationSection

    resolved = _whisper(write_recipe(tmp_path / "r.yaml", _group_norm_ctc()))
    backbone = resolved.backbone
    rng = np.random.default_rng(0)
    utts = [Utterance(str(i), (rng.standard_normal(n) * 0.1).astype(np.float32), 16000, "ab ba")
            for i, n in enumerate((8000, 16000))]
    backbone.prepare(utts, "words")
    student, teacher = backbone.load().eval(), backbone.load().eval()
    with torch.no_grad():
        teacher.lm_head.weight.normal_()
    batch = backbone.collate(utts)
    assert "attention_mask" not in batch and batch["input_lengths"].tolist() == [8000, 16000]
    with torch.no_grad():
        out = student(**backbone.model_inputs(batch))
        t = teacher(**backbone.model_inputs(batch)).logits
    frames = backbone._frames(torch.tensor([8000, 16000])).tolist()
    assert frames[0] < frames[1] == out.logits.shape[1]
    mask = backbone.output_mask(batch, out.logits)
    assert mask.sum(1).tolist() == frames  # not every frame of the padded batch
    settings = DistillationSection(weight=1.0, temperature=1.0)
    loss = Distiller(teacher.requires_grad_(False), backbone, settings).loss(out.loss, out, batch)
    kl = lambda a, b: (F.softmax(b, -1) * (F.log_softmax(b, -1) - F.log_softmax(a, -1))).sum(-1)  # noqa: E731
    real = torch.cat([kl(out.logits[0, :frames[0]], t[0, :frames[0]]), kl(out.logits[1], t[1])])
    assert float(loss) == pytest.approx(float(real.mean()), rel=1e-5)
    assert float(loss) != pytest.approx(float(kl(out.logits, t).mean()), rel=1e-3)  # what counting padding gives


def test_ctc_distillation_from_the_pretrained_model_is_refused_before_anything_loads(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_ctc_recipe(**{"distillation": {"weight": 0.5}}))
    assert main(["validate", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{path}: distillation.teacher: null (the pretrained model as loaded) cannot teach" in err
    assert "CTC head" in err and "randomly initialised" in err and "a fine-tuned CTC teacher directory is needed" in err
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert not (tmp_path / "out").exists()


def test_label_free_ctc_training_without_transcripts_to_build_a_vocabulary_is_refused(tmp_path):
    from parpkit.errors import ParpkitError
    from parpkit_plugins.backbones.wav2vec2 import CTCBackbone, CTCOptions
    from tests.conftest import TINY_WAV2VEC2

    b = CTCBackbone(CTCOptions(config=dict(TINY_WAV2VEC2)), cache_dir=tmp_path)
    with pytest.raises(ParpkitError, match="CTC vocabulary is built from the training transcripts, and no training "
                                           "utterance has one"):
        b.prepare([], "words")


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


def _whisper(path):
    recipe, _ = load_recipe(path)
    return resolve(recipe, Plugins(), str(path))


def _save_full_window_teacher(tmp_path):
    """The tiny whisper with whisper's full 30 s window, saved as a run saves its model."""
    full = tiny_recipe()
    del full["backbone"]["options"]["encoder_window_s"]
    backbone = _whisper(write_recipe(tmp_path / "full.yaml", full)).backbone
    model = backbone.load()
    assert model.config.max_source_positions == 1500
    backbone.save(model, tmp_path / "teacher")
    return tmp_path / "teacher"


@requires_offline
def test_a_teacher_directory_takes_the_students_encoder_window(tmp_path):
    from transformers import WhisperForConditionalGeneration

    from parpkit.engine.distill import Distiller, make_teacher
    from parpkit.progress import QUIET

    directory = _save_full_window_teacher(tmp_path)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{  # encoder_window_s: 6
        "distillation": {"weight": 0.5, "teacher": str(directory), "hidden_weight": 0.1}, "training.max_steps": 3,
        "training.logging_steps": 1, "evaluation.dense": False, "evaluation.after_prune": False}))
    resolved = _whisper(path)
    backbone = resolved.backbone
    student = backbone.load()
    assert student.config.max_source_positions == 300
    loaded = make_teacher(resolved.recipe.distillation, student, backbone, torch.device("cpu"), "fp32", str(path))
    # the same weights with the window cut by hand
    by_hand = WhisperForConditionalGeneration.from_pretrained(directory).eval()
    encoder = by_hand.model.encoder
    cut = torch.nn.Embedding(300, encoder.embed_positions.embedding_dim)
    cut.weight.data.copy_(encoder.embed_positions.weight.data[:300])
    encoder.embed_positions, encoder.max_source_positions, by_hand.config.max_source_positions = cut, 300, 300
    assert torch.equal(loaded.teacher.model.encoder.embed_positions.weight, cut.weight)
    batch = backbone.collate(list(resolved.dataset.load_split("train", QUIET))[:4])
    assert batch["input_features"].shape[-1] == 600  # the student's 6 s, not 30 s
    out = student(**batch, output_hidden_states=True)
    a = loaded.loss(out.loss, out, batch)
    b = Distiller(by_hand.requires_grad_(False), backbone, resolved.recipe.distillation).loss(out.loss, out, batch)
    assert torch.isfinite(a) and torch.equal(a, b)
    # and a run distils from it to the end
    result = parpkit.run(path, output_dir=tmp_path / "out", progress=False)
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "log.jsonl").open() if '"loss"' in line]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert result.metrics["distillation"]["teacher"] == str(directory) and result.metrics["steps"] == 3


@requires_offline
def test_a_whisper_teacher_with_another_tokenizer_is_refused_before_compute(tmp_path):
    from transformers import AutoTokenizer

    from parpkit.engine.distill import make_teacher
    from parpkit.errors import RecipeError

    directory = _save_full_window_teacher(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.add_tokens(["<|not-the-students|>"])
    tokenizer.save_pretrained(directory)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"distillation": {"teacher": str(directory)}}))
    resolved = _whisper(path)
    resolved.backbone.check_teacher(str(directory))  # the configs agree: only the tokens differ
    student = resolved.backbone.load()
    with pytest.raises(RecipeError, match=r"distillation\.teacher: .* has another tokenizer than the student "
                                          r"\(e\.g\. token '<\|not-the-students\|>'\)"):
        make_teacher(resolved.recipe.distillation, student, resolved.backbone, torch.device("cpu"), "fp32", str(path))


def _whisper_teacher(directory, **config):
    from transformers import WhisperConfig

    from tests.conftest import TINY_WHISPER

    WhisperConfig(**{**TINY_WHISPER, "vocab_size": 51864, "decoder_start_token_id": 50257, "bos_token_id": 50257,
                     "eos_token_id": 50256, "pad_token_id": 50256, **config}).save_pretrained(directory)
    return directory


@requires_offline
@pytest.mark.parametrize("teacher, hidden_weight, says", [
    ({"vocab_size": 51865}, 0.0, "a vocabulary of 51865 tokens (the student's 51864)"),
    ({"num_mel_bins": 128}, 0.0, "128 mel bins (the student's 80)"),
    ({"max_source_positions": 100}, 0.0, "an encoder of 2 s (the student's window: 6 s)"),
    ({"d_model": 32}, 0.1, "d_model 32 (the student's 16) (distillation.hidden_weight matches hidden states"),
    ("wav2vec2", 0.0, "is a wav2vec2 model; a whisper student needs a whisper teacher"),
    ("missing", 0.0, "no such model directory"),
    ("./missing", 0.0, "no such model directory"),
    ("runs/dense/model", 0.0, "runs/dense/model: no such model directory"),
])
def test_validate_refuses_a_teacher_that_cannot_take_the_students_batches(tmp_path, capsys, teacher, hidden_weight, says):
    from transformers import Wav2Vec2Config

    if teacher == "wav2vec2":
        source = str(tmp_path / "t")
        Wav2Vec2Config().save_pretrained(source)
    elif teacher == "missing":
        source = str(tmp_path / "no" / "such" / "dir")
    elif teacher in ("./missing", "runs/dense/model"):
        source = "./no-such-teacher" if teacher == "./missing" else teacher
    else:
        source = str(_whisper_teacher(tmp_path / "t", **teacher))
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"distillation": {"teacher": source, "hidden_weight": hidden_weight}}))
    assert main(["validate", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and f"{path}: distillation.teacher: " in err and says in err, err
    assert len(err.splitlines()) == 1


@requires_offline
def test_a_teacher_of_another_size_teaches_without_hidden_state_matching(tmp_path, capsys):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from parpkit.engine.distill import make_teacher
    from parpkit.progress import QUIET

    source = _whisper_teacher(tmp_path / "t", d_model=32, encoder_layers=2)  # a bigger whisper: outputs still compare
    WhisperForConditionalGeneration(WhisperConfig.from_pretrained(source)).save_pretrained(source)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"distillation": {"teacher": str(source)}}))
    assert main(["validate", str(path)]) == 0
    assert "recipe is valid" in capsys.readouterr().out
    resolved = _whisper(path)
    student = resolved.backbone.load()
    distiller = make_teacher(resolved.recipe.distillation, student, resolved.backbone, torch.device("cpu"), "fp32", str(path))
    assert distiller.teacher.model.encoder.embed_positions.weight.shape == (300, 32)
    batch = resolved.backbone.collate(list(resolved.dataset.load_split("train", QUIET))[:2])
    out = student(**batch)
    assert torch.isfinite(distiller.loss(out.loss, out, batch))


@requires_offline
@pytest.mark.parametrize("teacher, says", [
    ("whisper", "is a whisper model; this wav2vec2 student is a wav2vec2"),
    ("pretrained", "no trained CTC head (it is a Wav2Vec2ForPreTraining; give a fine-tuned CTC model)"),
    ("conv", "conv_stride [5, 2, 2, 2, 2, 2, 4] (the student's [5, 2, 2, 2, 2, 2, 2])"),
])
def test_validate_refuses_a_ctc_teacher_of_another_kind(tmp_path, capsys, teacher, says):
    from transformers import Wav2Vec2Config

    from tests.conftest import TINY_WAV2VEC2

    source = tmp_path / "t"
    if teacher == "whisper":
        _whisper_teacher(source)
    else:
        config = Wav2Vec2Config(**TINY_WAV2VEC2, **({"conv_stride": [5, 2, 2, 2, 2, 2, 4]} if teacher == "conv" else {}))
        config.architectures = ["Wav2Vec2ForPreTraining" if teacher == "pretrained" else "Wav2Vec2ForCTC"]
        config.save_pretrained(source)
    path = write_recipe(tmp_path / "r.yaml", tiny_ctc_recipe(**{"distillation": {"teacher": str(source)}}))
    assert main(["validate", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and f"{path}: distillation.teacher: {source} " in err and says in err, err


@requires_offline
def test_a_ctc_teacher_must_have_the_vocabulary_the_run_builds(tmp_path):
    from dataclasses import replace

    from parpkit.engine.distill import make_teacher
    from parpkit.errors import RecipeError
    from parpkit.progress import QUIET

    path = write_recipe(tmp_path / "r.yaml", tiny_ctc_recipe(**{"distillation": {"teacher": str(tmp_path / "teacher")}}))
    resolved = _whisper(path)
    backbone, settings = resolved.backbone, resolved.recipe.distillation
    train = list(resolved.dataset.load_split("train", QUIET))
    backbone.prepare(train, "words")
    student = backbone.load()
    backbone.save(student, tmp_path / "teacher")
    backbone.check_teacher(settings.teacher)  # config only: a CTC model of the same architecture
    teacher = make_teacher(settings, student, backbone, torch.device("cpu"), "fp32", str(path)).teacher
    assert teacher.lm_head.weight.shape == student.lm_head.weight.shape
    backbone.prepare([replace(u, text="zzz qqq") for u in train], "words")  # another vocabulary this time
    other = backbone.load()
    with pytest.raises(RecipeError, match=r"distillation\.teacher: .*CTC head of \d+ outputs; the vocabulary this run built"):
        make_teacher(settings, other, backbone, torch.device("cpu"), "fp32", str(path))


@requires_offline
def test_validate_checks_the_teacher_of_every_sweep_point(tmp_path, capsys):
    good = _whisper_teacher(tmp_path / "good")
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{
        "distillation": {"weight": 0.5}, "sweep": {"grids": [{"distillation.teacher": [str(good), str(tmp_path / "gone")]}]}}))
    assert main(["validate", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and "(sweep point" in err and f"distillation.teacher: {tmp_path / 'gone'}: no such model directory" in err


@requires_offline
def test_features_on_the_device_give_the_runs_results_with_distillation_and_calibration(tmp_path):
    """The device feature path through the whole engine: calibration batches (sparsegpt), the student's and
    the teacher's forward, evaluation: the same masks, weights and scores as features computed in collation."""
    results = []
    for where in ("cpu", "device"):
        path = write_recipe(tmp_path / f"{where}.yaml", tiny_recipe(**{
            "backbone.options.features": where, "distillation": {"weight": 0.5, "temperature": 2.0, "hidden_weight": 0.1},
            "pruning.criterion": {"name": "sparsegpt"}, "pruning.calibration": {"utterances": 4}, "pruning.scope": "per_tensor",
            "pruning.include": [r"model\.(encoder|decoder)\.layers\.\d+\.fc[12]\.weight"], "pruning.schedule": {"name": "fixed"},
            "training.max_steps": 3}))
        results.append(parpkit.run(path, output_dir=tmp_path / where, progress=False).run_dir)
    same_results(*results)


# --------------------------------------------------------------------------------- distillation's hidden states

class _Backbone:
    """The part of a backbone the hidden-state term reads: real positions from the labels."""

    def hidden_mask(self, batch, kind, positions):
        return None if kind == "encoder_hidden_states" else (batch["labels"] != -100)[:, :positions]


def test_the_hidden_state_loss_leaves_padded_positions_out():
    from parpkit.engine.distill import Distiller
    from parpkit.recipe import DistillationSection

    distiller = Distiller(torch.nn.Linear(1, 1), _Backbone(), DistillationSection(hidden_weight=1.0))
    labels = torch.tensor([[5, 6, 7, -100], [5, -100, -100, -100]])
    teacher = torch.randn(2, 4, 3)
    student = teacher.clone()
    student[0, 3] += 100.0  # padding only
    student[1, 1:] -= 50.0
    assert distiller.hidden_term({"labels": labels}, "decoder_hidden_states", student, teacher) == 0
    student[0, 1] += 2.0  # one real position, all 3 features: (4 · 3 / 3) over 4 real positions
    assert distiller.hidden_term({"labels": labels}, "decoder_hidden_states", student, teacher) == pytest.approx(1.0)
    # encoder frames have no padding to leave out (whisper's window): every position counts
    assert distiller.hidden_term({"labels": labels}, "encoder_hidden_states", student, teacher) > 100


def test_whisper_and_wav2vec2_say_which_hidden_states_are_real(tmp_path):
    from parpkit_plugins.backbones.wav2vec2 import CTCBackbone, CTCOptions
    from parpkit_plugins.backbones.whisper import WhisperBackbone, WhisperOptions

    whisper = WhisperBackbone(WhisperOptions(config={"d_model": 16}, tokenizer="t.json"), cache_dir=tmp_path)
    labels = torch.tensor([[1, 2, -100], [1, -100, -100]])
    assert whisper.hidden_mask({"labels": labels}, "decoder_hidden_states", 3).tolist() == [[True, True, False], [True, False, False]]
    assert whisper.hidden_mask({"labels": labels}, "encoder_hidden_states", 300) is None
    ctc = CTCBackbone(CTCOptions(config={"hidden_size": 32}), cache_dir=tmp_path)
    batch = {"labels": labels, "attention_mask": torch.tensor([[1] * 800, [1] * 400 + [0] * 400])}
    real = ctc.hidden_mask(batch, "hidden_states", 2)
    assert real.tolist() == [[True, True], [True, False]]
