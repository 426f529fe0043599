"""Every results table the README marks as checked equals the committed table.csv it names, cell by cell.

A checked table follows a line ``<!-- checked: results/NAME/table.csv -->``. Its first column names a row of
the CSV (the ``method`` column; ``tiny.en zero-shot`` is the pretrained model's scores, the CSV's ``dense_``
columns); every other column must be one this test knows how to compute from the CSV, so no number in such
a table can drift from the measurements."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- checked: (\S+) -->")
ZERO_SHOT = "tiny.en zero-shot"


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
        assert len(block) > 2, f"README line {i + 1}: a checked table must follow the mark"
        out.append((m.group(1), block[0], block[2:]))
    return out


def expected(header: str, row: dict, zero_shot: bool) -> str:
    """The cell a column holds for a CSV row, formatted as the README writes it."""
    def rate(split: str) -> float:
        return float(row[f"dense_wer_{split}"] if zero_shot else row[f"wer_{split}"])

    if m := re.fullmatch(r"WER (\S+)", header):
        return f"{rate(m.group(1)):.3f}"
    if m := re.fullmatch(r"× zero-shot (\S+)", header):
        return f"{rate(m.group(1)) / float(row[f'dense_wer_{m.group(1)}']):.2f}"
    if header == "sparsity":
        return "0" if zero_shot else f"{float(row['target_sparsity']):g}"
    if header == "non-zero parameters":
        value = float(row["model_parameters"]) if zero_shot else float(row["nonzero_parameters"])
        return f"{value / 1e6:.2f}M"
    if header == "training steps":
        return "0" if zero_shot else row["steps"]
    raise AssertionError(f"the README's checked table has a column this test cannot check: {header!r}")


def test_checked_readme_tables_equal_their_committed_csv():
    tables = _tables((ROOT / "README.md").read_text())
    if not tables:
        pytest.skip("the README marks no checked table")
    for path, header, rows in tables:
        with (ROOT / path).open(newline="") as f:
            by_method = {r["method"]: r for r in csv.DictReader(f)}
        for cells in rows:
            label = cells[0]
            zero_shot = label == ZERO_SHOT
            row = next(iter(by_method.values())) if zero_shot else by_method.get(label)
            assert row is not None, f"{path}: no row with method {label!r} (rows: {sorted(by_method)})"
            for head, cell in zip(header[1:], cells[1:], strict=True):
                assert cell == expected(head, row, zero_shot), f"{path}, {label}, {head}: README {cell!r}"


def test_the_checker_catches_a_drifted_cell(tmp_path):
    row = {"method": "m", "wer_test": "0.5019", "dense_wer_test": "0.25", "target_sparsity": "0.5",
           "nonzero_parameters": "29118527", "model_parameters": "37376256", "steps": "150"}
    assert expected("WER test", row, False) == "0.502" and expected("× zero-shot test", row, False) == "2.01"
    assert expected("WER test", row, True) == "0.250" and expected("× zero-shot test", row, True) == "1.00"
    assert expected("non-zero parameters", row, False) == "29.12M" and expected("non-zero parameters", row, True) == "37.38M"
    tables = _tables("text\n<!-- checked: x.csv -->\n\n| point | WER test |\n|---|---|\n| m | 0.501 |\n")
    assert tables == [("x.csv", ["point", "WER test"], [["m", "0.501"]])]
    assert tables[0][2][0][1] != expected("WER test", row, False)  # 0.501 against the CSV's 0.502: a failure
    with pytest.raises(AssertionError, match="cannot check: 'speed'"):
        expected("speed", row, False)
