"""Sweep launchers: the points of a sweep as Ray tasks and as Slurm jobs (submitit's local executor), with
what the in-process sweep promises: finished points skipped, a killed point resumed, the same report."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil

import pytest

from parpkit.cli import main
from tests.conftest import requires_offline, run_and_kill, tiny_recipe, write_recipe

pytestmark = requires_offline

HAS_RAY = importlib.util.find_spec("ray") is not None
HAS_SUBMITIT = importlib.util.find_spec("submitit") is not None
POINTS = ["sparsity-0.3", "sparsity-0.5", "sparsity-0.7"]


def _recipe(tmp_path):
    recipe = tiny_recipe(**{"training.max_steps": 2, "training.save_steps": 1, "pruning.schedule": {"name": "fixed"}})
    recipe["sweep"] = {"grids": [{"pruning.sparsity": [0.3, 0.5, 0.7]}]}
    return write_recipe(tmp_path / "sweep.yaml", recipe)


def _table(sweep_dir):
    assert main(["report", str(sweep_dir)]) == 0
    with (sweep_dir / "report" / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    keys = sorted(k for k in rows[0] if k.startswith("wer") or "sparsity" in k)
    assert any(k.startswith("wer") for k in keys) and any("sparsity" in k for k in keys)
    return sorted(tuple(row[k] for k in keys) for row in rows)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The same sweep run in process: the reference table."""
    tmp = tmp_path_factory.mktemp("plain")
    out = tmp / "grid"
    assert main(["sweep", str(_recipe(tmp)), "--output-dir", str(out), "--quiet"]) == 0
    return _table(out)


def _kill_one_and_rerun(tmp_path, path, out, launcher_args, capsys):
    """Make one point a killed run (a checkpoint, no metrics.json), rerun the sweep through the launcher:
    only that point runs, the others are skipped."""
    killed = out / POINTS[1]
    point_recipe = tmp_path / "point.yaml"
    shutil.copy(killed / "recipe.yaml", point_recipe)
    shutil.rmtree(killed)
    run_and_kill(point_recipe, killed)
    stamps = {p: (out / p / "metrics.json").stat().st_mtime_ns for p in (POINTS[0], POINTS[2])}
    capsys.readouterr()
    assert main(["sweep", str(path), "--output-dir", str(out), "--quiet", *launcher_args]) == 0
    assert "3 of 3 points finished" in capsys.readouterr().out
    assert {p: (out / p / "metrics.json").stat().st_mtime_ns for p in stamps} == stamps  # not run again
    log = [json.loads(line) for line in (killed / "log.jsonl").open()]
    assert any(e.get("event") == "resume" for e in log), [e.get("event") for e in log]
    assert (killed / "metrics.json").exists()


def _sweep_kill_rerun_report(tmp_path, plain, launcher_args, capsys, monkeypatch):
    import parpkit.launchers

    ran = []  # (point, pid of the process that ran it)
    launch = parpkit.launchers.launch

    def recording(launcher, jobs, resources, quiet, started, report):
        launch(launcher, jobs, resources, quiet, started, lambda job, outcome: (ran.append((job.name, outcome.pid)), report(job, outcome)))

    monkeypatch.setattr(parpkit.launchers, "launch", recording)
    path = _recipe(tmp_path)
    out = tmp_path / "grid"
    assert main(["sweep", str(path), "--output-dir", str(out), "--quiet", *launcher_args]) == 0
    assert sorted(name for name, _ in ran) == POINTS
    assert all(pid not in (0, os.getpid()) for _, pid in ran)  # each point ran in a worker, not in the sweep's process
    assert sorted(p.name for p in out.iterdir() if (p / "metrics.json").exists()) == POINTS
    assert _table(out) == plain
    _kill_one_and_rerun(tmp_path, path, out, launcher_args, capsys)
    assert _table(out) == plain
    # a point that fails (its folder holds a recipe.yaml no run wrote) is named, and the sweep exits 3 (failed)
    other = tmp_path / "other"
    (other / POINTS[1]).mkdir(parents=True)
    (other / POINTS[1] / "recipe.yaml").write_text("name: mine\n")
    capsys.readouterr()
    assert main(["sweep", str(path), "--output-dir", str(other), "--quiet", "--only", POINTS[1], *launcher_args]) == 3
    err = " ".join(capsys.readouterr().err.split())
    assert f"point {POINTS[1]} failed: " in err and "was not written by a parpkit run" in err
    assert f"1 sweep point(s) failed: {POINTS[1]}" in err


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RAY, reason="needs ray (pip install 'parpkit[ray]' or the test extra)")
def test_ray_launcher_runs_skips_resumes_and_reports_like_the_plain_sweep(tmp_path, plain, capsys, monkeypatch):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        _sweep_kill_rerun_report(tmp_path, plain, ["--launcher", "ray", "--cpus-per-point", "1"], capsys, monkeypatch)
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SUBMITIT, reason="needs submitit (pip install 'parpkit[slurm]')")
def test_slurm_launcher_runs_skips_resumes_and_reports_like_the_plain_sweep(tmp_path, plain, capsys, monkeypatch):
    _sweep_kill_rerun_report(tmp_path, plain, ["--launcher", "slurm", "--slurm-local", "--max-parallel", "2"], capsys, monkeypatch)
    assert any((tmp_path / "grid" / "submitit").iterdir())  # the jobs' logs


def test_a_launcher_without_its_extra_names_it_before_anything_runs(tmp_path, capsys, monkeypatch):
    import sys

    path = _recipe(tmp_path)
    for launcher, extra in (("ray", "ray"), ("slurm", "slurm")):
        monkeypatch.setitem(sys.modules, "ray" if launcher == "ray" else "submitit", None)  # import fails
        assert main(["sweep", str(path), "--output-dir", str(tmp_path / "grid"), "--launcher", launcher]) == 2
        assert f"pip install 'parpkit[{extra}]'" in capsys.readouterr().err
        assert not (tmp_path / "grid").exists()


@pytest.mark.skipif(not HAS_SUBMITIT, reason="needs submitit (pip install 'parpkit[slurm]')")
def test_slurm_launcher_without_slurm_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no srun
    path = _recipe(tmp_path)
    assert main(["sweep", str(path), "--output-dir", str(tmp_path / "grid"), "--launcher", "slurm", "--quiet"]) == 2
    assert "found no Slurm here" in capsys.readouterr().err
    assert not any((tmp_path / "grid").glob("sparsity-*"))


@pytest.mark.parametrize(("flags", "message"), [(["--address", "auto"], "--address is for --launcher ray, not local"),
                                                (["--launcher", "ray", "--partition", "gpu"], "--partition is for --launcher slurm, not ray"),
                                                (["--launcher", "slurm", "--max-parallel", "0"], "--max-parallel must be positive"),
                                                (["--launcher", "slurm", "--gpus-per-point", "0.5"], "must be a whole number for Slurm")])
def test_a_flag_the_launcher_would_ignore_is_refused(tmp_path, capsys, flags, message):
    path = _recipe(tmp_path)
    assert main(["sweep", str(path), "--output-dir", str(tmp_path / "grid"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()
