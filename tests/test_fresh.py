"""Issue 33, data loss: a fresh start removes only what a run wrote, never what the recipe reads, and all or
nothing."""

from __future__ import annotations

import json
import shutil

import pytest

from parpkit.cli import main
from parpkit.engine import rundir as rundir_module
from parpkit.engine.rundir import RunDir

CLEARING = ".parpkit-clearing"  # where a clearing moves a run's outputs before deleting them
from tests.conftest import requires_offline, tiny_recipe, write_recipe


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@requires_offline
@pytest.mark.parametrize("fresh", [True, False])
def test_a_folder_no_run_wrote_is_refused_and_its_files_stay(tmp_path, capsys, fresh):
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "checkpoints").mkdir()
    (mine / "model" / "pytorch_model.bin").write_bytes(b"my weights")
    (mine / "checkpoints" / "a.pt").write_bytes(b"my checkpoint")
    (mine / "notes.txt").write_text("mine")
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.max_steps": 1}))
    assert main(["run", str(path), "--output-dir", str(mine), "--quiet", *(["--fresh"] if fresh else [])]) == 2
    err = _err(capsys)
    assert f"{mine} is not a parpkit run directory" in err and "model/pytorch_model.bin" in err
    assert "checkpoints/a.pt" in err and "--output-dir with a folder of its own" in err
    assert _files(mine) == ["checkpoints/a.pt", "model/pytorch_model.bin", "notes.txt"]  # not even a .lock
    assert (mine / "model" / "pytorch_model.bin").read_bytes() == b"my weights"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run with its checkpoints kept."""
    if not __import__("tests.conftest", fromlist=["OFFLINE"]).OFFLINE:
        pytest.skip("needs the offline extra")
    tmp = tmp_path_factory.mktemp("finished")
    path = write_recipe(tmp / "r.yaml", tiny_recipe(**{"training.max_steps": 2, "training.save_steps": 1,
                                                       "training.keep_checkpoints_when_done": True}))
    assert main(["run", str(path), "--output-dir", str(tmp / "out"), "--quiet"]) == 0
    return path, tmp / "out"


@requires_offline
@pytest.mark.parametrize("setting", ["pruning.mask_from={out}", "distillation.teacher={out}/model", "pruning.mask_from={out}/masks.safetensors"])
def test_fresh_refuses_before_removing_a_donor_the_recipe_reads(finished, tmp_path, capsys, setting):
    path, out = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = _files(copy)
    change = setting.format(out=copy)
    assert main(["run", str(path), "--output-dir", str(copy), "--quiet", "--fresh", "--set", change]) == 2
    err = _err(capsys)
    key = change.split("=")[0]
    assert f"{key}: '{change.split('=', 1)[1]}' lies in the run directory {copy}" in err and "nothing was removed" in err
    assert _files(copy) == before


def test_a_clearing_killed_half_way_is_finished_by_the_next_start(tmp_path, monkeypatch):
    out = tmp_path / "out"
    text = "name: a\n"
    for name in ("metrics.json", "masks.safetensors", "masks_initial.safetensors", "sparsity.csv", "recipe.yaml"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text if name == "recipe.yaml" else "{}")
    (out / "checkpoints" / "phase-0" / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoints" / "phase-0" / "checkpoint-1" / "COMPLETE").write_text("ok")
    (out / "log.jsonl").write_text(json.dumps({"event": "data"}) + "\n")
    (out / "notes.txt").write_text("a user's file beside the run")
    calls = {"n": 0}
    real_rmtree = shutil.rmtree

    def killed(path, *a, **k):  # the process dies while deleting (SIGKILL: nothing after it runs)
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        RunDir(out, text).clear()
    assert calls["n"] == 1
    monkeypatch.setattr(rundir_module.shutil, "rmtree", real_rmtree)
    assert not (out / "metrics.json").exists()  # no longer a finished run ...
    assert RunDir(out, text).complete_run() is None
    again = RunDir(out, text)  # ... and the next start, even a plain one of the same recipe, finishes the clearing
    again.acquire()
    try:
        again.claim(fresh=False)
    finally:
        again.release()
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt"]
    assert not (out / CLEARING).exists()


def test_a_clearing_killed_between_moves_leaves_nothing_of_the_earlier_run_once_restarted(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("metrics.json", "masks.safetensors", "sparsity.csv", "transcripts_final.jsonl"):
        (out / name).write_text("{}")
    (out / "recipe.yaml").write_text("name: a\n")
    (out / "log.jsonl").write_text(json.dumps({"event": "data"}) + "\n")
    real = rundir_module.os.replace
    moved = []

    def replace(a, b):
        if len(moved) == 2:
            raise KeyboardInterrupt
        moved.append(a)
        real(a, b)

    monkeypatch.setattr(rundir_module.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        RunDir(out, "name: a\n").clear()
    monkeypatch.setattr(rundir_module.os, "replace", real)
    assert (out / "masks.safetensors").exists() and not (out / "metrics.json").exists()
    again = RunDir(out, "name: a\n")
    again.claim(fresh=False)
    assert sorted(p.name for p in out.iterdir()) == []
