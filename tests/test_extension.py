"""The extension surface as a plugin author meets it: criteria that see gradients, the pruner contract,
a third-party package registered through its own entry point, and resuming its state after SIGKILL."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import parpkit
from parpkit.cli import main
from parpkit.masks import PoolPruner
from parpkit.registry import Plugins
from parpkit_plugins.criteria import Magnitude, Movement, MovementOptions, Taylor, TaylorOptions
from tests.conftest import requires_offline, run_and_kill, same_results, tiny_recipe, write_recipe

ROOT = Path(__file__).resolve().parents[1]


def _one_layer(weights: list[float]) -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
    model = torch.nn.Linear(len(weights), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weights]))
    return model, dict(model.named_parameters())


def _observe(criterion, params, grads: list[float]) -> None:
    params["weight"].grad = torch.tensor([grads])
    criterion.observe(1, params)


def _kept(model, criterion, sparsity=0.5) -> list[bool]:
    pruner = PoolPruner(model, ["weight"], criterion, "global")
    pruner.prune(sparsity)
    return pruner.masks["weight"][0].tolist()


def test_movement_keeps_weights_moving_away_from_zero_whatever_their_size():
    # w:    3.0 (pulled to 0)  0.1 (pushed out)  2.0 (pushed out)  0.2 (pulled to 0); SGD moves w by -lr*g
    weights, grads = [3.0, 0.1, 2.0, 0.2], [1.0, -1.0, -1.0, 1.0]
    model, params = _one_layer(weights)
    movement = Movement(MovementOptions())
    _observe(movement, params, grads)
    assert movement.acc["weight"][0].tolist() == pytest.approx([-3.0, 0.1, 2.0, -0.2])  # S = -g·w
    _observe(movement, params, grads)  # summed over updates
    assert movement.acc["weight"][0].tolist() == pytest.approx([-6.0, 0.2, 4.0, -0.4])
    assert _kept(model, movement) == [False, True, True, False]
    assert _kept(*_one_layer(weights)[:1], Magnitude()) == [True, False, True, False]


def test_taylor_averages_the_square_of_g_times_w_as_molchanov_2019():
    weights, grads = [3.0, 0.1, 2.0, 0.2], [0.0, 5.0, -0.01, -1.0]  # g·w = 0, 0.5, -0.02, -0.2
    model, params = _one_layer(weights)
    taylor = Taylor(TaylorOptions(decay=0.9))
    assert taylor.options.form == "squared"
    _observe(taylor, params, grads)
    assert taylor.acc["weight"][0].tolist() == pytest.approx([0.0, 0.25, 0.0004, 0.04])
    _observe(taylor, params, [0.1, 0.0, 0.0, 0.0])  # (3·0.1)² = 0.09 enters with weight 0.1
    assert taylor.acc["weight"][0].tolist() == pytest.approx([0.009, 0.225, 0.00036, 0.036])
    assert _kept(model, taylor) == [False, True, False, True]


def test_taylor_abs_form_averages_the_absolute_value():
    weights, grads = [3.0, 0.1, 2.0, 0.2], [0.0, 5.0, 0.01, 1.0]  # |w·g| = 0, 0.5, 0.02, 0.2
    model, params = _one_layer(weights)
    taylor = Taylor(TaylorOptions(decay=0.9, form="abs"))
    _observe(taylor, params, grads)
    assert taylor.acc["weight"][0].tolist() == pytest.approx([0.0, 0.5, 0.02, 0.2])
    _observe(taylor, params, [0.1, 0.0, 0.0, 0.0])  # a running average with decay 0.9
    assert taylor.acc["weight"][0].tolist() == pytest.approx([0.03, 0.45, 0.018, 0.18])
    assert _kept(model, taylor) == [False, True, False, True]  # magnitude would keep 3.0 and 2.0


def test_gradient_criteria_see_fp16_gradients_unscaled_and_skip_overflow_steps():
    """Under fp16 the Trainer's loss scaler multiplies gradients by its scale and unscales them only when it
    clips, after the criterion looked: the engine hands the criterion unscaled gradients, and nothing of an
    update the scaler skips (a real CPU GradScaler stands in for the Trainer's)."""
    from parpkit.engine.training import PhaseDriver

    class Log:
        def __init__(self):
            self.events = []

        def write(self, event, **fields):
            self.events.append((event, fields))

    class Schedule:
        def __init__(self):
            self.calls = []

        def on_gradients(self, step, pruner):
            self.calls.append(step)

    weights, grads = [3.0, 0.1, 2.0, 0.2], [1.0, -1.0, -1.0, 1.0]
    model, params = _one_layer(weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    movement, taylor, log, schedule = Movement(MovementOptions()), Taylor(TaylorOptions()), Log(), Schedule()
    drivers = [PhaseDriver(schedule, c, PoolPruner(model, ["weight"], c, "global"), log, None, 0) for c in (movement, taylor)]

    def update(g):
        optimizer.zero_grad()
        scaler.scale((model.weight * torch.tensor([g])).sum()).backward()  # the gradient is g, times the scale
        assert model.weight.grad[0].tolist() == [x * scaler.get_scale() for x in g]
        before = model.weight.grad.clone()
        for d in drivers:
            d.gradients_ready(0, scaler, list(model.parameters()))
        assert torch.equal(model.weight.grad, before)  # the optimizer gets them as the scaler left them
        scaler.step(optimizer)  # the scaler can still unscale (and clip) after the criteria looked
        scaler.update()

    update(grads)
    assert movement.acc["weight"][0].tolist() == pytest.approx([-3.0, 0.1, 2.0, -0.2])  # not 1024 times that
    assert taylor.acc["weight"][0].tolist() == pytest.approx([9.0, 0.01, 4.0, 0.04])
    update([float("inf"), 0.0, 0.0, 0.0])  # overflow: the scaler skips this update and halves its scale
    assert scaler.get_scale() == 512.0 and movement.observed == taylor.observed == 1
    assert movement.acc["weight"][0].tolist() == pytest.approx([-3.0, 0.1, 2.0, -0.2])  # no inf, no NaN
    assert [e for e, _ in log.events] == ["overflow", "overflow"] and schedule.calls == [0, 0, 0, 0]
    update(grads)  # at the new scale, the same gradient counts the same
    assert movement.acc["weight"][0].tolist() == pytest.approx([-6.0, 0.2, 4.0, -0.4])
    assert taylor.acc["weight"][0].tolist() == pytest.approx([9.0, 0.01, 4.0, 0.04])


def test_reset_optimizer_state_zeroes_adam_moments_only_where_asked():
    model, params = _one_layer([1.0, -2.0, 3.0, 0.5])
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    pruner = PoolPruner(model, ["weight"], Magnitude(), "global")
    pruner.optimizer = opt
    where = torch.tensor([[True, False, True, False]])
    assert pruner.reset_optimizer_state({"weight": where}) == 2
    for key in ("exp_avg", "exp_avg_sq"):
        state = opt.state[params["weight"]][key][0]
        assert state[0] == 0 and state[2] == 0 and state[1] != 0 and state[3] != 0


def test_the_engine_pruner_satisfies_the_protocol_schedules_type_against():
    model, _ = _one_layer([1.0, 2.0])
    assert isinstance(PoolPruner(model, ["weight"], Magnitude(), "global"), parpkit.Pruner)


def _docs_block(page: str, title: str) -> str:
    """The first Python code block after ``title`` in a documentation page."""
    text = (ROOT / "docs" / page).read_text()
    section = text[text.index(title):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]


def test_the_documented_plugin_example_runs_and_ranks_by_its_definition():
    """The criterion tutorial's plugin is real code: executed here, registered, and checked on values."""
    namespace: dict = {}
    exec(compile(_docs_block("extending/criterion.md", "## Ranking by gradients"), "docs example", "exec"), namespace)
    plugin = type("DocsPlugin", (), {"register_criteria": staticmethod(namespace["register_criteria"])})
    entry = Plugins(extra=[(plugin, "docs-example")])["criterion"].get("mean_taylor")
    criterion = entry.cls(entry.cls.Options())
    assert criterion.calibration_batches == 4
    model, params = _one_layer([3.0, 0.1, 2.0, 0.2])
    _observe(criterion, params, [0.0, 5.0, 0.01, 1.0])  # |w·g| = 0, 0.5, 0.02, 0.2
    _observe(criterion, params, [0.0, 3.0, 0.03, 1.0])  # |w·g| = 0, 0.3, 0.06, 0.2: the means are 0, 0.4, 0.04, 0.2
    assert criterion.scores("weight", params["weight"])[0].tolist() == pytest.approx([0.0, 0.4, 0.04, 0.2])
    assert _kept(model, criterion) == [False, True, False, True]  # magnitude would keep 3.0 and 2.0
    restored = entry.cls(entry.cls.Options())
    restored.load_state_dict(criterion.state_dict())
    assert torch.equal(restored.scores("weight", params["weight"]), criterion.scores("weight", params["weight"]))


@requires_offline
def test_a_gradient_criterion_is_calibrated_before_the_first_mask(tmp_path):
    from parpkit.recipe import load_recipe
    from parpkit.resolve import resolve

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{
        "pruning.criterion": {"name": "taylor", "options": {"calibration_batches": 2}},
        "pruning.schedule": {"name": "fixed"}, "training.max_steps": 2}))
    result = parpkit.run(path, output_dir=tmp_path / "out", progress=False)
    events = [json.loads(line) for line in (result.run_dir / "log.jsonl").open()]
    calibrate = [e for e in events if e["event"] == "calibrate"]
    assert len(calibrate) == 1 and calibrate[0]["criterion"] == "taylor" and calibrate[0]["batches"] == 2
    assert [e["event"] for e in events].index("calibrate") < [e["event"] for e in events].index("prune")
    # the fixed mask is Taylor's, not magnitude's: some pruned pretrained weights are larger than some kept ones
    recipe, _ = load_recipe(path)
    pretrained = dict(resolve(recipe, Plugins(), str(path)).backbone.load().named_parameters())  # same seed: same weights
    name = "model.encoder.layers.0.fc1.weight"
    w, kept = pretrained[name].detach().abs(), result.masks()[name]
    assert (~kept).any() and w[~kept].max() > w[kept].min()
    assert result.final["pool_sparsity"] == pytest.approx(0.5, abs=1e-3)


@requires_offline
@pytest.mark.parametrize("name", ["movement", "taylor"])
def test_a_gradient_criterion_without_calibration_is_refused_before_anything_loads(tmp_path, capsys, name):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{
        "pruning.criterion": {"name": name, "options": {"calibration_batches": 0}}, "pruning.schedule": {"name": "fixed"}}))
    assert main(["validate", str(path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "pruning.criterion" in err and "calibration_batches: 0" in err and "pruning whole tensors" in err
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 2
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- a third-party package

PACKAGE = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "thirdparty-parp"
        version = "0.3.0"

        [project.entry-points.parpkit]
        thirdparty = "thirdparty_parp"

        [tool.setuptools]
        packages = ["thirdparty_parp"]
        """,
    "thirdparty_parp/__init__.py": '''
        """A plugin package as a user writes one: only `parpkit` is imported."""
        import torch
        from pydantic import Field

        from parpkit import PluginOptions, PruningCriterion, Schedule, hookimpl


        class FisherOptions(PluginOptions):
            calibration_batches: int = Field(default=2, ge=0)


        class Fisher(PruningCriterion):
            """Empirical Fisher saliency: w^2 times the sum of g^2 over observed updates."""

            name = "fisher"
            Options = FisherOptions

            def __init__(self, options=None, **kw):
                super().__init__(options, **kw)
                self.calibration_batches = self.options.calibration_batches
                self.sq = {}

            def observe(self, step, params):
                for n, p in params.items():
                    if p.grad is not None:
                        self.sq.setdefault(n, torch.zeros(p.shape)).add_(p.grad.float() ** 2)

            def scores(self, name, param):
                return param.detach().float() ** 2 * self.sq.get(name, torch.zeros(param.shape))

            def state_dict(self):
                return {"sq": dict(self.sq)}

            def load_state_dict(self, state):
                self.sq = dict(state["sq"])


        class ResetOptions(PluginOptions):
            interval: int = Field(default=3, gt=0)


        class ParpReset(Schedule):
            """PARP whose re-prunes zero the Adam moments of weights that regrew and stay kept (as AC/DC does)."""

            name = "parp_reset"
            Options = ResetOptions

            def __init__(self, options=None, **kw):
                super().__init__(options, **kw)
                self.resets = []

            def on_start(self, pruner):
                pruner.initial_mask(self.target)

            def on_optimizer_step(self, step, pruner):
                if step % self.options.interval == 0:
                    before = {n: m.clone() for n, m in pruner.masks.items()}
                    pruner.prune(self.target)
                    regrown = {n: pruner.masks[n] & ~before[n] for n in before}
                    self.resets.append([step, pruner.reset_optimizer_state(regrown)])

            def before_evaluate(self, pruner):
                pruner.prune(self.target)

            def state_dict(self):
                return {"resets": self.resets}

            def load_state_dict(self, state):
                self.resets = [list(r) for r in state["resets"]]


        class EnergyOptions(PluginOptions):
            calibration_batches: int = Field(default=1, gt=0)


        class InputEnergy(PruningCriterion):
            """|w| times the mean absolute value of the input feature it multiplies, measured before every prune."""

            name = "input_energy"
            needs = "activations"
            Options = EnergyOptions

            def __init__(self, options=None, **kw):
                super().__init__(options, **kw)
                self.calibration_batches = self.options.calibration_batches
                self.energy, self.calls = {}, 0

            def check(self, context):
                for param in context.pool:
                    owner, attr = context.module_of(param)
                    if attr == "weight" and not isinstance(context.modules[owner], torch.nn.Linear):
                        raise ValueError(f"{param} is not a linear layer's weight")

            def calibrate(self, context):
                weights = {context.module_of(p)[0]: p for p in context.pool if context.module_of(p)[1] == "weight"}
                sums = {}
                rows = context.capture_inputs(weights, lambda m, x: sums.__setitem__(m, sums.get(m, 0) + x.abs().sum(0)),
                                              batches=self.calibration_batches)
                self.energy = {weights[m]: sums[m] / rows[m] for m in sums}
                self.calls += 1

            def scores(self, name, param):
                energy = self.energy.get(name)
                return param.detach().abs() * (energy.to(param.device) if energy is not None else 1.0)

            def state_dict(self):
                return {"calls": self.calls}

            def load_state_dict(self, state):
                self.calls = int(state["calls"])


        @hookimpl
        def register_criteria(register):
            register(Fisher)
            register(InputEnergy)


        @hookimpl
        def register_schedules(register):
            register(ParpReset)
        ''',
}


@pytest.fixture(scope="module")
def thirdparty(tmp_path_factory):
    """The package above, installed with pip into a folder put on the path (as site-packages would be)."""
    src, target = tmp_path_factory.mktemp("thirdparty-src"), tmp_path_factory.mktemp("site")
    for name, text in PACKAGE.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(textwrap.dedent(text).lstrip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("thirdparty_parp", None)
    importlib.invalidate_caches()


def _thirdparty_recipe(**changes):
    return tiny_recipe(**{"pruning.criterion": {"name": "fisher"}, "pruning.schedule": {"name": "parp_reset", "options": {"interval": 3}},
                          "training.max_steps": 9, "training.save_steps": 3, "training.learning_rate": 3e-3,
                          "training.keep_checkpoints_when_done": True, **changes})


@requires_offline
def test_a_third_party_package_plugs_in_through_its_entry_point_and_resumes_after_sigkill(thirdparty, tmp_path, capsys):
    plugins = Plugins()
    assert plugins["criterion"].get("fisher").provider == "thirdparty-parp 0.3.0"
    assert plugins["schedule"].get("parp_reset").provider == "thirdparty-parp 0.3.0"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(thirdparty), os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run([sys.executable, "-m", "parpkit.cli", "plugins"], env=env, capture_output=True, text=True)
    assert "parp_reset" in listed.stdout and "thirdparty-parp 0.3.0" in listed.stdout

    path = write_recipe(tmp_path / "r.yaml", _thirdparty_recipe())
    alone, killed = tmp_path / "alone", tmp_path / "killed"
    assert main(["run", str(path), "--output-dir", str(alone), "--quiet"]) == 0
    run_and_kill(path, killed, env=env)
    assert main(["run", str(path), "--output-dir", str(killed), "--quiet"]) == 0
    assert "resume" in [json.loads(line)["event"] for line in (killed / "log.jsonl").open()]
    same_results(alone, killed)
    # both plugins did their work, and their state came back from the checkpoint
    state = json.loads((alone / "checkpoints" / "phase-0" / "checkpoint-9" / "parpkit_state.json").read_text())
    resets = state["schedule"]["resets"]
    assert [r[0] for r in resets] == [3, 6, 9] and all(r[1] > 0 for r in resets)
    assert set(state["criterion"]["sq"]) == set(state["pruner"]["masks"])  # one Fisher accumulator per pool tensor
    resumed = json.loads((killed / "checkpoints" / "phase-0" / "checkpoint-9" / "parpkit_state.json").read_text())
    assert resumed["schedule"]["resets"] == resets


@requires_offline
def test_a_third_party_activation_criterion_calibrates_before_every_prune_and_resumes_after_sigkill(thirdparty, tmp_path):
    """Written with only parpkit.__all__: it reads layer inputs through the run context, is calibrated before the
    first mask and every re-prune, and a run killed mid-way resumes to the same masks and weights."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(thirdparty), os.environ.get("PYTHONPATH", "")])}
    path = write_recipe(tmp_path / "r.yaml", _thirdparty_recipe(**{"pruning.criterion": {"name": "input_energy"},
                                                                   "pruning.scope": "per_row", "evaluation.dense": False}))
    alone, killed = tmp_path / "alone", tmp_path / "killed"
    assert main(["run", str(path), "--output-dir", str(alone), "--quiet"]) == 0
    run_and_kill(path, killed, env=env)
    assert main(["run", str(path), "--output-dir", str(killed), "--quiet"]) == 0
    same_results(alone, killed)
    state = json.loads((alone / "checkpoints" / "phase-0" / "checkpoint-9" / "parpkit_state.json").read_text())
    assert state["criterion"]["calls"] == 4  # the first mask and the re-prunes at steps 3, 6 and 9
    masks = parpkit.RunResult(alone, {}).masks()
    assert all(int((~m).reshape(m.shape[0] if m.dim() > 1 else 1, -1).sum(1).unique().numel()) == 1 for m in masks.values())
