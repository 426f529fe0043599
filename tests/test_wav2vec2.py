"""The CTC backbone end to end: synthetic corpus, TIMIT-shaped tree (words and phones), a manifest and
an audiofolder corpus; each writes the same run directory and a model plain transformers decodes."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from parpkit.cli import main
from parpkit.errors import ParpkitError
from parpkit_plugins.backbones.wav2vec2 import CTCBackbone, CTCOptions, build_vocabulary
from tests.conftest import TINY_WAV2VEC2, requires_offline, tiny_ctc_recipe, write_recipe
from tests.timit_tree import write_tree

pytestmark = requires_offline

RUN_FILES = ("recipe.yaml", "metrics.json", "sparsity.csv", "masks.safetensors", "log.jsonl", "model/config.json",
             "transcripts_final.jsonl")


def _run(tmp_path, **changes):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_ctc_recipe(**changes))
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--output-dir", str(out), "--quiet"]) == 0
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    return out, json.loads((out / "metrics.json").read_text())


def _plain_transformers_decode(model_dir, audio):
    from transformers import AutoModelForCTC, AutoProcessor

    model = AutoModelForCTC.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor(audio, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        ids = model(**inputs).logits.argmax(-1)
    return model, processor, processor.batch_decode(ids)


def test_default_pool_is_attention_and_feed_forward():
    b = CTCBackbone(CTCOptions(config=dict(TINY_WAV2VEC2)), cache_dir=".")
    names = [n for n, _ in b.skeleton().named_parameters()]
    from parpkit.masks import select_pool

    pool = select_pool(names, b.default_pool)
    assert len(pool) == 2 * 12  # 2 layers x (4 projections + 2 linears) x (weight, bias)
    assert not any("feature_extractor" in n or "lm_head" in n or "layer_norm" in n or "pos_conv" in n for n in pool)


def test_vocabulary_from_transcripts():
    v = build_vocabulary(["Hello, World!", "it's"], "words")
    assert list(v)[:3] == ["<pad>", "<unk>", "|"] and set(v) == {"<pad>", "<unk>", "|", "h", "e", "l", "o", "w", "r", "d", "i", "t", "s", "'"}
    assert list(build_vocabulary(["h# ax-h q", "sh h#"], "phones")) == ["<pad>", "<unk>", "ax-h", "h#", "q", "sh"]


def test_feature_encoder_frozen_by_default(tmp_path):
    b = CTCBackbone(CTCOptions(config=dict(TINY_WAV2VEC2)), cache_dir=tmp_path)
    from parpkit.interfaces import Utterance

    b.prepare([Utterance("a", np.zeros(16000, np.float32), 16000, "abc")], "words")
    model = b.load()
    assert not any(p.requires_grad for n, p in model.named_parameters() if "feature_extractor" in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".encoder.layers." in n)


def test_parp_on_the_synthetic_corpus(tmp_path):
    out, metrics = _run(tmp_path)
    assert metrics["plugins"]["backbone"] == "wav2vec2"
    assert abs(metrics["pool_pruned"] - round(0.5 * metrics["pool_parameters"])) <= 1
    assert set(metrics["stages"]["final"]) >= {"wer", "cer"}
    model, processor, text = _plain_transformers_decode(out / "model", np.zeros(16000, np.float32))
    assert isinstance(text[0], str)
    vocab = processor.tokenizer.get_vocab()
    assert "|" in vocab and model.config.vocab_size == len(vocab)


def test_parp_on_a_timit_tree_with_phone_targets(tmp_path):
    tree = write_tree(tmp_path / "TIMIT")
    out, metrics = _run(tmp_path, **{"dataset": {"name": "timit", "options": {"root": str(tree), "targets": "phones"},
                                                 "train_split": "train", "eval_split": "core_test"},
                                     "training.max_steps": 3})
    final = metrics["stages"]["final"]
    assert set(final) == {"per", "pool_sparsity", "model_sparsity", "splits"} and final["splits"] == {"core_test": {"per": final["per"]}}
    assert metrics["eval_utterances"] == 2 and metrics["train_utterances"] == 6
    _, processor, text = _plain_transformers_decode(out / "model", np.zeros(16000, np.float32))
    assert "h#" in processor.tokenizer.get_vocab() and "|" not in processor.tokenizer.get_vocab()


def test_timit_words_with_whisper_too(tmp_path):
    from tests.conftest import tiny_recipe

    tree = write_tree(tmp_path / "TIMIT")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{
        "dataset": {"name": "timit", "options": {"root": str(tree)}, "train_split": "train", "eval_split": "test"},
        "training.max_steps": 2}))
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_utterances"] == 6 and "wer" in metrics["stages"]["final"]


def _write_wavs(folder, n, rate):
    """Synthetic speech written at another sample rate and in stereo: the dataset must resample and mix."""
    from parpkit.progress import QUIET
    from parpkit_plugins.datasets.synthetic_speech import SyntheticOptions, SyntheticSpeech

    folder.mkdir(parents=True, exist_ok=True)
    utts = SyntheticSpeech(SyntheticOptions(sizes={"train": n}, speakers={"train": 2}), cache_dir=folder.parent / "c").load_split("train", QUIET)
    from parpkit.audio import resample

    rows = []
    for i, u in enumerate(utts):
        audio = resample(u.audio, 16000, rate)
        sf.write(folder / f"u{i}.wav", np.stack([audio, audio], axis=1), rate)
        rows.append({"file_name": f"u{i}.wav", "transcription": u.text, "speaker": u.speaker})
    return rows


def test_manifest_corpus_end_to_end(tmp_path):
    rows = _write_wavs(tmp_path / "audio", 6, 22050)
    with (tmp_path / "train.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "sentence", "who"])
        w.writeheader()
        for r in rows[:4]:
            w.writerow({"path": f"audio/{r['file_name']}", "sentence": r["transcription"], "who": r["speaker"]})
    with (tmp_path / "test.jsonl").open("w") as f:
        for r in rows[4:]:
            f.write(json.dumps({"path": str(tmp_path / "audio" / r["file_name"]), "sentence": r["transcription"]}) + "\n")
    out, metrics = _run(tmp_path, **{"dataset": {"name": "manifest", "options": {
        "splits": {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.jsonl")},
        "audio_column": "path", "text_column": "sentence"}}, "training.max_steps": 2})
    assert metrics["train_utterances"] == 4 and metrics["eval_utterances"] == 2
    hyps = [json.loads(line) for line in (out / "transcripts_final.jsonl").open()]
    assert [h["reference"] for h in hyps] == [r["transcription"] for r in rows[4:]]


def test_manifest_errors(tmp_path):
    from parpkit.progress import QUIET
    from parpkit_plugins.datasets.manifest import Manifest, ManifestOptions

    (tmp_path / "m.csv").write_text("file,text\nmissing.wav,hello\n")
    m = Manifest(ManifestOptions(splits={"train": str(tmp_path / "m.csv")}), cache_dir=tmp_path)
    with pytest.raises(ParpkitError, match=r"no column 'audio' \(audio_column\); columns are file, text"):
        m.load_split("train", QUIET)
    m = Manifest(ManifestOptions(splits={"train": str(tmp_path / "m.csv")}, audio_column="file"), cache_dir=tmp_path)
    with pytest.raises(ParpkitError, match=r"missing\.wav: unreadable audio .*row 1"):
        m.load_split("train", QUIET)
    with pytest.raises(ParpkitError, match="manifest for split 'train' not found"):
        Manifest(ManifestOptions(splits={"train": str(tmp_path / "nope.csv")}), cache_dir=tmp_path).load_split("train", QUIET)


def test_audiofolder_corpus_end_to_end(tmp_path):
    rows = _write_wavs(tmp_path / "corpus" / "train", 4, 16000)
    with (tmp_path / "corpus" / "train" / "metadata.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file_name", "transcription", "speaker"])
        w.writeheader()
        w.writerows(rows)
    test_rows = _write_wavs(tmp_path / "corpus" / "test", 2, 8000)
    with (tmp_path / "corpus" / "test" / "metadata.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file_name", "transcription", "speaker"])
        w.writeheader()
        w.writerows(test_rows)
    out, metrics = _run(tmp_path, **{"dataset": {"name": "hf_dataset", "options": {
        "path": "audiofolder", "data_dir": str(tmp_path / "corpus"), "text_column": "transcription", "speaker_column": "speaker"}},
        "training.max_steps": 2})
    assert metrics["train_utterances"] == 4 and metrics["eval_utterances"] == 2
    refs = sorted(json.loads(line)["reference"] for line in (out / "transcripts_final.jsonl").open())
    assert refs == sorted(r["transcription"] for r in test_rows)


@pytest.mark.parametrize("model_type", ["hubert", "wavlm", "data2vec-audio"])
def test_sibling_ctc_models_through_auto_classes(tmp_path, model_type):
    from parpkit.interfaces import Utterance
    from parpkit.masks import PoolPruner, select_pool
    from parpkit_plugins.criteria import Magnitude

    config = {k: v for k, v in TINY_WAV2VEC2.items() if not (model_type == "data2vec-audio" and k in ("feat_extract_norm", "do_stable_layer_norm"))}
    b = CTCBackbone(CTCOptions(model_type=model_type, config=config, mask_time_prob=0.0), cache_dir=tmp_path)
    utts = [Utterance(str(i), np.random.default_rng(i).standard_normal(8000 + 800 * i).astype(np.float32) * 0.1, 16000, "ab ba")
            for i in range(3)]
    b.prepare(utts, "words")
    model = b.load()
    pool = select_pool([n for n, _ in model.named_parameters()], b.default_pool)
    assert len(pool) == 24
    PoolPruner(model, pool, Magnitude(), "global").prune(0.5)
    loss = model(**b.model_inputs(b.collate(utts))).loss
    assert torch.isfinite(loss)
    assert len(b.transcribe(model.eval(), [u.audio for u in utts])) == 3
