"""Compact export: pruned neurons and heads removed, same outputs as the masked model."""


import pytest
import torch

from parpkit.cli import main
from parpkit import load_compact
from tests.conftest import requires_offline, tiny_ctc_recipe, tiny_recipe, write_recipe

pytestmark = requires_offline


@pytest.mark.parametrize("make", [tiny_recipe, tiny_ctc_recipe], ids=["whisper", "wav2vec2"])
def test_compact_export_is_smaller_and_computes_the_same(tmp_path, make, capsys):
    mapping = make(**{"pruning.criterion": {"name": "structured"}, "pruning.scope": "per_tensor",
                      "pruning.schedule": {"name": "fixed"}, "training.max_steps": 2})
    if make is tiny_recipe:  # 4 heads, so that half of them can go
        mapping["backbone"]["options"]["config"].update(encoder_attention_heads=4, decoder_attention_heads=4)
    else:
        mapping["backbone"]["options"]["config"].update(num_attention_heads=4)
    path = write_recipe(tmp_path / "r.yaml", mapping)
    out = tmp_path / "run"
    assert main(["run", str(path), "--output-dir", str(out), "--quiet"]) == 0
    assert main(["export", str(out), "--compact"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "attention heads" in text
    assert main(["export", str(out), "--compact"]) == 0  # an earlier export in the way is replaced
    assert not (out / "compact.partial").exists()

    compact = load_compact(out / "compact")
    if make is tiny_recipe:
        from transformers import WhisperForConditionalGeneration

        masked = WhisperForConditionalGeneration.from_pretrained(out / "model").eval()
        fc1 = [m.fc1 for m in compact.model.encoder.layers] + [m.fc1 for m in compact.model.decoder.layers]
        assert all(l.out_features == 16 for l in fc1)  # 32 neurons, half removed
        assert all(m.self_attn.num_heads == 2 for m in compact.model.encoder.layers)
        feats = torch.randn(2, 80, 2 * masked.config.max_source_positions)
        dec = torch.tensor([[50257, 50362, 440, 1133], [50257, 50362, 11, 50256]])
        with torch.no_grad():
            a, b = masked(feats, decoder_input_ids=dec).logits, compact(feats, decoder_input_ids=dec).logits
        assert torch.allclose(a, b, atol=1e-4)
        with torch.no_grad():  # generation works on the smaller model too, and agrees
            assert torch.equal(masked.generate(input_features=feats, max_new_tokens=5),
                               compact.generate(input_features=feats, max_new_tokens=5))
    else:
        from transformers import AutoModelForCTC

        masked = AutoModelForCTC.from_pretrained(out / "model").eval()
        assert all(l.feed_forward.intermediate_dense.out_features == 32 for l in compact.wav2vec2.encoder.layers)
        x = torch.randn(2, 16000)
        with torch.no_grad():
            assert torch.allclose(masked(x).logits, compact(x).logits, atol=1e-4)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in masked.parameters())


def test_export_refuses_outputs_it_would_destroy_and_models_it_cannot_shrink(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"pruning.schedule": {"name": "fixed"}, "training.max_steps": 1}))
    run = tmp_path / "run"
    assert main(["run", str(path), "--output-dir", str(run), "--quiet"]) == 0
    weights = (run / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    # magnitude pruning removes no whole neuron or head: nothing to compact, nothing written
    assert main(["export", str(run), "--compact"]) == 2
    assert "no FFN neuron or attention head is wholly pruned" in capsys.readouterr().err
    assert not (run / "compact").exists() and not (run / "compact.partial").exists()
    # the run's own model, or a folder of other files, is never written into
    for target in (run / "model", run):
        assert main(["export", str(run), "--compact", "--output", str(target)]) == 2
        assert "would overwrite the run's own model" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--compact", "--output", str(other)]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert (run / "model" / "model.safetensors").read_bytes() == weights and (other / "keep.txt").read_text() == "mine"


def test_export_of_something_that_is_not_a_run(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--compact"]) == 2
    assert "not a finished parpkit run" in capsys.readouterr().err


def test_export_refuses_a_nan_output_difference(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    mapping = tiny_ctc_recipe(**{"pruning.criterion": {"name": "structured"}, "pruning.scope": "per_tensor",
                                 "pruning.schedule": {"name": "fixed"}, "training.max_steps": 1,
                                 "evaluation.dense": False, "evaluation.after_prune": False})
    run = tmp_path / "run"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", mapping)), "--output-dir", str(run), "--quiet"]) == 0
    weights_file = run / "model" / "model.safetensors"
    weights = load_file(str(weights_file))
    head = next(k for k in weights if k.startswith("lm_head") and k.endswith("bias"))
    weights[head][0] = float("nan")  # every frame's first logit is NaN: so is every difference
    save_file(weights, str(weights_file), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["export", str(run), "--compact"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "largest difference is nan" in err and "NaN outputs" in err
    assert not (run / "compact").exists() and not (run / "compact.partial").exists()
