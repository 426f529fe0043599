"""Sweeps: a grid of recipe variations, each point a run of its own under one sweep directory.

A recipe's ``sweep:`` section lists grids. Each grid maps axes to lists of values and is crossed (every
combination) unless its lists sit under ``zip:`` (taken element by element, then crossed with the rest).
An axis is a dotted recipe key (``pruning.sparsity``) or the name of a ``variants`` table, whose values
are labels for bundles of overrides (``method: {random: {pruning.schedule: {name: fixed}, …}}``)::

    sweep:
      variants:
        method:
          parp: {pruning.schedule: {name: parp, options: {interval: 20}}}
          random: {pruning.schedule: {name: fixed}, pruning.criterion: {name: random}}
      grids:
        - {method: [parp, random], pruning.sparsity: [0.5, 0.9]}
        - cross: {method: [parp]}
          zip: {pruning.sparsity: [0.5, 0.7], seed: [1, 2]}

Points are deduplicated (same overrides here; ``parpkit sweep`` also drops points whose resolved recipes are
equal, naming them); each runs into ``SWEEP_DIR/<name>`` with the work points share (the dense
evaluation, identical fine-tuning phases) kept once in ``SWEEP_DIR/shared``. A point's recipe is the
base recipe without its ``sweep`` section plus the point's overrides: exactly what ``parpkit run RECIPE
--set sweep=null --set …`` runs, so points can also be run one per process or per GPU.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from parpkit.engine.rundir import atomic_write
from parpkit.errors import RecipeError
from parpkit.recipe import _Strict, dump_value, parse_override, recipe_from_mapping


#: points in one sweep at most: more is a typo in a grid (a sweep of 10⁶ points would never finish)
MAX_POINTS = 10_000


class Grid(_Strict):
    cross: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """A grid written as a plain mapping of axes is crossed."""
        if isinstance(data, dict) and not set(data) & {"cross", "zip"}:
            return {"cross": data}
        return data

    @model_validator(mode="after")
    def _lists(self):
        if not self.cross and not self.zip:
            raise ValueError("a grid needs at least one axis")
        for part in (self.cross, self.zip):
            for axis, values in part.items():
                if not values:
                    raise ValueError(f"axis {axis!r} has no values")
        lengths = {len(v) for v in self.zip.values()}
        if len(lengths) > 1:
            raise ValueError(f"zip lists must have the same length, got {sorted(lengths)}")
        if set(self.cross) & set(self.zip):
            raise ValueError(f"axes both crossed and zipped: {sorted(set(self.cross) & set(self.zip))}")
        return self


class SweepSection(_Strict):
    #: axis name -> label -> overrides (dotted recipe keys to values)
    variants: dict[str, dict[str, dict[str, Any]]] = Field(default_factory=dict)
    grids: list[Grid] = Field(min_length=1)

    @model_validator(mode="after")
    def _tables(self):
        empty = [axis for axis, table in self.variants.items() if not table]
        if empty:
            raise ValueError(f"variants table {empty[0]!r} has no labels")
        return self


@dataclass(frozen=True)
class Point:
    name: str
    axes: tuple[tuple[str, Any], ...]  # (axis, value or variant label) in axis order
    overrides: dict[str, Any]

    def label(self, axis: str) -> Any:
        return dict(self.axes).get(axis)


def axis_text(value: Any) -> str:
    """An axis value as point names and report labels show it (mappings and lists by a short digest)."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return "h" + __import__("hashlib").sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
    return str(value)


def _name(axes: tuple[tuple[str, Any], ...]) -> str:
    parts = [f"{axis.rsplit('.', 1)[-1]}-{axis_text(value)}" for axis, value in axes]
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "_".join(parts)) or "point"


def _within(key: str, other: str) -> bool:
    """``key`` is ``other`` or a key inside it (``pruning.schedule.options.interval`` inside ``pruning.schedule``)."""
    return key == other or key.startswith(other + ".")


def _no_conflict(key: str, axis: str, owner: dict[str, str], file: str, grid: int) -> None:
    """Two axes of one point setting the same key, or one a key inside the other's (a variant setting the
    whole ``pruning.schedule``, an axis on ``pruning.schedule.options.interval``): which one wins would
    depend on the order of the axes, silently. Refused, naming both."""
    for other, by in owner.items():
        if by != axis and (_within(key, other) or _within(other, key)):
            what = f"both set {key}" if other == key else f"set {other} and {key}, one inside the other"
            raise RecipeError(f"{by} and {axis} {what}; which one wins would depend on the order of the axes: "
                              "set it in one of them only", file=file, key=f"sweep.grids[{grid}]")


def points(sweep: SweepSection, file: str = "<recipe>", dropped: list[tuple[str, str]] | None = None) -> list[Point]:
    """Every point of every grid, in order, without duplicates (same overrides); each duplicate left out
    is added to ``dropped`` as (its name, the name of the point it repeats)."""
    out: list[Point] = []
    seen: dict[str, str] = {}
    sizes = [math.prod(len(v) for v in grid.cross.values()) * (len(next(iter(grid.zip.values()))) if grid.zip else 1)
             for grid in sweep.grids]
    for g, size in enumerate(sizes):  # counted before any point is made: a 10⁶-point grid hung --dry-run
        if sum(sizes[:g + 1]) > MAX_POINTS:
            raise RecipeError(f"the sweep has {sum(sizes):,} points ({size:,} in this grid); parpkit runs at most "
                              f"{MAX_POINTS:,} in one sweep: split it, or cross fewer values", file=file, key=f"sweep.grids[{g}]")
    for g, grid in enumerate(sweep.grids):
        crossed = list(itertools.product(*[[(a, v) for v in vals] for a, vals in grid.cross.items()]))
        zipped = list(zip(*[[(a, v) for v in vals] for a, vals in grid.zip.items()], strict=True)) or [()]
        for left in crossed:
            for right in zipped:
                axes = tuple(left) + tuple(right)
                overrides: dict[str, Any] = {}
                owner: dict[str, str] = {}  # key -> the axis that set it
                for axis, value in axes:
                    if axis in sweep.variants:
                        if value not in sweep.variants[axis]:
                            known = ", ".join(sweep.variants[axis])
                            raise RecipeError(f"{axis} has no variant {value!r}; it has: {known}", file=file,
                                              key=f"sweep.grids[{g}]")
                        sets = sweep.variants[axis][value]
                        where = f"{axis} (variant {value})"
                    else:
                        sets, where = {axis: value}, axis
                    for key in sets:
                        _no_conflict(key, where, owner, file, g)
                        owner[key] = where
                    overrides.update(sets)
                canon = json.dumps(overrides, sort_keys=True, default=str)
                if canon in seen:
                    if dropped is not None and _name(axes) != seen[canon]:
                        dropped.append((_name(axes), seen[canon]))
                    continue
                seen[canon] = _name(axes)
                out.append(Point(_name(axes), axes, overrides))
    counts = Counter(p.name for p in out)
    taken = set(counts)
    renamed = []
    for i, p in enumerate(out):  # two override sets under one name (a/b and a_b, dict values of one hash prefix)
        if counts[p.name] > 1:
            name, k = f"{p.name}_{i}", i
            while name in taken:  # never the name of another point (a_b_1 may be one)
                k += 1
                name = f"{p.name}_{k}"
            taken.add(name)
            p = Point(name, p.axes, p.overrides)
        renamed.append(p)
    return renamed


def point_recipe(base: dict[str, Any], point: Point, overrides: list[str] = (), file: str = "<recipe>", runs: bool = True):
    """The recipe a point runs: the base recipe with ``sweep`` removed, the sweep's own ``--set``
    overrides, then the point's, before ``${var}`` substitution: what ``run_command`` runs. Returns the
    validated recipe and its resolved mapping. ``runs``: a ``--set`` the point's own overrides would drop is
    refused (not for a point ``--only`` leaves out)."""
    combined: dict[str, Any] = {"sweep": None}
    for text in overrides:
        keys, value = parse_override(text)
        combined[".".join(keys)] = value
        # the point's overrides come after --set: one that sets this key, or a mapping above it, would drop it
        if runs and (hidden := next((k for k in point.overrides if _within(".".join(keys), k)), None)):
            raise RecipeError(f"--set {text}: the point sets {hidden} itself, so this setting would be lost; change the "
                              "sweep's axis or variant instead", file=file)
    combined.update(point.overrides)
    return recipe_from_mapping(base, combined, file)


def sweep_of(data: dict[str, Any], file: str) -> SweepSection:
    from pydantic import ValidationError

    from parpkit.recipe import format_validation_error

    if not data.get("sweep"):
        raise RecipeError("this recipe has no sweep: section (see `parpkit sweep --help`)", file=file, key="sweep")
    try:
        return SweepSection.model_validate(data["sweep"])
    except ValidationError as exc:
        error = format_validation_error(exc, file, prefix="sweep")
        if "valid list, got '${" in str(error):  # the sweep section is read before vars are substituted
            error = RecipeError(f"{error.detail}; an axis's list of values cannot be a variable (vars are substituted "
                                "in each point's values): write the list", file=error.file, key=error.key)
        raise error from None


def run_command(recipe: Path, point: Point, run_dir: Path, shared: Path, overrides: list[str]) -> str:
    """The ``parpkit run`` command line of one point (for a scheduler, or one process per GPU)."""
    args = ["parpkit", "run", str(recipe), "--set", "sweep=null"]
    for text in overrides:
        args += ["--set", text]
    for key, value in point.overrides.items():
        args += ["--set", f"{key}={dump_value(value)}"]
    args += ["--output-dir", str(run_dir), "--shared", str(shared)]
    return shlex.join(args)


def write_index(directory: Path, recipe: Path, plist: list[Point]) -> None:
    """``sweep.json``: the points, their axes and directories (what ``parpkit report`` labels them by)."""
    rows = [{"name": p.name, "axes": {a: v for a, v in p.axes}, "overrides": p.overrides} for p in plist]
    text = json.dumps({"recipe": str(recipe), "points": rows}, indent=1, default=str)
    index = directory / "sweep.json"
    if index.is_file() and index.read_text() == text:
        return  # unchanged: a finished sweep on a read-only mount reruns (and reports its points complete)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(index, text)  # a report read while a sweep starts sees the old index or the new, never half
