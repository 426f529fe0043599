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
