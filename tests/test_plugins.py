import pytest
import torch

from parpkit import PruningCriterion, hookimpl
from parpkit.cli import main
from parpkit.errors import PluginError
from parpkit.recipe import load_recipe
from parpkit.registry import Plugins
from parpkit.resolve import resolve
from tests.conftest import requires_offline, tiny_recipe, write_recipe


def test_builtins_come_through_entry_points_with_their_package():
    plugins = Plugins()
    assert {"whisper"} <= set(plugins["backbone"].names())
    assert {"magnitude", "random"} <= set(plugins["criterion"].names())
    assert {"parp", "fixed"} <= set(plugins["schedule"].names())
    assert "synthetic_speech" in plugins["dataset"].names()
    assert plugins["criterion"].get("magnitude").provider.startswith("parpkit ")
    # nothing registered them but the entry points
    assert not Plugins(load_entrypoints=False)["criterion"].names()


class Reversed(PruningCriterion):
    """Keeps the smallest weights: easy to recognise in the result."""

    name = "keep_smallest"

    def scores(self, name, weight):
        return -weight.abs()


class ThirdParty:
    @hookimpl
    def register_criteria(self, register):
        register(Reversed)


@requires_offline
def test_a_registered_plugin_is_usable_from_a_recipe(tmp_path):
    plugins = Plugins(extra=[(ThirdParty(), "third-party")])
    assert plugins["criterion"].get("keep_smallest").provider == "third-party"
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"pruning.criterion": {"name": "keep_smallest"}}))
    recipe, _ = load_recipe(path)
    resolved = resolve(recipe, plugins, str(path))
    model = resolved.backbone.load()
    w = model.model.encoder.layers[0].fc1.weight.detach().clone()
    from parpkit.masks import PoolPruner

    pruner = PoolPruner(model, resolved.select_pool(model), resolved.criterion, "per_tensor")
    pruner.prune(0.5)
    kept = pruner.masks["model.encoder.layers.0.fc1.weight"]
    assert w.abs()[kept].max() <= w.abs()[~kept].min()  # the plugin's ranking decided


def test_duplicate_names_are_an_error_naming_both_providers():
    class Dup:
        @hookimpl
        def register_criteria(self, register):
            register(type("M", (PruningCriterion,), {"name": "magnitude", "scores": lambda s, n, w: w}))

    with pytest.raises(PluginError, match=r"two plugins register a criterion named 'magnitude': parpkit .* and dup"):
        Plugins(extra=[(Dup(), "dup")])


def test_hook_with_no_specification_is_rejected():
    class Typo:
        @hookimpl
        def register_criterions(self, register):  # misspelled hook
            pass

    with pytest.raises(PluginError, match="register_criterions"):
        Plugins(extra=[(Typo(), "typo")])


def test_registering_a_non_plugin_class_is_an_error():
    class Wrong:
        @hookimpl
        def register_backbones(self, register):
            register(torch.nn.Linear)

    with pytest.raises(PluginError, match="not a subclass of parpkit.Backbone"):
        Plugins(extra=[(Wrong(), "wrong")])


def test_unknown_name_lists_the_known():
    with pytest.raises(PluginError, match=r"unknown backbone 'whisperr'; known: .*whisper"):
        Plugins()["backbone"].get("whisperr")


def test_plugins_command_lists_every_kind(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("whisper", "magnitude", "random", "parp", "fixed", "synthetic_speech"):
        assert name in out
