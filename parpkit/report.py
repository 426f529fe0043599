"""Collect finished runs into one table (WER against sparsity, method by method), as rows other tools read."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from parpkit.errors import ParpkitError

COLUMNS = ["run", "backbone", "dataset", "criterion", "schedule", "scope", "target_sparsity", "pool_sparsity",
           "model_sparsity", "wer", "cer", "per", "dense_wer", "dense_cer", "dense_per", "steps", "wall_time_s"]


def collect(paths: list[Path]) -> list[dict]:
    """One row per run directory holding a metrics.json (folders of runs are searched one level down)."""
    found: list[Path] = []
    for p in paths:
        if (p / "metrics.json").is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(c for c in p.iterdir() if (c / "metrics.json").is_file())
    if not found:
        raise ParpkitError(f"no finished runs (metrics.json) in {', '.join(map(str, paths))}")
    rows = []
    for run_dir in found:
        m = json.loads((run_dir / "metrics.json").read_text())
        final, dense = m["stages"].get("final", {}), m["stages"].get("dense", {})
        rows.append({"run": str(run_dir), **{k: m["plugins"][k] for k in ("backbone", "dataset", "criterion", "schedule")},
                     "scope": m.get("scope"), "target_sparsity": m["target_sparsity"],
                     "pool_sparsity": final.get("pool_sparsity"), "model_sparsity": final.get("model_sparsity"),
                     "wer": final.get("wer"), "cer": final.get("cer"), "per": final.get("per"),
                     "dense_wer": dense.get("wer"), "dense_cer": dense.get("cer"), "dense_per": dense.get("per"),
                     "steps": m["steps"], "wall_time_s": m["wall_time_s"]["total"]})
    return sorted(rows, key=lambda r: (r["backbone"], r["dataset"], r["schedule"], r["criterion"], r["target_sparsity"]))


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
