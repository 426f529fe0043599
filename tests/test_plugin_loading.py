"""Issue 33: one broken installed plugin no longer breaks every command (it is named and left out, the others
work); PARPKIT_LOAD_PLUGINS loads only the named ones; plugin modules passed to ``parpkit.run`` are told apart."""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import pytest

import parpkit
import parpkit.registry as registry
from parpkit.cli import main
from parpkit.errors import PluginError
from parpkit.registry import Plugins

GOOD = '''
from parpkit import PruningCriterion, hookimpl

class Ria(PruningCriterion):
    """Relative importance: |w| over its row's and column's sums."""
    name = "ria_test"

    def scores(self, name, param):
        return param.detach().abs()

@hookimpl
def register_criteria(register):
    register(Ria)
'''

BROKEN = {
    "importfail": "import a_module_that_is_not_installed_xyz\n",
    "syntaxfail": "def broken(:\n",
    "raisinghook": "from parpkit import hookimpl\n\n@hookimpl\ndef register_criteria(register):\n    raise RuntimeError('no GPU found')\n",
    "typohook": "from parpkit import hookimpl\n\n@hookimpl\ndef register_criterion(register):\n    pass\n",
    "notaclass": "from parpkit import hookimpl\n\n@hookimpl\ndef register_schedules(register):\n    register(print)\n",
    # a hook whose argument is not called `register`: pluggy refuses it when it registers
    "wrongarg": "from parpkit import hookimpl\n\n@hookimpl\ndef register_criteria(reg):\n    pass\n",
    # classes that would fail only when a recipe named them
    "abstract": "from parpkit import Schedule, hookimpl\n\nclass Lazy(Schedule):\n    name = 'lazy_t33'\n\n"
                "@hookimpl\ndef register_schedules(register):\n    register(Lazy)\n",
    "bare": "from parpkit import Criterion, hookimpl\n\nclass Bare(Criterion):\n    name = 'bare_t33'\n\n"
            "@hookimpl\ndef register_criteria(register):\n    register(Bare)\n",
    "plainoptions": "import pydantic\nfrom parpkit import PruningCriterion, hookimpl\n\n"
                    "class Plain(PruningCriterion):\n    name = 'plain_t33'\n    class Options(pydantic.BaseModel):\n        x: int = 1\n"
                    "    def scores(self, name, param):\n        return param.detach().abs()\n\n"
                    "@hookimpl\ndef register_criteria(register):\n    register(Plain)\n",
    "badneeds": "from parpkit import PruningCriterion, hookimpl\n\nclass Typo(PruningCriterion):\n    name = 'typo_t33'\n"
                "    needs = 'activation'\n    def scores(self, name, param):\n        return param.detach().abs()\n\n"
                "@hookimpl\ndef register_criteria(register):\n    register(Typo)\n",
}


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """A distribution ``parpkit-extra-test`` on sys.path with one good plugin and one of each kind of breakage."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "goodmod_t33.py").write_text(GOOD)
    (site / "collide_t33.py").write_text(GOOD.replace('"ria_test"', '"collide_test"'))  # entry point "criteria", as parpkit's
    for name, text in BROKEN.items():
        (site / f"{name}_t33.py").write_text(text)
    info = site / "parpkit_extra_test-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: parpkit-extra-test\nVersion: 1.0\n")
    lines = ["[parpkit]", "good = goodmod_t33", "criteria = collide_t33"] + [f"{name} = {name}_t33" for name in BROKEN] + ["badentry = nowhere_t33.sub:thing"]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    monkeypatch.setattr(registry, "_warned", set())
    monkeypatch.delenv(registry.LOAD_PLUGINS, raising=False)
    yield site
    for name in [*BROKEN, "goodmod", "collide"]:
        sys.modules.pop(f"{name}_t33", None)


def test_broken_plugins_are_named_and_left_out_and_the_others_work(installed, capsys):
    plugins = Plugins()
    err = " ".join(capsys.readouterr().err.split())
    assert plugins["criterion"].get("ria_test").provider == "parpkit-extra-test 1.0"
    assert "magnitude" in plugins["criterion"].names() and "whisper" in plugins["backbone"].names()
    for name, why in [("importfail", "ModuleNotFoundError: No module named 'a_module_that_is_not_installed_xyz'"),
                      ("syntaxfail", "SyntaxError: "), ("raisinghook", "RuntimeError: no GPU found"),
                      ("typohook", "implements a hook parpkit does not define"), ("notaclass", "is not a subclass of parpkit.Schedule"),
                      ("badentry", "ModuleNotFoundError: No module named 'nowhere_t33'"),
                      ("wrongarg", "parpkit's hooks take one argument, `register`"),
                      ("abstract", "registered Lazy as a schedule, but it does not implement on_start"),
                      ("bare", "derives from none of parpkit.PruningCriterion, parpkit.StructuredCriterion, "
                               "parpkit.ReconstructingCriterion"),
                      ("plainoptions", "whose Options is not a subclass of parpkit.PluginOptions"),
                      ("badneeds", "with needs = 'activation'; expected None, 'gradients' or 'activations'")]:
        assert f"warning: the parpkit plugin {name!r} (parpkit-extra-test 1.0" in err, name
        assert why in plugins.unavailable[name], (name, plugins.unavailable[name])
    assert "PARPKIT_LOAD_PLUGINS names the plugins to load" in err
    # an entry point named as one of parpkit's ("criteria"): both load, neither hides the other
    assert plugins["criterion"].get("collide_test").provider == "parpkit-extra-test 1.0"
    assert plugins["criterion"].get("magnitude").provider.startswith("parpkit ")
    with pytest.raises(PluginError, match=r"unknown criterion 'ria'; known: .*ria_test.* \(not loaded: .*raisinghook: "
                                          r"RuntimeError: no GPU found"):
        plugins["criterion"].get("ria")


def test_parpkit_plugins_lists_them_and_runs(installed, capsys):
    assert main(["plugins"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "ria_test" in out and "not loaded" in out and "importfail" in out


def test_load_plugins_names_the_plugins_to_load(installed, monkeypatch, capsys):
    monkeypatch.setenv(registry.LOAD_PLUGINS, "parpkit")  # the built-in ones only: no warnings
    plugins = Plugins()
    assert "whisper" in plugins["backbone"].names() and "ria_test" not in plugins["criterion"].names()
    assert capsys.readouterr().err == "" and plugins.unavailable == {}
    monkeypatch.setenv(registry.LOAD_PLUGINS, "good, whisper")
    plugins = Plugins()
    assert plugins["criterion"].names() == ["ria_test"] and plugins["backbone"].names() == ["whisper"]
    monkeypatch.setenv(registry.LOAD_PLUGINS, "")
    assert all(not r.names() for r in Plugins().registries.values())
    monkeypatch.setenv(registry.LOAD_PLUGINS, "parpkit,nonesuch")
    Plugins()
    assert "PARPKIT_LOAD_PLUGINS names 'nonesuch', but no installed parpkit plugin" in capsys.readouterr().err


def _module(name: str, criterion: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(GOOD.replace('"ria_test"', repr(criterion)).replace("class Ria", f"class C_{criterion}")
         .replace("register(Ria)", f"register(C_{criterion})"), module.__dict__)
    return module


def test_run_takes_several_plugin_modules_and_an_installed_one_again(monkeypatch, tmp_path):
    import parpkit.engine

    seen = {}

    def engine(resolved, progress, **kw):
        seen["criterion"] = resolved.criterion.name
        return {}

    monkeypatch.setattr(parpkit.engine, "run", engine)
    from parpkit.testing import tiny_recipe

    a, b = _module("plugin_a", "crit_a"), _module("plugin_b", "crit_b")
    import parpkit_plugins.criteria as installed_criteria

    parpkit.run(tiny_recipe(**{"pruning.criterion.name": "crit_b"}), output_dir=tmp_path / "out",
                plugins=[a, b, installed_criteria], progress=False)
    assert seen["criterion"] == "crit_b"
    with pytest.raises(PluginError, match=r"two plugins register a criterion named 'crit_a': plugin_a .* and plugin_a'"):
        parpkit.run(tiny_recipe(), output_dir=tmp_path / "out", plugins=[a, _module("plugin_a", "crit_a")], progress=False)
    broken = types.ModuleType("broken_passed")
    exec("from parpkit import hookimpl\n@hookimpl\ndef register_criteria(register):\n    raise RuntimeError('boom')\n",
         broken.__dict__)
    with pytest.raises(PluginError, match=r"plugin broken_passed: RuntimeError: boom"):
        parpkit.run(tiny_recipe(), output_dir=tmp_path / "out", plugins=[broken], progress=False)


def test_a_plugin_passed_in_whose_hook_takes_another_argument_is_a_plugin_error_naming_it():
    module = types.ModuleType("wrongarg_passed")
    exec(BROKEN["wrongarg"], module.__dict__)
    with pytest.raises(PluginError, match=r"plugin 'wrongarg_passed': .*Argument\(s\) \{'reg'\} are declared in the hookimpl "
                                          r".*parpkit's hooks take one argument, `register`"):
        Plugins(extra=[(module, "wrongarg_passed")], load_entrypoints=False)
