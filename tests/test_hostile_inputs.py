"""Issue 33: hostile inputs that were accepted silently, hung, or failed late with a traceback."""

from __future__ import annotations

import pytest

from parpkit.cli import main
from parpkit.errors import RecipeError
from parpkit.recipe import load_recipe
from tests.conftest import tiny_recipe, write_recipe


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_a_key_given_twice_on_one_line_is_refused_in_the_file_and_in_set(tmp_path, capsys):
    text = write_recipe(tmp_path / "r.yaml", tiny_recipe()).read_text()
    (tmp_path / "r.yaml").write_text(text.replace("options:\n      interval: 3", "options: {interval: 3, interval: 1}"))
    assert "{interval: 3, interval: 1}" in (tmp_path / "r.yaml").read_text()
    with pytest.raises(RecipeError, match=r"r\.yaml: not valid YAML \(line \d+, column \d+\): the key 'interval' is given twice "
                                          r"in one mapping \(first on column \d+\)"):
        load_recipe(tmp_path / "r.yaml")
    write_recipe(tmp_path / "r.yaml", tiny_recipe())
    assert main(["validate", str(tmp_path / "r.yaml"), "--set", "pruning.schedule.options={interval: 3, interval: 1}"]) == 2
    assert "the key 'interval' is given twice in one mapping" in _err(capsys)
