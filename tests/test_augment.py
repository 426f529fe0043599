"""Training-audio augmentation (``dataset.augment``): audiomentations transforms on fine-tuning batches only,
drawn from the seed, the utterance and the epoch, so a resumed run hears what an uninterrupted one does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import parpkit
from parpkit.augment import AUGMENTED, AugmentedDataset, augment, build
from parpkit.cli import main
from parpkit.errors import ParpkitError
from parpkit.interfaces import Utterance
from parpkit.testing import crash_and_resume
from tests.conftest import requires_offline, tiny_recipe, write_recipe

pytest.importorskip("audiomentations")

NOISE = [{"name": "AddGaussianSNR", "min_snr_db": 5.0, "max_snr_db": 20.0, "p": 1.0},
         {"name": "LowPassFilter", "min_cutoff_freq": 1500.0, "max_cutoff_freq": 4000.0, "p": 0.5}]


def _utterance(i: int) -> Utterance:
    t = np.arange(16000, dtype=np.float32) / 16000
    return Utterance(id=f"u{i}", audio=(0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32),
                     sample_rate=16000, text="a b", speaker="s")


def test_draws_depend_on_seed_utterance_and_epoch_only_and_leave_global_random_state_alone():
    compose = build(NOISE)
    u = _utterance(0)
    np.random.seed(1)
    before = np.random.random(3)
    np.random.seed(1)
    a = augment(compose, u, seed=0, epoch=0)
    assert np.array_equal(np.random.random(3), before)  # the caller's stream is untouched
    assert np.array_equal(a.audio, augment(build(NOISE), u, seed=0, epoch=0).audio)  # a fresh compose draws alike
    assert a.audio.dtype == np.float32 and a.audio.shape == u.audio.shape and a.extra[AUGMENTED] and not a.cacheable and u.cacheable
    assert not np.array_equal(a.audio, u.audio)
    assert not np.array_equal(a.audio, augment(compose, u, seed=0, epoch=1).audio)
    assert not np.array_equal(a.audio, augment(compose, u, seed=1, epoch=0).audio)
    assert not np.array_equal(a.audio, augment(compose, _utterance(0).__class__(**{**u.__dict__, "id": "v"}), 0, 0).audio)
    snr = 10 * np.log10(np.mean(u.audio ** 2) / np.mean((a.audio - u.audio) ** 2))
    assert 0 < snr < 25  # noise at about the asked SNR (the low-pass filter may add its own change)


def test_the_dataset_follows_the_trainers_epoch():
    data = AugmentedDataset([_utterance(i) for i in range(3)], NOISE, seed=0)
    first = data[1].audio
    assert np.array_equal(data[1].audio, first)
    data.set_epoch(1)
    assert not np.array_equal(data[1].audio, first)
    data.set_epoch(0)
    assert np.array_equal(data[1].audio, first)


@pytest.mark.parametrize("spec, text", [
    ([{"name": "NoSuchTransform"}], "not an audiomentations transform"),
    ([{"name": "AddGaussianSNR", "min_snr_db": 30.0, "max_snr_db": 5.0}], r"augment\[0\] \(AddGaussianSNR\)"),
    ([{"name": "AddGaussianSNR", "loudness": 3}], r"augment\[0\] \(AddGaussianSNR\)"),
])
def test_a_bad_transform_is_refused_naming_the_entry(spec, text):
    with pytest.raises(ParpkitError, match=text):
        build(spec)


def test_a_transform_that_fails_only_when_applied_is_refused_when_built(monkeypatch):
    """An optional dependency missing (RoomSimulator's pyroomacoustics, Mp3Compression's encoder) shows only when
    a transform runs; each is tried once on a probe when built, whatever its p."""
    import audiomentations

    class NeedsAPackage(audiomentations.core.transforms_interface.BaseWaveformTransform):
        def apply(self, samples, sample_rate):
            raise ImportError("No module named 'some_optional_package'")

    monkeypatch.setattr(audiomentations, "NeedsAPackage", NeedsAPackage, raising=False)
    with pytest.raises(ParpkitError, match=r"augment\[1\] \(NeedsAPackage\): No module named 'some_optional_package'"):
        build([{"name": "AddGaussianSNR", "p": 0.5}, {"name": "NeedsAPackage", "p": 0.01}])


def test_audio_pushed_past_full_scale_is_scaled_down_not_clipped():
    u = _utterance(3)
    louder = augment(build([{"name": "Gain", "min_gain_db": 20.0, "max_gain_db": 20.0, "p": 1.0}]), u, seed=0, epoch=0)
    assert np.abs(louder.audio).max() == pytest.approx(1.0)
    assert np.allclose(louder.audio, u.audio / np.abs(u.audio).max(), atol=1e-5)  # the waveform's shape kept


def test_reverberation_runs_and_keeps_the_length_when_asked():
    pytest.importorskip("pyroomacoustics")
    u = _utterance(1)
    wet = augment(build([{"name": "RoomSimulator", "leave_length_unchanged": True, "p": 1.0}]), u, seed=0, epoch=0)
    assert wet.audio.shape == u.audio.shape and not np.allclose(wet.audio, u.audio)


@requires_offline
def test_validate_refuses_a_bad_transform_before_anything_trains(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"dataset.augment": [{"name": "AddGaussianSNR", "p": 7}]}))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "dataset.augment" in err and "AddGaussianSNR" in err


@requires_offline
def test_augmentation_changes_training_only_and_resumes_exactly(tmp_path, monkeypatch):
    """The same run with and without augmentation: the dense scores are the same (scored audio is not
    augmented), the trained weights differ; a run stopped after a checkpoint and resumed ends where an
    uninterrupted one does (the draws follow the epoch the Trainer resumes in)."""
    base = {"training.max_steps": 6, "training.batch_size": 2, "training.save_steps": 2, "pruning.schedule": {"name": "fixed"},
            "training.learning_rate": 3e-3}
    plain = parpkit.run(tiny_recipe(**base), output_dir=tmp_path / "plain", progress=False)
    noisy_recipe = tiny_recipe(**base, **{"dataset.augment": NOISE})
    epochs: list[int] = []
    set_epoch = AugmentedDataset.set_epoch
    monkeypatch.setattr(AugmentedDataset, "set_epoch", lambda self, e: (epochs.append(e), set_epoch(self, e))[1])
    noisy = parpkit.run(noisy_recipe, output_dir=tmp_path / "noisy", progress=False)
    assert set(epochs) == {0, 1} and epochs == sorted(epochs)  # 8 utterances in batches of 2: 6 steps, two epochs
    metrics = {k: json.loads((r.run_dir / "metrics.json").read_text()) for k, r in (("plain", plain), ("noisy", noisy))}
    assert metrics["plain"]["stages"]["dense"] == metrics["noisy"]["stages"]["dense"]
    assert metrics["plain"]["train_loss"] != metrics["noisy"]["train_loss"]
    # in a worker process the data hears each epoch too (workers are not kept across epochs when augmenting)
    workers = parpkit.run({**noisy_recipe, "training": {**noisy_recipe["training"], "dataloader_workers": 1}},
                          output_dir=tmp_path / "workers", progress=False)
    assert _same_weights(workers, noisy)
    resumed = crash_and_resume(noisy_recipe, tmp_path / "resumed", after_checkpoints=2)
    assert resumed.final == noisy.final and _same_weights(resumed, noisy)
    assert not _same_weights(plain, noisy)


def _same_weights(a, b) -> bool:
    wa, wb = (load_file(str(r.run_dir / "model" / "model.safetensors")) for r in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
