"""Every results table the README or a documentation page (``docs/**/*.md``) marks as checked equals the
committed CSV it names, cell by cell, wherever the table has moved.

A checked table follows a line ``<!-- checked: results/NAME/table.csv -->`` (or ``…/compare.csv``). In a
``table.csv`` table the first column names the CSV's ``method`` (``tiny.en zero-shot`` is the pretrained
model's scores, the CSV's ``dense_`` columns); with a ``sparsity`` column the row is that method at that
sparsity, its seeds averaged. In a ``compare.csv`` table (``parpkit report --compare``) the columns ``A``,
``B``, ``sparsity`` and ``split`` name the pair. Every other column must be one this test knows how to
compute from the CSV, so no number in such a table can drift from the measurements."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- checked: (\S+) -->")
#: the committed CSVs whose tables the README and the results pages quote: each must stay checked somewhere
QUOTED = (
    "results/compress_tiny_en/table.csv", "results/compress_v2_tiny_en/table.csv", "results/compress_v3_tiny_en/table.csv",
    "results/grid_v2_tiny_en/table.csv", "results/grid_v2_tiny_en/compare.csv",
    "results/zero_shot_native_v021/table.csv", "results/quickstart_tiny_en/table.csv",
    "results/grid_v3_tiny_en/interim_3_seeds/compare.csv",
)


def documents() -> list[Path]:
    """Where checked tables may be: the README, every page of the documentation site, and the results' READMEs."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "results").glob("*/README.md"))]
ZERO_SHOT = "tiny.en zero-shot"
PAIR_KEYS = ("A", "B", "sparsity", "split")


def _tables(text: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(csv path, header, rows) of every checked table."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = MARK.search(line)
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("|"):
            j += 1
        block = []
        while j < len(lines) and lines[j].startswith("|"):
            block.append([c.strip() for c in lines[j].strip().strip("|").split("|")])
            j += 1
        assert len(block) > 2, f"line {i + 1}: a checked table must follow the mark"
        out.append((m.group(1), block[0], block[2:]))
    return out


def _mean(rows: list[dict], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows)


def expected(header: str, rows: dict | list[dict], zero_shot: bool) -> str:
    """The cell a column holds for CSV rows (one run, or the seeds of one method and sparsity, averaged),
    formatted as the checked tables write it."""
    rows = [rows] if isinstance(rows, dict) else rows

    def rate(split: str) -> float:
        return _mean(rows, f"dense_wer_{split}" if zero_shot else f"wer_{split}")

    if m := re.fullmatch(r"WER (\S+)", header):
        return f"{rate(m.group(1)):.3f}"
    if m := re.fullmatch(r"× zero-shot (\S+)", header):
        return f"{rate(m.group(1)) / _mean(rows, f'dense_wer_{m.group(1)}'):.2f}"
    if header == "sparsity":
        return "0" if zero_shot else f"{float(rows[0]['target_sparsity']):g}"
    if header == "seeds":
        return str(len(rows))
    if header == "mask IoU with first":  # blank where there is no first mask (zero-shot, OMP's comes after training)
        return "" if zero_shot or any(not r["mask_iou_initial"] for r in rows) else f"{_mean(rows, 'mask_iou_initial'):.3f}"
    if header == "non-zero parameters":
        value = _mean(rows, "model_parameters") if zero_shot else _mean(rows, "nonzero_parameters")
        return f"{value / 1e6:.2f}M"
    if header == "training steps":
        return "0" if zero_shot else rows[0]["steps"]
    raise AssertionError(f"a checked table has a column this test cannot check: {header!r}")


def expected_pair(header: str, row: dict) -> str:
    """The cell a column of a compare table holds for a compare.csv row."""
    if header == "A − B":
        return f"{float(row['difference']):+.3f}"
    if header == f"{float(row['level']):.0%} interval":
        return f"[{float(row['low']):+.3f}, {float(row['high']):+.3f}]"
    if header == "P(A worse)":
        return f"{float(row['p_a_worse']):.2f}"
    if header == f"{float(row['level']):.0%} interval, seeds too":
        return f"[{float(row['seed_low']):+.3f}, {float(row['seed_high']):+.3f}]" if row["seed_low"] else "—"
    if header == "P(A worse), seeds too":
        return f"{float(row['seed_p_a_worse']):.2f}" if row["seed_p_a_worse"] else "—"
    level = f"{float(row['level']):.0%}"
    if header == f"{level} t-interval, paired seeds":  # blank under two paired seeds
        return f"[{float(row['t_low']):+.3f}, {float(row['t_high']):+.3f}]" if row.get("t_low") else "—"
    if header == f"{level} interval, speakers":  # blank under two speakers, or without speakers in the transcripts
        return f"[{float(row['speaker_low']):+.3f}, {float(row['speaker_high']):+.3f}]" if row.get("speaker_low") else "—"
    holm = {"Holm p (utterances)": "p_holm", "Holm p (t)": "t_p_holm", "Holm p (speakers)": "speaker_p_holm"}
    if header in holm:
        if not row.get(holm[header]):
            return "—"
        return "<0.001" if float(row[holm[header]]) < 0.001 else f"{float(row[holm[header]]):.3f}"
    if header in ("paired seeds", "speakers", "comparisons"):
        return row.get({"paired seeds": "t_seeds"}.get(header, header)) or "—"
    if header in ("seeds A", "seeds B"):
        return row["seeds_" + header[-1].lower()]
    if header == "utterances":
        return row["utterances"]
    raise AssertionError(f"a checked compare table has a column this test cannot check: {header!r}")


def _check_table(path: str, header: list[str], cells: list[str], rows: list[dict]) -> None:
    label = cells[0]
    zero_shot = label == ZERO_SHOT
    if zero_shot:
        matched = rows[:1]
    else:
        matched = [r for r in rows if r["method"] == label]
        if "sparsity" in header:
            sparsity = cells[header.index("sparsity")]
            matched = [r for r in matched if f"{float(r['target_sparsity']):g}" == sparsity]
        elif len(matched) > 1:
            raise AssertionError(f"{path}: {len(matched)} rows with method {label!r}: give the table a sparsity column")
    assert matched, f"{path}: no row with method {label!r} (methods: {sorted({r['method'] for r in rows})})"
    for head, cell in zip(header[1:], cells[1:], strict=True):
        assert cell == expected(head, matched, zero_shot), f"{path}, {label}, {head}: the table says {cell!r}"


def _check_pairs(path: str, header: list[str], cells: list[str], rows: list[dict]) -> None:
    missing = [k for k in PAIR_KEYS if k not in header]
    assert not missing, f"{path}: a checked compare table needs the columns {', '.join(PAIR_KEYS)}"
    key = {k: cells[header.index(k)] for k in PAIR_KEYS}
    matched = [r for r in rows if (r["a"], r["b"], f"{float(r['sparsity']):g}", r["split"]) == tuple(key.values())]
    assert len(matched) == 1, f"{path}: no single pair {key}"
    for head, cell in zip(header, cells, strict=True):
        if head not in PAIR_KEYS:
            assert cell == expected_pair(head, matched[0]), f"{path}, {key}, {head}: the table says {cell!r}"


def test_checked_tables_equal_their_committed_csv_in_the_readme_and_the_docs():
    checked = []
    for doc in documents():
        for path, header, cells_rows in _tables(doc.read_text()):
            with (ROOT / path).open(newline="") as f:
                rows = list(csv.DictReader(f))
            check = _check_pairs if path.endswith("compare.csv") else _check_table
            for cells in cells_rows:
                try:
                    check(path, header, cells, rows)
                except AssertionError as exc:
                    raise AssertionError(f"{doc.relative_to(ROOT)}: {exc}") from None
            checked.append(path)
    missing = [path for path in QUOTED if path not in checked]
    assert not missing, f"no checked table quotes {missing} any more: keep the <!-- checked: … --> mark with the table"


def test_the_checker_catches_a_drifted_cell(tmp_path):
    row = {"method": "m", "wer_test": "0.5019", "dense_wer_test": "0.25", "target_sparsity": "0.5",
           "nonzero_parameters": "29118527", "model_parameters": "37376256", "steps": "150"}
    assert expected("WER test", row, False) == "0.502" and expected("× zero-shot test", row, False) == "2.01"
    assert expected("WER test", row, True) == "0.250" and expected("× zero-shot test", row, True) == "1.00"
    assert expected("non-zero parameters", row, False) == "29.12M" and expected("non-zero parameters", row, True) == "37.38M"
    assert expected("mask IoU with first", {**row, "mask_iou_initial": "0.99996"}, False) == "1.000"
    assert expected("mask IoU with first", {**row, "mask_iou_initial": ""}, False) == ""  # OMP: no mask before training
    tables = _tables("text\n<!-- checked: x.csv -->\n\n| point | WER test |\n|---|---|\n| m | 0.501 |\n")
    assert tables == [("x.csv", ["point", "WER test"], [["m", "0.501"]])]
    assert tables[0][2][0][1] != expected("WER test", row, False)  # 0.501 against the CSV's 0.502: a failure
    with pytest.raises(AssertionError, match="cannot check: 'speed'"):
        expected("speed", row, False)


def test_seeds_are_averaged_per_sparsity_and_pairs_are_checked_by_their_keys():
    rows = [{"method": "parp", "target_sparsity": "0.5", "wer_test": "0.20", "mask_iou_initial": "0.9", "steps": "300"},
            {"method": "parp", "target_sparsity": "0.5", "wer_test": "0.30", "mask_iou_initial": "0.8", "steps": "300"},
            {"method": "parp", "target_sparsity": "0.7", "wer_test": "0.90", "mask_iou_initial": "0.7", "steps": "300"}]
    header = ["method", "sparsity", "seeds", "WER test", "mask IoU with first"]
    _check_table("t.csv", header, ["parp", "0.5", "2", "0.250", "0.850"], rows)
    _check_table("t.csv", header, ["parp", "0.7", "1", "0.900", "0.700"], rows)
    with pytest.raises(AssertionError, match="WER test"):
        _check_table("t.csv", header, ["parp", "0.5", "2", "0.200", "0.850"], rows)  # one seed's value, not the mean
    with pytest.raises(AssertionError, match="give the table a sparsity column"):
        _check_table("t.csv", ["method", "WER test"], ["parp", "0.250"], rows)
    pairs = [{"a": "parp", "b": "fixed", "sparsity": "0.5", "split": s, "seeds_a": "3", "seeds_b": "3", "difference": d,
              "low": lo, "high": hi, "p_a_worse": p, "utterances": "120", "resamples": "2000", "level": "0.95"}
             for s, d, lo, hi, p in (("test", "-0.0213", "-0.0391", "-0.0044", "0.006"), ("ood", "0.0102", "-0.02", "0.04", "0.74"))]
    header = ["A", "B", "sparsity", "split", "A − B", "95% interval", "P(A worse)", "seeds A"]
    _check_pairs("c.csv", header, ["parp", "fixed", "0.5", "test", "-0.021", "[-0.039, -0.004]", "0.01", "3"], pairs)
    with pytest.raises(AssertionError, match="95% interval"):
        _check_pairs("c.csv", header, ["parp", "fixed", "0.5", "ood", "+0.010", "[-0.020, +0.050]", "0.74", "3"], pairs)
    with pytest.raises(AssertionError, match="no single pair"):
        _check_pairs("c.csv", header, ["parp", "fixed", "0.7", "ood", "+0.010", "[-0.020, +0.040]", "0.74", "3"], pairs)
    pairs[0].update(seed_low="-0.0612", seed_high="0.0158", seed_p_a_worse="0.151")
    pairs[1].update(seed_low="", seed_high="", seed_p_a_worse="")  # one method had a single seed
    header = ["A", "B", "sparsity", "split", "95% interval, seeds too", "P(A worse), seeds too"]
    _check_pairs("c.csv", header, ["parp", "fixed", "0.5", "test", "[-0.061, +0.016]", "0.15"], pairs)
    _check_pairs("c.csv", header, ["parp", "fixed", "0.5", "ood", "—", "—"], pairs)
    with pytest.raises(AssertionError, match="seeds too"):  # the utterances' interval where the seeds' one belongs
        _check_pairs("c.csv", header, ["parp", "fixed", "0.5", "test", "[-0.039, -0.004]", "0.15"], pairs)
    # the paired t-interval, the speaker bootstrap and the Holm-adjusted p of parpkit report --compare
    pairs[0].update(t_seeds="3", t_low="-0.0654", t_high="0.0228", t_p_holm="0.4", speakers="8", speaker_low="-0.0512",
                    speaker_high="0.0083", speaker_p_holm="0.39", p_holm="0.0004", comparisons="2")
    pairs[1].update(t_seeds="1", t_low="", t_high="", t_p_holm="", speakers="1", speaker_low="", speaker_high="",
                    speaker_p_holm="", p_holm="0.52", comparisons="2")
    header = ["A", "B", "sparsity", "split", "95% t-interval, paired seeds", "paired seeds", "Holm p (t)",
              "95% interval, speakers", "speakers", "Holm p (speakers)", "Holm p (utterances)", "comparisons"]
    _check_pairs("c.csv", header, ["parp", "fixed", "0.5", "test", "[-0.065, +0.023]", "3", "0.400", "[-0.051, +0.008]", "8",
                                   "0.390", "<0.001", "2"], pairs)
    _check_pairs("c.csv", header, ["parp", "fixed", "0.5", "ood", "—", "1", "—", "—", "1", "—", "0.520", "2"], pairs)
    with pytest.raises(AssertionError, match="Holm p"):  # the unadjusted p where the adjusted one belongs
        _check_pairs("c.csv", header, ["parp", "fixed", "0.5", "ood", "—", "1", "—", "—", "1", "—", "0.260", "2"], pairs)


def test_grid_v3s_status_table_is_its_kept_points_as_they_finished():
    """While grid_v3 runs, its README lists the finished points kept under its runs/; the table is
    results/grid_v3_tiny_en/status.py's output, so a point kept without its row (or a row edited) fails."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("grid_v3_status", ROOT / "results" / "grid_v3_tiny_en" / "status.py")
    status = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(status)
    readme = (ROOT / "results" / "grid_v3_tiny_en" / "README.md").read_text()
    table = status.table(ROOT / "results" / "grid_v3_tiny_en" / "runs")
    assert table.splitlines()[4].startswith("| method-")  # it read runs, not an empty folder
    assert table in readme, "results/grid_v3_tiny_en/README.md: replace its status block with status.py's output"
