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


# ------------------------------------------------------------------------------- where users deploy

#: loads an export with plain transformers in a process that cannot import parpkit, and writes its logits
PLAIN_LOAD = """
import sys
sys.modules["parpkit"] = sys.modules["parpkit_plugins"] = None  # importing either fails
import torch
from transformers import WhisperForConditionalGeneration

model = WhisperForConditionalGeneration.from_pretrained(sys.argv[1]).eval()
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(inputs["features"], decoder_input_ids=inputs["decoder"]).logits
    tokens = model.generate(input_features=inputs["features"], max_new_tokens=5)
torch.save({"logits": logits, "tokens": tokens, "config": model.config.to_dict()}, sys.argv[3])
"""

#: two layers a side, so that "every layer keeps the same width" means something; 4 heads
TWO_LAYERS = {"encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4}


def _structured_run(tmp_path, scope, units=None, name="run", **changes):
    criterion = {"name": "structured", **({"options": {"units": units}} if units else {})}
    mapping = tiny_recipe(**{"pruning.criterion": criterion, "pruning.scope": scope, "pruning.schedule": {"name": "fixed"},
                             "training.max_steps": 1, "evaluation.dense": False, "evaluation.after_prune": False, **changes})
    mapping["backbone"]["options"]["config"].update(TWO_LAYERS)
    out = tmp_path / name
    assert main(["run", str(write_recipe(tmp_path / f"{name}.yaml", mapping)), "--output-dir", str(out), "--quiet"]) == 0
    return out


def _export_report(folder):
    import json

    return json.loads((folder / "parpkit_export.json").read_text())


def test_an_ffn_prune_at_per_tensor_scope_exports_plain_transformers_that_load_without_parpkit(tmp_path, capsys):
    import subprocess
    import sys

    from transformers import WhisperForConditionalGeneration

    run = _structured_run(tmp_path, "per_tensor", units=["ffn"])
    capsys.readouterr()
    assert main(["export", str(run)]) == 0  # no format: the smallest this run allows, and it says what it wrote
    text = " ".join(capsys.readouterr().out.split())
    assert f"wrote transformers (the smallest form this run allows; --format chooses another): {run / 'transformers'}" in text
    assert "encoder_ffn_dim = 16, decoder_ffn_dim = 16" in text and "removed 64 of 128 FFN neurons and 0 of" in text
    report = _export_report(run / "transformers")
    assert report["format"] == "transformers" and report["zeros_kept"] == {"ffn": 0, "heads": 0}

    masked = WhisperForConditionalGeneration.from_pretrained(run / "model").eval()
    assert all((m.self_attn.q_proj.weight != 0).all() for m in masked.model.encoder.layers)  # units: [ffn] left the heads whole
    feats = torch.randn(2, 80, 2 * masked.config.max_source_positions)
    dec = torch.tensor([[50257, 50362, 440, 1133], [50257, 50362, 11, 50256]])
    torch.save({"features": feats, "decoder": dec}, tmp_path / "inputs.pt")
    script = tmp_path / "load.py"
    script.write_text(PLAIN_LOAD)
    subprocess.run([sys.executable, str(script), str(run / "transformers"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   check=True, cwd=tmp_path)
    plain = torch.load(tmp_path / "out.pt")
    assert plain["config"]["encoder_ffn_dim"] == plain["config"]["decoder_ffn_dim"] == 16  # half of 32, every layer
    with torch.no_grad():
        logits = masked(feats, decoder_input_ids=dec).logits
        tokens = masked.generate(input_features=feats, max_new_tokens=5)
    assert (plain["logits"] - logits).abs().max() <= 1e-5
    assert torch.equal(plain["tokens"], tokens)
    assert (run / "transformers" / "model.safetensors").stat().st_size < (run / "model" / "model.safetensors").stat().st_size


def test_structured_per_tensor_keeps_equal_widths_and_global_does_not(tmp_path, capsys):
    from parpkit import load_compact

    run = _structured_run(tmp_path, "global", name="global")
    assert main(["export", str(run)]) == 0  # layers of different widths: only parpkit's compact form drops them all
    compact = load_compact(run / "compact")
    widths = {l.fc1.out_features for l in compact.model.encoder.layers} | {l.fc1.out_features for l in compact.model.decoder.layers}
    assert len(widths) > 1, widths
    capsys.readouterr()
    assert main(["export", str(run), "--format", "transformers"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "FFN layers that keep different widths (prune at scope per_tensor for equal ones)" in err

    run = _structured_run(tmp_path, "per_tensor", name="per_tensor")  # heads too: 2 of 4 left in every attention
    assert main(["export", str(run)]) == 0  # heads cannot leave whisper's config: compact drops them
    compact = load_compact(run / "compact")
    layers = list(compact.model.encoder.layers) + list(compact.model.decoder.layers)
    assert {l.fc1.out_features for l in layers} == {16}
    assert {a.num_heads for l in layers for a in (l.self_attn, getattr(l, "encoder_attn", l.self_attn))} == {2}
    capsys.readouterr()
    assert main(["export", str(run), "--format", "transformers"]) == 0  # what a plain config can hold; heads stay zeros
    text = " ".join(capsys.readouterr().out.split())
    assert "kept as zeros (the config cannot express their removal): 0 FFN neurons, 12 attention heads" in text
    assert _export_report(run / "transformers")["max_abs_difference"] <= 1e-5


def test_an_unstructured_run_exports_sparse_weights_that_read_back_bit_for_bit(tmp_path, capsys):
    from safetensors.torch import load_file

    from parpkit import load_sparse, read_sparse

    mapping = tiny_recipe(**{"pruning.schedule": {"name": "fixed"}, "training.max_steps": 1, "evaluation.dense": False,
                             "evaluation.after_prune": False})
    run = tmp_path / "run"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", mapping)), "--output-dir", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(run)]) == 0  # magnitude pruning at 50%: sparse
    assert "wrote sparse" in capsys.readouterr().out
    dense = load_file(str(run / "model" / "model.safetensors"))
    back = read_sparse(run / "sparse")
    assert set(back) == set(dense)
    for name, t in dense.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name].view(torch.uint8), t.view(torch.uint8)), name
    assert (run / "sparse" / "sparse.safetensors").stat().st_size < (run / "model" / "model.safetensors").stat().st_size
    model = load_sparse(run / "sparse")
    state = model.state_dict()
    assert all(torch.equal(state[n].view(torch.uint8), t.view(torch.uint8)) for n, t in dense.items())
    report = _export_report(run / "sparse")
    assert report["bit_exact"] and report["dropped"] > 0
    # the documented reader for users without parpkit reads the same tensors
    namespace: dict = {}
    exec(compile(_docs_block("### Reading it without parpkit"), "docs/how-to/export.md", "exec"), namespace)
    plain = namespace["read_sparse"](str(run / "sparse" / "sparse.safetensors"))
    assert set(plain) == set(dense) and all(torch.equal(plain[n].view(torch.uint8), t.view(torch.uint8)) for n, t in dense.items())
    # what export refuses: a format the backbone does not write, quantizing a format that is not the backbone's
    assert main(["export", str(run), "--format", "onnx"]) == 2
    assert "--format onnx: unknown for backbone 'whisper'; formats: transformers, compact, sparse, ct2" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "sparse", "--quantization", "int8"]) == 2
    assert "--quantization applies to formats a backbone writes (ct2), not to sparse" in " ".join(capsys.readouterr().err.split())


def _docs_block(heading: str) -> str:
    """The first python block after ``heading`` in docs/how-to/export.md."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "how-to" / "export.md").read_text()
    rest = text[text.index(heading):]
    return rest[rest.index("```python") + len("```python"):].split("```", 1)[0]


def test_sparse_files_keep_negative_zeros_nans_and_dense_tensors(tmp_path):
    from parpkit import read_sparse, save_sparse

    t = torch.randn(64, 64)
    t[t.abs() < 0.7] = 0.0
    t[0, :8] = -0.0
    t[1, 1] = float("nan")
    state = {"a": t, "b": torch.randn(3), "c": torch.arange(5), "d": t.half()}
    counts = save_sparse(state, tmp_path / "s.safetensors")
    assert counts["sparse_tensors"] == 2  # a and d; b has no zeros, c is not floating point
    back = read_sparse(tmp_path / "s.safetensors")
    for name, x in state.items():
        assert torch.equal(back[name].view(torch.uint8), x.view(torch.uint8)), name
    assert torch.signbit(back["a"][0, :8]).all()


def _force_a_word(model_dir, token: int) -> None:
    """Make the saved tiny whisper say ``token`` at every step: the decoder's final layer norm outputs a
    constant that points at that token's (enlarged) embedding. Masks are untouched (neither is in the pool)."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    w = load_file(str(path))
    emb = w["model.decoder.embed_tokens.weight"]
    emb[token] = emb[token] / emb[token].norm() * 50
    w["model.decoder.layer_norm.weight"] = torch.zeros_like(w["model.decoder.layer_norm.weight"])
    w["model.decoder.layer_norm.bias"] = emb[token] / 5
    save_file(w, str(path), metadata={"format": "pt"})


def test_ct2_export_of_a_pruned_whisper_transcribes_with_faster_whisper(tmp_path, capsys):
    faster_whisper = pytest.importorskip("faster_whisper", reason="needs the ct2 extra: pip install 'parpkit[ct2]'")
    import numpy as np
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    run = _structured_run(tmp_path, "per_tensor")  # FFN neurons and heads, the same count in every layer
    _force_a_word(run / "model", 23748)  # " hello"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "ct2"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "removed 64 of 128 FFN neurons and 12 of 24 attention heads" in text
    report = _export_report(run / "ct2")
    assert report["config"] == {"encoder_attention_heads": 2, "decoder_attention_heads": 2}
    assert report["max_abs_difference"] <= 1e-4  # encoder outputs, float32
    assert main(["export", str(run), "--format", "ct2", "--quantization", "int8", "--output", str(tmp_path / "int8")]) == 0

    audio = (np.random.default_rng(0).standard_normal(32000) * 0.1).astype(np.float32)
    masked = WhisperForConditionalGeneration.from_pretrained(run / "model").eval()
    processor = WhisperProcessor.from_pretrained(run / "model")
    with torch.no_grad():
        ids = masked.generate(input_features=processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features)
    expected = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    assert expected.startswith("hello hello")
    for folder, compute in ((run / "ct2", "float32"), (tmp_path / "int8", "int8")):
        model = faster_whisper.WhisperModel(str(folder), device="cpu", compute_type=compute)
        segments, _ = model.transcribe(audio, beam_size=1, temperature=0.0, without_timestamps=True, max_new_tokens=8,
                                       condition_on_previous_text=False)
        said = " ".join(s.text.strip() for s in segments)  # CTranslate2 stops at its own length: a prefix of the same words
        assert said.count("hello") >= 3 and expected.startswith(said), (compute, said, expected)


def test_a_wav2vec2_ffn_prune_at_per_tensor_scope_exports_plain_transformers(tmp_path):
    from transformers import AutoModelForCTC

    mapping = tiny_ctc_recipe(**{"pruning.criterion": {"name": "structured", "options": {"units": ["ffn"]}},
                                 "pruning.scope": "per_tensor", "pruning.schedule": {"name": "fixed"}, "training.max_steps": 1,
                                 "evaluation.dense": False, "evaluation.after_prune": False})
    run = tmp_path / "run"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", mapping)), "--output-dir", str(run), "--quiet"]) == 0
    assert main(["export", str(run)]) == 0
    assert _export_report(run / "transformers")["config"] == {"intermediate_size": 32}  # 64 neurons, half removed
    plain = AutoModelForCTC.from_pretrained(run / "transformers").eval()
    masked = AutoModelForCTC.from_pretrained(run / "model").eval()
    assert all(l.feed_forward.intermediate_dense.out_features == 32 for l in plain.wav2vec2.encoder.layers)
    x = torch.randn(2, 16000)
    with torch.no_grad():
        assert (plain(x).logits - masked(x).logits).abs().max() <= 1e-5


def test_a_run_made_before_the_calibration_set_still_exports(tmp_path, capsys):
    """Runs of parpkit 0.1.0 wrote sparsegpt's calibration_batches into their recipe.yaml; a recipe may no longer
    say it (it is refused with what to write instead), but the run's mask is found and its model exports."""
    import yaml

    mapping = tiny_recipe(**{"pruning.criterion": {"name": "sparsegpt"}, "pruning.scope": "per_tensor",
                             "pruning.exclude": [r".*\.bias"], "pruning.calibration": {"utterances": 4},
                             "pruning.schedule": {"name": "fixed"}, "training.max_steps": 0,
                             "evaluation.dense": False, "evaluation.after_prune": False})
    run = tmp_path / "run"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", mapping)), "--output-dir", str(run), "--quiet"]) == 0
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    saved["pruning"]["criterion"]["options"] = {"calibration_batches": 4}  # as 0.1.0 wrote it
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    assert main(["export", str(run)]) == 0
    assert "wrote sparse" in capsys.readouterr().out
    # an option that is wrong for another reason than its age is still refused
    saved["pruning"]["criterion"]["name"] = "no_such_criterion"
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    assert main(["export", str(run), "--output-dir", str(tmp_path / "again")]) == 2
    assert "no_such_criterion" in capsys.readouterr().err


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_validate_says_how_many_weights_a_structured_prune_removes_as_the_run_does(tmp_path, capsys, scope):
    """Whole units: validate's count is the run's (units round down, weights outside units stay)."""
    import json
    import re

    run = _structured_run(tmp_path, scope, name=scope)
    capsys.readouterr()
    assert main(["validate", str(run / "recipe.yaml")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    m = re.search(r"(\d[\d,]*) pool weights pruned", out)
    assert m and "whole units removed" in out, out
    assert int(m.group(1).replace(",", "")) == json.loads((run / "metrics.json").read_text())["pool_pruned"]
