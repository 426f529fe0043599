"""The whisper backbone: CTranslate2 conversion, loading errors, the encoder window, batches."""

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from parpkit.errors import ModelFormatError, ParpkitError
from parpkit_plugins.backbones.whisper import WhisperBackbone, WhisperOptions
from tests.conftest import OFFLINE, TINY_WHISPER, offline_file, requires_offline
from tests.ct2_writer import write_ct2

pytestmark = requires_offline
TOKENIZER = offline_file("model/tokenizer.json") if OFFLINE else None


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=51864, **TINY_WHISPER, decoder_start_token_id=50257, pad_token_id=50256,
                        eos_token_id=50256, bos_token_id=50257)
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # float16-representable weights: the round trip is then exact
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def test_ct2_directory_converts_to_the_same_model(reference, tmp_path):
    src = write_ct2(reference, tmp_path / "ct2", TOKENIZER)
    backbone = WhisperBackbone(WhisperOptions(model=str(src), max_new_tokens=8), cache_dir=tmp_path / "cache")
    model = backbone.load().eval()
    ref = reference.state_dict()
    got = model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    feats = torch.randn(1, 80, 3000)
    dec = torch.tensor([[50257, 50362, 400]])
    with torch.no_grad():
        assert torch.allclose(model(feats, decoder_input_ids=dec).logits, reference(feats, decoder_input_ids=dec).logits, atol=1e-5)
    # converted once: the cache directory is reused (same path, untouched)
    cached = list((tmp_path / "cache" / "whisper-ct2").iterdir())
    assert len(cached) == 1 and (cached[0] / "COMPLETE").exists()
    mtime = (cached[0] / "model.safetensors").stat().st_mtime_ns
    WhisperBackbone(WhisperOptions(model=str(src), max_new_tokens=8), cache_dir=tmp_path / "cache").load()
    assert (cached[0] / "model.safetensors").stat().st_mtime_ns == mtime


def test_truncated_model_bin_names_the_file_and_what_was_expected(reference, tmp_path):
    src = write_ct2(reference, tmp_path / "ct2", TOKENIZER)
    data = (src / "model.bin").read_bytes()
    (src / "model.bin").write_bytes(data[: len(data) // 2])
    backbone = WhisperBackbone(WhisperOptions(model=str(src), max_new_tokens=8), cache_dir=tmp_path / "cache")
    with pytest.raises(ModelFormatError, match=r"model\.bin: truncated while reading the data of .*needs \d+ bytes at offset"):
        backbone.load()


def test_missing_file_in_ct2_directory(reference, tmp_path):
    src = write_ct2(reference, tmp_path / "ct2", TOKENIZER)
    (src / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match=r"not a complete CTranslate2 Whisper model: missing tokenizer\.json"):
        WhisperBackbone(WhisperOptions(model=str(src), max_new_tokens=8), cache_dir=tmp_path / "cache").load()


def test_missing_model_directory_and_package(tmp_path):
    with pytest.raises(ModelFormatError, match="no such model directory"):
        WhisperBackbone(WhisperOptions(model=str(tmp_path / "absent")), cache_dir=tmp_path).load()
    # a relative path that is no folder: named as one, not looked up as a hub id ("owner/name" has one slash)
    with pytest.raises(ModelFormatError, match=r"^runs/absent/model: no such model directory"):
        WhisperBackbone(WhisperOptions(model="runs/absent/model"), cache_dir=tmp_path).load()
    with pytest.raises(ParpkitError, match="package 'no_such_pkg' is not installed"):
        WhisperBackbone(WhisperOptions(model="package:no_such_pkg/model"), cache_dir=tmp_path).load()


def test_encoder_window_slices_positions_and_keeps_outputs_for_short_audio(tmp_path):
    opts = dict(config=dict(TINY_WHISPER), tokenizer=str(TOKENIZER), seed=3, max_new_tokens=8)
    full = WhisperBackbone(WhisperOptions(**opts), cache_dir=tmp_path).load().eval()
    cut_backbone = WhisperBackbone(WhisperOptions(**opts, encoder_window_s=5), cache_dir=tmp_path)
    cut = cut_backbone.load().eval()
    assert cut.config.max_source_positions == 250
    assert cut.model.encoder.embed_positions.weight.shape[0] == 250
    assert torch.equal(cut.model.encoder.embed_positions.weight, full.model.encoder.embed_positions.weight[:250])
    audio = [np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32) * 0.1]
    assert cut_backbone._features(audio).shape[-1] == 500
    with pytest.raises(ParpkitError, match="longer than the encoder window of 5 s"):
        cut_backbone._features([np.zeros(16000 * 6, np.float32)], ["u1"])


def test_collate_labels_follow_the_decoder_prompt(tmp_path):
    from parpkit.interfaces import Utterance

    b = WhisperBackbone(WhisperOptions(config=dict(TINY_WHISPER), tokenizer=str(TOKENIZER), encoder_window_s=2, max_new_tokens=8), cache_dir=tmp_path)
    model = b.load()
    batch = b.collate([Utterance("a", np.zeros(8000, np.float32), 16000, "Hello there."),
                       Utterance("b", np.zeros(4000, np.float32), 16000, "Hi.")])
    labels = batch["labels"]
    assert labels[0, 0] == 50362 and labels[0, -1] == 50256  # <|notimestamps|> … <|endoftext|>; the start token is the model's
    assert (labels[1] == -100).sum() == labels.shape[1] - len(b.tokenizer("Hi.").input_ids) + 1
    assert b.tokenizer.decode(labels[0], skip_special_tokens=True) == "Hello there."
    assert torch.isfinite(model(**batch).loss)


def test_features_on_the_device_equal_the_extractors_and_train_alike(tmp_path):
    """``features: device``: batches carry padded audio; model_inputs computes the log-mel features where the
    batch lies; they equal the feature extractor's (CPU path), and so do the loss and the transcripts."""
    from parpkit.interfaces import Utterance

    opts = dict(config=dict(TINY_WHISPER), tokenizer=str(TOKENIZER), encoder_window_s=3, max_new_tokens=4, seed=1)
    cpu = WhisperBackbone(WhisperOptions(**opts, features="cpu"), cache_dir=tmp_path)
    dev = WhisperBackbone(WhisperOptions(**opts, features="device"), cache_dir=tmp_path)
    model, _ = cpu.load().eval(), dev.load()
    rng = np.random.default_rng(0)
    utts = [Utterance(f"u{i}", (rng.standard_normal(n) * 0.1).astype(np.float32), 16000, text)
            for i, (n, text) in enumerate([(16000, "One two."), (40000, "Three."), (7000, "Four five six.")])]
    a, b = cpu.collate(utts), dev.collate(utts)
    assert set(b) == {"input_audio", "labels"} and b["input_audio"].shape == (3, 48000)
    assert torch.equal(b["input_audio"][1, 40000:], torch.zeros(8000))  # zero padding, as the extractor pads
    assert torch.equal(a["labels"], b["labels"])
    features = dev.model_inputs(b)
    assert set(features) == {"input_features", "labels"}
    assert torch.allclose(features["input_features"], a["input_features"], atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model(**features).loss, model(**cpu.model_inputs(a)).loss, atol=1e-5)
    assert dev.transcribe(model, [u.audio for u in utts]) == cpu.transcribe(model, [u.audio for u in utts])
    with pytest.raises(ParpkitError, match="longer than the encoder window of 3 s"):
        dev.collate([Utterance("long", np.zeros(16000 * 4, np.float32), 16000, "x")])


def test_labels_are_tokenised_once_per_transcript(tmp_path, monkeypatch):
    from parpkit.interfaces import Utterance

    b = WhisperBackbone(WhisperOptions(config=dict(TINY_WHISPER), tokenizer=str(TOKENIZER), encoder_window_s=2,
                                       max_new_tokens=8, features="device"), cache_dir=tmp_path)
    b.load()
    calls = []
    tokenizer = b.tokenizer
    monkeypatch.setattr(b, "tokenizer", type("Counting", (), {
        "__call__": lambda self, text: calls.append(text) or tokenizer(text),
        "convert_tokens_to_ids": lambda self, t: tokenizer.convert_tokens_to_ids(t)})())
    utts = [Utterance(f"u{i}", np.zeros(8000, np.float32), 16000, ["Hello there.", "Hi."][i % 2]) for i in range(4)]
    first, second = b.collate(utts), b.collate(utts[::-1])
    assert calls == ["Hello there.", "Hi."]
    assert torch.equal(first["labels"], second["labels"].flip(0))
