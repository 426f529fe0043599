"""The status table of this grid's README while it runs: one row per finished point, from its run directory.

    .venv/bin/python results/grid_v3_tiny_en/status.py [RUNS_DIR]     (default: the points kept under results/grid_v3_tiny_en/runs)

WER per split is the final stage's in ``metrics.json``; "re-prunes" counts the log's ``prune`` events after the
first mask (the one before scoring included), "weights regrown" sums what they let back; "mask IoU with first" is
``metrics.json``'s ``mask_iou_initial``; "machine" the one the point ran on (the CPU kernels torch chose and its
thread count: ``parpkit.report.machine_of``). Read by
tests/test_readme_results.py, which checks the README's table against it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from parpkit.report import machine_of, prune_events  # the report's readings: the machine, one event per re-prune

HERE = Path(__file__).resolve().parent
SPLITS = ("test", "ood", "ood_flite", "real", "real_disfluent")
POINTS = 26  # recipes/grid_v3_tiny_en.yaml's sweep


def rows(runs: Path) -> list[list[str]]:
    out = []
    for run in sorted(p for p in runs.iterdir() if (p / "metrics.json").is_file()):
        metrics = json.loads((run / "metrics.json").read_text())
        wer = metrics["stages"]["final"]["splits"]
        later = [e for e in prune_events(run) if e.get("regrown") is not None]  # once each, a resumed run's too
        iou = metrics.get("mask_iou_initial")
        out.append([run.name, *(f"{wer[s]['wer']:.3f}" for s in SPLITS), str(len(later)),
                    str(sum(e["regrown"] for e in later)), "" if iou is None else f"{iou:.1f}" if iou == 1 else f"{iou:.6f}",
                    machine_of(metrics.get("environment")) or ""])
    return out


def table(runs: Path) -> str:
    header = ["point", *(f"WER {s}" if s == "test" else s for s in SPLITS), "re-prunes", "weights regrown",
              "mask IoU with first", "machine"]
    found = rows(runs)
    lines = [f"{len(found)} of {POINTS} points finished", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in found]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "runs"))
