"""Running recipes from Python: ``parpkit.run`` does what ``parpkit run`` does and returns a ``RunResult``.

    import parpkit

    result = parpkit.run("recipes/quickstart.yaml", overrides={"training.max_steps": 20},
                         output_dir="runs/notebook")
    print(result.final["wer"], result.final["pool_sparsity"])
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parpkit.progress import Progress, quiet_libraries
from parpkit.recipe import Overrides, read_recipe_file, recipe_from_mapping


@dataclass(frozen=True)
class RunResult:
    """A finished run: its directory and the metrics written to ``metrics.json``."""

    run_dir: Path
    metrics: dict[str, Any]

    @property
    def stages(self) -> dict[str, dict[str, float]]:
        """Error rates and sparsity per evaluated stage (``dense``, ``after_prune``, … ``final``)."""
        return self.metrics["stages"]

    @property
    def final(self) -> dict[str, float]:
        return self.stages["final"]

    @property
    def model_dir(self) -> Path:
        """The final model and processor; plain transformers loads it."""
        return self.run_dir / "model"

    def masks(self) -> dict[str, torch.Tensor]:
        """The final keep-masks (bool, ``True`` = kept) by parameter name."""
        from safetensors.torch import load_file

        return load_file(str(self.run_dir / "masks.safetensors"))


def plugin_name(plugin: object) -> str:
    """The name a plugin object passed to ``run`` registers under: a module's own name (several modules may be
    passed), else its class's."""
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    return f"{type(plugin).__module__}.{type(plugin).__qualname__}"


def run(recipe: str | Path | Mapping[str, Any], *, overrides: Overrides = (), output_dir: str | Path | None = None,
        fresh: bool = False, resume: bool = False, plugins: Sequence[object] = (), progress: bool | Progress = True,
        callbacks: Sequence[Any] = (), shared: str | Path | None = None, file: str | None = None) -> RunResult:
    """Run a recipe (a YAML file or a mapping with the same keys) end to end, or resume it.

    ``overrides``: ``{"training.max_steps": 20}`` or ``["training.max_steps=20"]``, as ``--set``.
    ``plugins``: extra plugin objects or modules (with ``@hookimpl`` functions) registered beside the installed ones.
    ``callbacks``: transformers ``TrainerCallback`` objects added to every fine-tuning phase.
    ``shared``: a folder for work that other runs repeat (a sweep's); it never changes a result.
    ``file``: how errors name a mapping recipe (default ``<recipe>``; a file recipe is named by its path).
    """
    from parpkit.engine import run as run_engine
    from parpkit.registry import Plugins, plugin_name
    from parpkit.resolve import resolve

    if output_dir is not None and not str(output_dir).strip():
        from parpkit.errors import UsageError

        raise UsageError("--output-dir is empty (that would be the current folder); give the run's own folder")
    if isinstance(recipe, Mapping):
        data, file = recipe, file or "<recipe>"
    else:
        data, file = read_recipe_file(recipe), str(recipe)
    model, mapping = recipe_from_mapping(data, overrides, file)
    registered = Plugins(extra=[(p, plugin_name(p)) for p in plugins])
    resolved = resolve(model, registered, file)
    out = Path(output_dir) if output_dir is not None else model.run_dir()
    shown = progress if isinstance(progress, Progress) else Progress(enabled=progress)
    with contextlib.nullcontext() if shown.enabled else quiet_libraries():
        metrics = run_engine(resolved, shown, output_dir=out, resolved_mapping=mapping, callbacks=callbacks, fresh=fresh,
                             resume=resume, shared=Path(shared) if shared is not None else None)
    return RunResult(out, metrics)
