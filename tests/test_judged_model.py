"""The saved model is the judged model: every score is at the model's native settings (whisper's own
30 s window, whatever window training used), and plain transformers, loading ``model/`` with its own
processor and no parpkit import, transcribes the eval split to the run's final WER exactly."""

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from parpkit.cli import main
from parpkit.metrics import error_rates
from parpkit_plugins.backbones.whisper import WhisperBackbone, WhisperOptions, native_positions
from tests.conftest import TINY_WHISPER, offline_file, requires_offline, tiny_ctc_recipe, tiny_recipe, write_recipe

pytestmark = requires_offline

#: what a user writes: transformers, soundfile and numpy, nothing of parpkit
PLAIN = r"""
import json, sys
import numpy as np, soundfile as sf, torch
from transformers import AutoModelForCTC, AutoProcessor, WhisperForConditionalGeneration

model_dir, rows, batch, kind = sys.argv[1], json.loads(open(sys.argv[2]).read()), int(sys.argv[3]), sys.argv[4]
assert "parpkit" not in sys.modules
processor = AutoProcessor.from_pretrained(model_dir)
if kind == "whisper":
    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    try:  # the run's temperature fallback, if it used one: what to pass generate, and the seed of its sampling
        decoding = json.loads(open(model_dir + "/decoding.json").read())
    except FileNotFoundError:
        decoding = {}
    seed = decoding.pop("seed", None)
    if decoding:
        decoding["temperature"] = tuple(decoding["temperature"])
else:
    model = AutoModelForCTC.from_pretrained(model_dir).eval()
hyps = []
for i in range(0, len(rows), batch):
    audio = [sf.read(r["path"], dtype="float32")[0] for r in rows[i:i + batch]]
    with torch.no_grad():
        if kind == "whisper":
            feats = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
            if seed is not None:
                torch.manual_seed(seed)
            ids = model.generate(input_features=feats, **decoding)
            text = processor.batch_decode(ids, skip_special_tokens=True)
        else:
            inputs = processor(audio, sampling_rate=16000, return_tensors="pt", padding=True)
            text = processor.batch_decode(model(**inputs).logits.argmax(-1))
    hyps += [t.strip() for t in text]
assert not any(m == "parpkit" or m.startswith(("parpkit.", "parpkit_plugins")) for m in sys.modules)
print(json.dumps(hyps))
"""


def _plain_transcripts(tmp_path, out, kind: str) -> tuple[list[dict], list[str]]:
    """The run's final transcripts, and what plain transformers makes of the same audio from ``out/model``."""
    from parpkit.progress import Progress
    from parpkit.recipe import load_recipe
    from parpkit.registry import Plugins
    from parpkit.resolve import resolve

    rows = [json.loads(line) for line in (out / "transcripts_final.jsonl").read_text().splitlines()]
    resolved = resolve(load_recipe(out / "recipe.yaml")[0], Plugins(), str(out / "recipe.yaml"))
    utts = {u.id: u for u in resolved.dataset.load_split(rows[0]["split"], Progress(enabled=False))}
    listed = []
    for r in rows:
        path = tmp_path / f"{r['id']}.wav"
        sf.write(path, utts[r["id"]].audio, 16000, subtype="FLOAT")  # bit-exact float32
        listed.append({"id": r["id"], "path": str(path)})
    (tmp_path / "rows.json").write_text(json.dumps(listed))
    script = tmp_path / "plain.py"
    script.write_text(PLAIN)
    batch = str(resolved.recipe.evaluation.batch_size)
    done = subprocess.run([sys.executable, str(script), str(out / "model"), str(tmp_path / "rows.json"), batch, kind],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return rows, json.loads(done.stdout.strip().splitlines()[-1])


def _whisper_run(tmp, **changes):
    recipe = write_recipe(tmp / "r.yaml", tiny_recipe(**{"training.max_steps": 3, "training.learning_rate": 3e-3,
                                                        **changes}))
    out = tmp / "out"
    assert main(["run", str(recipe), "--output-dir", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def whisper_run(tmp_path_factory):
    return _whisper_run(tmp_path_factory.mktemp("judged"))


FALLBACK = [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def fallback_run(tmp_path_factory):
    return _whisper_run(tmp_path_factory.mktemp("fallback"), **{"backbone.options.fallback_temperatures": FALLBACK,
                                                                "backbone.options.seed": 7})


def test_whisper_trains_at_its_window_but_is_judged_and_saved_at_the_native_one(whisper_run):
    metrics = json.loads((whisper_run / "metrics.json").read_text())
    settings = metrics["backbone_settings"]
    assert settings["trained"]["encoder_window_s"] == 6  # the recipe's speed setting
    assert settings["judged"]["encoder_window_s"] == 30  # every stage, and the saved model
    assert settings["judged"]["max_new_tokens"] == 8
    config = json.loads((whisper_run / "model" / "config.json").read_text())
    assert config["max_source_positions"] == TINY_WHISPER.get("max_source_positions", 1500) == 1500
    processor = json.loads((whisper_run / "model" / "processor_config.json").read_text())["feature_extractor"]
    assert processor["chunk_length"] == 30 and processor["nb_max_frames"] == 3000
    generation = json.loads((whisper_run / "model" / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 8  # plain transformers decodes with the judged limit


def test_parameter_counts_are_the_saved_model_s_not_the_training_window_s(whisper_run):
    """Trained at a 6 s window (300 encoder positions), saved and judged at 30 s (1,500): the counts the run
    reports, and the report's non-zero parameters, are those of ``model/``."""
    from safetensors.torch import load_file

    from parpkit.report import collect

    metrics = json.loads((whisper_run / "metrics.json").read_text())
    weights = load_file(str(whisper_run / "model" / "model.safetensors"))
    total = sum(t.numel() for t in weights.values())  # tied weights are saved once, as parameters() counts them
    nonzero = sum(int(t.count_nonzero()) for t in weights.values())
    assert metrics["model_parameters"] == total
    assert round(total * (1 - metrics["stages"]["final"]["model_sparsity"])) == nonzero
    (row,), _ = collect([whisper_run])
    assert row["model_parameters"] == total and row["nonzero_parameters"] == nonzero


def test_plain_transformers_reproduces_the_final_whisper_wer(whisper_run, tmp_path):
    rows, hyps = _plain_transcripts(tmp_path, whisper_run, "whisper")
    assert hyps == [r["hypothesis"] for r in rows]
    metrics = json.loads((whisper_run / "metrics.json").read_text())
    final = metrics["stages"]["final"]
    rates = error_rates([r["reference"] for r in rows], hyps, "words", "basic")
    assert rates["wer"] == final["wer"] and rates["cer"] == final["cer"]


def test_temperature_fallback_is_saved_with_the_model_and_reproduced_by_plain_transformers(fallback_run, tmp_path):
    """A random 1-layer whisper is unsure of every token (mean log-probability far below -1), so each utterance
    is decoded again by seeded sampling: plain transformers, given decoding.json, draws the same."""
    decoding = json.loads((fallback_run / "model" / "decoding.json").read_text())
    assert decoding == {"temperature": FALLBACK, "compression_ratio_threshold": 1.35, "logprob_threshold": -1.0,
                        "seed": 7}
    judged = json.loads((fallback_run / "metrics.json").read_text())["backbone_settings"]["judged"]
    assert judged["temperature"] == FALLBACK and judged["seed"] == 7
    rows, hyps = _plain_transcripts(tmp_path, fallback_run, "whisper")
    assert hyps == [r["hypothesis"] for r in rows]
    final = json.loads((fallback_run / "metrics.json").read_text())["stages"]["final"]
    assert error_rates([r["reference"] for r in rows], hyps, "words", "basic")["wer"] == final["wer"]


def test_fallback_sampling_differs_from_greedy_and_repeats_itself(tmp_path):
    """The fallback really samples (hypotheses differ from greedy on a model unsure of everything), the same
    seed draws the same, and the caller's random state is left as it was."""
    opts = dict(config=dict(TINY_WHISPER), tokenizer=str(offline_file("model/tokenizer.json")), max_new_tokens=6)
    greedy = WhisperBackbone(WhisperOptions(**opts), cache_dir=tmp_path)
    sampled = WhisperBackbone(WhisperOptions(**opts, fallback_temperatures=FALLBACK), cache_dir=tmp_path)
    m_greedy, m_sampled = greedy.load().eval(), sampled.load().eval()
    audio = [np.random.default_rng(i).standard_normal(16000 * 2).astype(np.float32) * 0.1 for i in range(4)]
    torch.manual_seed(123)
    first = sampled.transcribe(m_sampled, audio)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert sampled.transcribe(m_sampled, audio) == first
    assert torch.equal(torch.rand(3), after)  # training's random stream is not consumed by decoding
    assert first != greedy.transcribe(m_greedy, audio)
    with pytest.raises(Exception, match="fallback_temperatures must rise"):
        WhisperBackbone(WhisperOptions(**opts, fallback_temperatures=[0.5, 0.0]), cache_dir=tmp_path).load()


def test_plain_transformers_reproduces_the_final_ctc_wer(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_ctc_recipe(**{"training.max_steps": 3}))
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--output-dir", str(out), "--quiet"]) == 0
    rows, hyps = _plain_transcripts(tmp_path, out, "ctc")
    assert hyps == [r["hypothesis"] for r in rows]
    final = json.loads((out / "metrics.json").read_text())["stages"]["final"]
    assert error_rates([r["reference"] for r in rows], hyps, "words", "basic")["wer"] == final["wer"]


def test_native_gives_the_full_window_back_and_scores_as_an_uncut_model(tmp_path):
    opts = dict(config=dict(TINY_WHISPER), tokenizer=str(offline_file("model/tokenizer.json")), max_new_tokens=6, seed=3)
    cut = WhisperBackbone(WhisperOptions(**opts, encoder_window_s=4), cache_dir=tmp_path)
    full = WhisperBackbone(WhisperOptions(**opts), cache_dir=tmp_path)
    m_cut, m_full = cut.load(), full.load()
    assert m_cut.config.max_source_positions == 200 and native_positions(m_cut) == 1500
    audio = [np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32) * 0.1,
             np.random.default_rng(1).standard_normal(16000 * 12).astype(np.float32) * 0.1]  # 12 s: past the cut window
    with cut.native(m_cut) as m:
        assert m.config.max_source_positions == 1500
        assert torch.equal(m.model.encoder.embed_positions.weight, m_full.model.encoder.embed_positions.weight)
        assert cut.transcribe(m, audio) == full.transcribe(m_full, audio)
        assert cut.settings(m)["encoder_window_s"] == 30
    # training goes on at the cut window, the positional rows as they were
    assert m_cut.config.max_source_positions == 200 and m_cut.model.encoder.embed_positions.num_embeddings == 200
    assert torch.equal(m_cut.model.encoder.embed_positions.weight, m_full.model.encoder.embed_positions.weight[:200])
    assert cut.collate  # and a long utterance still cannot train at the cut window
    from parpkit.errors import ParpkitError
    with pytest.raises(ParpkitError, match="raise backbone.options.encoder_window_s"):
        cut._features(audio)
    with pytest.raises(ParpkitError, match="cut the recording into shorter utterances"):
        full._features([np.zeros(16000 * 31, dtype=np.float32)])


def test_the_zero_shot_row_does_not_depend_on_the_training_window(tmp_path):
    """The dense stage is the pretrained model as published: a recipe that trains at 6 s and one that trains at
    the full window score it the same."""
    stages = []
    for window in (6, None):
        changes = {"training.max_steps": 0, "evaluation.after_prune": False, "backbone.options.encoder_window_s": window}
        recipe = write_recipe(tmp_path / f"r{window}.yaml", tiny_recipe(**changes))
        out = tmp_path / f"out{window}"
        assert main(["run", str(recipe), "--output-dir", str(out), "--quiet"]) == 0
        stages.append(json.loads((out / "metrics.json").read_text())["stages"]["dense"])
    assert stages[0]["splits"] == stages[1]["splits"]


def test_the_report_says_how_the_runs_were_decoded(whisper_run, fallback_run):
    from parpkit.report import collect, markdown

    rows, _ = collect([fallback_run])
    assert "Decoded with temperature fallback: again at 0.5, 1 where compression ratio above 1.35 or mean " \
           "log-probability below -1 (sampling seed 7)." in markdown(rows)
    rows, _ = collect([whisper_run, fallback_run])
    assert "The runs were decoded differently (greedy, no fallback; with temperature fallback" in markdown(rows)
    rows, _ = collect([whisper_run])
    assert "Decoded" not in markdown(rows) and "decoded differently" not in markdown(rows)
