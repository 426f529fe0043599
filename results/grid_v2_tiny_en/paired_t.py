"""Paired t-intervals over seeds for grid_v2's compare table, from the per-seed WERs in table.csv.

grid_v2's run directories (and so their transcripts) are no longer kept, so `parpkit report --compare` cannot
be rerun on them; its t-interval columns use only each seed's WER, which table.csv holds. For every row of
compare.csv (columns named as `parpkit report --compare` names them, so the README checker reads them):
the per-seed differences A − B over the seeds both ran, their 95% paired t-interval and two-sided p
(parpkit.stats.paired_t_interval), and that p Holm-adjusted over the rows that have one (parpkit.stats.holm;
the 0.9 sanity row has one seed and no interval).

    python results/grid_v2_tiny_en/paired_t.py      # writes results/grid_v2_tiny_en/paired_t_compare.csv
"""

import csv
from pathlib import Path

from parpkit.stats import holm, paired_t_interval

HERE = Path(__file__).parent

wer = {}
with (HERE / "table.csv").open() as f:
    for row in csv.DictReader(f):
        for split in ("test", "ood", "ood_flite"):
            wer[(row["method"], float(row["target_sparsity"]), split, int(row["seed"]))] = float(row[f"wer_{split}"])

rows = []
with (HERE / "compare.csv").open() as f:
    for c in csv.DictReader(f):
        key = (float(c["sparsity"]), c["split"])
        seeds = sorted(s for (m, sp, split, s) in wer if (m, sp, split) == (c["a"], *key) and (c["b"], *key, s) in wer)
        diffs = [wer[(c["a"], *key, s)] - wer[(c["b"], *key, s)] for s in seeds]
        t = paired_t_interval(diffs) if len(diffs) >= 2 else {}  # one seed (the 0.9 sanity row): no interval
        rows.append({"a": c["a"], "b": c["b"], "sparsity": c["sparsity"], "split": c["split"], "t_seeds": len(seeds),
                     "difference": round(sum(diffs) / len(diffs), 4),
                     **{k: round(t[v], 4) if t else None for k, v in (("t_low", "low"), ("t_high", "high"), ("t_p", "p"))},
                     "level": c["level"]})
tested = sum(r["t_p"] is not None for r in rows)
for row, p in zip(rows, holm([r["t_p"] for r in rows])):
    row["t_p_holm"] = None if p is None else round(p, 4)
    row["comparisons"] = tested

with (HERE / "paired_t_compare.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
print(f"{len(rows)} rows -> {HERE / 'paired_t_compare.csv'}")
