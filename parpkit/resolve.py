"""From a validated recipe to plugin instances and the pruning pool, before any weights load."""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from parpkit.errors import ParpkitError, PluginError, RecipeError, located
from parpkit.interfaces import Backbone, Criterion, Dataset, Schedule
from parpkit.masks import select_pool
from parpkit.recipe import Recipe, format_validation_error
from parpkit.registry import Plugins


def cache_dir() -> Path:
    return Path(os.environ.get("PARPKIT_CACHE", Path.home() / ".cache" / "parpkit"))


@dataclass
class Resolved:
    recipe: Recipe
    file: str
    backbone: Backbone
    dataset: Dataset
    criterion: Criterion
    schedule: Schedule
    providers: dict[str, str]

    def pool_patterns(self) -> tuple[list[str], list[str]]:
        p = self.recipe.pruning
        return (p.include if p.include is not None else list(self.backbone.default_pool)), list(p.exclude)

    def select_pool(self, model: torch.nn.Module) -> list[str]:
        include, exclude = self.pool_patterns()
        return select_pool([n for n, _ in model.named_parameters()], include, exclude, file=self.file, key="pruning")


def _instantiate(plugins: Plugins, kind: str, name: str, options: dict, key: str, file: str, **kwargs):
    try:
        entry = plugins[kind].get(name)
    except PluginError as exc:
        raise RecipeError(str(exc), file=file, key=f"{key}.name") from None
    try:
        opts = entry.cls.Options.model_validate(options)
    except ValidationError as exc:
        raise format_validation_error(exc, file, prefix=f"{key}.options") from None
    try:
        return entry.cls(opts, **kwargs), entry.provider
    except (ParpkitError, ValueError) as exc:
        raise RecipeError(str(exc), file=file, key=f"{key}.options") from None


def resolve(recipe: Recipe, plugins: Plugins, file: str) -> Resolved:
    r, cache = recipe, cache_dir()
    backbone, pb = _instantiate(plugins, "backbone", r.backbone.name, r.backbone.options, "backbone", file, cache_dir=cache)
    dataset, pd = _instantiate(plugins, "dataset", r.dataset.name, r.dataset.options, "dataset", file, cache_dir=cache)
    criterion, pc = _instantiate(plugins, "criterion", r.pruning.criterion.name, r.pruning.criterion.options,
                                 "pruning.criterion", file, seed=r.seed)
    schedule, ps = _instantiate(plugins, "schedule", r.pruning.schedule.name, r.pruning.schedule.options,
                                "pruning.schedule", file, target=r.pruning.sparsity)
    splits = located(file, "dataset.options", dataset.split_names)  # (audio_folder reads its layout here)
    wanted_splits = (("dataset.train_split", [r.dataset.train_split]), ("dataset.eval_split", r.dataset.eval_splits),
                     ("evaluation.validation_split", [r.evaluation.validation_split] if r.evaluation.validation_split else []),
                     ("pruning.calibration.split", [r.pruning.calibration.split] if r.pruning.calibration.split else []))
    for key, wanted in wanted_splits:
        for split in wanted:
            if split not in splits:
                raise RecipeError(f"{r.dataset.name} has no split {split!r}; it has: {', '.join(splits)}", file=file,
                                  key=key)
    providers = {"backbone": pb, "dataset": pd, "criterion": pc, "schedule": ps}
    return Resolved(recipe, file, backbone, dataset, criterion, schedule, providers)


def pool_groups(model: torch.nn.Module, pool: list[str]) -> list[dict]:
    """Pool tensors grouped by name with layer indices replaced by ``*``."""
    params = dict(model.named_parameters())
    groups: OrderedDict[str, dict] = OrderedDict()
    for name in pool:
        group = re.sub(r"\.\d+(?=\.)", ".*", name)
        g = groups.setdefault(group, {"group": group, "tensors": 0, "parameters": 0})
        g["tensors"] += 1
        g["parameters"] += params[name].numel()
    return list(groups.values())
