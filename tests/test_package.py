"""parpkit as a package: the wheel `python -m build` makes installs into a fresh environment and works there
(`parpkit --version`, `parpkit plugins` finding the built-in plugins through their entry points); the
command line's version, flags and exit codes; quiet means quiet."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import parpkit
from parpkit.cli import ExitCode, build_parser, main
from tests.conftest import requires_offline, tiny_recipe, write_recipe

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kw)
    assert done.returncode == 0, f"{' '.join(map(str, args))}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.package
def test_the_wheel_installs_into_a_fresh_environment_and_runs(tmp_path):
    """Built without build isolation (setuptools from the test extra; no network) from a copy of what the
    build reads (so nothing is written into the checkout, and nothing else is needed), installed with
    --no-deps into a venv that borrows this environment's dependencies (torch …) but not its editable parpkit."""
    import shutil

    source = tmp_path / "source"
    for folder in ("parpkit", "plugins"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, source)
    wheel, = dist.glob("parpkit-*.whl")
    assert wheel.name == f"parpkit-{parpkit.__version__}-py3-none-any.whl"
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel)
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    deps = tmp_path / "deps"  # this environment's packages, less parpkit itself
    deps.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not entry.name.startswith(("parpkit", "__editable__")) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    (site / "_parpkit_test_deps.pth").write_text(f"{deps}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PARPKIT_CACHE": str(tmp_path / "cache")}
    where = _run(python, "-c", "import parpkit, parpkit_plugins; print(parpkit.__file__); print(parpkit_plugins.__file__)",
                 cwd=tmp_path, env=env).stdout.split()
    assert all(Path(w).is_relative_to(site) for w in where), where  # the wheel's code, not the source tree's
    assert (site / "parpkit" / "py.typed").is_file()
    assert (site / f"parpkit-{parpkit.__version__}.dist-info" / "licenses" / "LICENSE").is_file()
    parpkit_cmd = venv / "bin" / "parpkit"
    assert _run(parpkit_cmd, "--version", cwd=tmp_path, env=env).stdout.strip() == f"parpkit {parpkit.__version__}"
    listed = _run(parpkit_cmd, "plugins", cwd=tmp_path, env=env).stdout
    for name in ("whisper", "wav2vec2", "synthetic_speech", "manifest", "magnitude", "sparsegpt", "parp", "omp"):
        assert f" {name} " in listed, listed
    assert f"parpkit {parpkit.__version__}" in listed  # provided by the installed distribution


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"parpkit {parpkit.__version__}"


def test_every_command_that_writes_takes_output_dir_and_the_old_output_still_works():
    parser = build_parser()
    writers = {"run": ["r.yaml"], "sweep": ["r.yaml"], "report": ["runs"], "compare-masks": ["a", "b"], "export": ["run"]}
    for command, positional in writers.items():
        for flag in ("--output-dir", "--output"):
            args = parser.parse_args([command, *positional, flag, "somewhere"])
            assert args.output_dir == "somewhere", (command, flag)
        assert "--output-dir" in parser._subparsers._group_actions[0].choices[command].format_help()
        assert "--output " not in parser._subparsers._group_actions[0].choices[command].format_help()  # not advertised


def test_exit_codes_tell_a_refused_input_from_a_failed_run_from_an_interruption(tmp_path, capsys, monkeypatch):
    import parpkit.api

    bad = write_recipe(tmp_path / "bad.yaml", tiny_recipe(**{"training.max_step": 3}))
    assert main(["validate", str(bad)]) == ExitCode.REFUSED == 2
    assert "training.max_step: unknown key" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # a command line argparse cannot read
        main(["run"])
    assert stop.value.code == ExitCode.REFUSED

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(parpkit.api, "run", interrupted)
    sweep = tiny_recipe(sweep={"grids": [{"pruning.sparsity": [0.3, 0.5]}]})
    path = write_recipe(tmp_path / "sweep.yaml", sweep)
    capsys.readouterr()
    assert main(["sweep", str(path), "--output-dir", str(tmp_path / "grid"), "--quiet"]) == ExitCode.INTERRUPTED == 130
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


@requires_offline
def test_a_run_that_fails_while_it_works_exits_3_and_says_so(tmp_path, capsys, monkeypatch):
    from parpkit.engine import lifecycle

    def nan_loss(s, **kw):
        raise parpkit.ParpkitError("loss became nan at step 5")

    monkeypatch.setattr(lifecycle, "start", nan_loss)  # after the data and the model loaded
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.max_steps": 1}))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]) == ExitCode.FAILED == 3
    assert "error: loss became nan at step 5" in capsys.readouterr().err


@requires_offline
def test_quiet_means_quiet_transformers_bars_included(tmp_path, capfd):
    """Nothing on stdout or stderr from parpkit.run(progress=False), not even transformers' "Writing model
    shards" bar; the libraries' bars are as they were afterwards."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a notebook (the CLI turns them off for its whole process)
    capfd.readouterr()
    parpkit.run(tiny_recipe(**{"training.max_steps": 1}), output_dir=tmp_path / "out", progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == "", err[-2000:]
    assert hf_logging.is_progress_bar_enabled()


def test_several_plugin_modules_can_be_passed_to_run(tmp_path):
    """parpkit.run(plugins=[module, module]) registers each under its own name (both were "builtins.module")."""
    import types

    from parpkit import RecipeError, hookimpl

    modules = []
    for name in ("first_plugin", "second_plugin"):
        module = types.ModuleType(name)
        module.register_datasets = hookimpl(lambda register: None)
        modules.append(module)
    recipe = tiny_recipe(**{"backbone.name": "no_such_backbone"})
    with pytest.raises(RecipeError, match="unknown backbone 'no_such_backbone'"):  # registered, then resolved
        parpkit.run(recipe, output_dir=tmp_path / "out", plugins=modules, progress=False)
