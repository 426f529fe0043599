"""The run directory: what a run writes for people and other tools, and the rules for reusing one."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from parpkit.errors import ParpkitError


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so that readers see the old file or the new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class JsonlLog:
    """One JSON object per line; only the main process writes."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.start = time.time()

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        row = {"event": event, "time_s": round(time.time() - self.start, 3), **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class RunDir:
    """``recipe.yaml``, ``metrics.json``, ``log.jsonl``, ``sparsity.csv``, masks, transcripts, ``model/`` and
    ``checkpoints/``. A directory holds one recipe: another recipe is refused, a finished run is not redone."""

    def __init__(self, path: Path, recipe_text: str, main: bool = True):
        self.path, self.recipe_text, self.main = Path(path), recipe_text, main
        self.checkpoints = self.path / "checkpoints"
        self.log = JsonlLog(self.path / "log.jsonl", enabled=main)

    def finished_metrics(self) -> dict | None:
        path = self.path / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else None

    def claim(self, fresh: bool) -> None:
        """Make the directory this recipe's: with ``fresh`` discard what is there; otherwise refuse a
        directory that holds another recipe."""
        recipe = self.path / "recipe.yaml"
        if fresh and self.main:
            for stale in ("metrics.json", "log.jsonl", "recipe.yaml"):
                (self.path / stale).unlink(missing_ok=True)
            shutil.rmtree(self.checkpoints, ignore_errors=True)
        elif not fresh and recipe.exists() and recipe.read_text() != self.recipe_text:
            raise ParpkitError(f"{self.path} holds a run of a different recipe; pass --fresh to start it over, or "
                               "--output-dir for a new directory")

    def write_recipe(self) -> None:
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "recipe.yaml").write_text(self.recipe_text)

    def write_sparsity(self, rows: list[dict]) -> None:
        with (self.path / "sparsity.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    def write_metrics(self, metrics: dict) -> None:
        atomic_write(self.path / "metrics.json", json.dumps(metrics, indent=2))
