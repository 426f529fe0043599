"""A whole run of the tiny whisper through the CLI: the run directory and what other tools read of it."""

import csv
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from parpkit.cli import main
from tests.conftest import requires_offline

pytestmark = requires_offline


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tests.conftest import tiny_recipe, write_recipe

    tmp = tmp_path_factory.mktemp("run")
    recipe = write_recipe(tmp / "r.yaml", tiny_recipe(**{"training.max_steps": 4}))
    out = tmp / "out"
    assert main(["run", str(recipe), "--output-dir", str(out), "--quiet", "--set", "pruning.sparsity=0.4"]) == 0
    return out


def test_run_directory_holds_every_artefact(run_dir):
    for name in ("recipe.yaml", "metrics.json", "sparsity.csv", "masks.safetensors", "log.jsonl", "model/config.json",
                 "transcripts_dense.jsonl", "transcripts_after_prune.jsonl", "transcripts_final.jsonl"):
        assert (run_dir / name).is_file(), name
    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert resolved["pruning"]["sparsity"] == 0.4  # the override, as run


def test_metrics_are_consistent_with_masks_and_csv(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    masks = load_file(str(run_dir / "masks.safetensors"))
    rows = list(csv.DictReader((run_dir / "sparsity.csv").open()))
    n = metrics["pool_parameters"]
    assert n == sum(m.numel() for m in masks.values()) == sum(int(r["numel"]) for r in rows)
    assert metrics["pool_pruned"] == sum(int(r["zeros"]) for r in rows)
    assert int(sum((~m).sum() for m in masks.values())) == round(0.4 * n)
    assert abs(metrics["pool_pruned"] - round(0.4 * n)) <= 1
    assert set(metrics["stages"]) == {"dense", "after_prune", "final"}
    for stage in metrics["stages"].values():
        assert stage["wer"] >= 0 and stage["cer"] >= 0
    # random initialisation leaves the biases at zero; nothing else in the dense pool is
    biases = sum(int(r["numel"]) for r in rows if r["name"].endswith(".bias"))
    assert metrics["stages"]["dense"]["pool_sparsity"] == pytest.approx(biases / n)
    assert metrics["stages"]["after_prune"]["pool_sparsity"] == pytest.approx(0.4, abs=1 / n)
    assert metrics["steps"] == 4
    log = [json.loads(line) for line in (run_dir / "log.jsonl").open()]
    events = [e["event"] for e in log]
    assert events.count("evaluate") == 3 and "train" in events and events[-1] == "done"
    # where it ran, for numbers that differ between machines: this process's versions and CPU kernels
    env = metrics["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]
    assert events[0] == "environment" and {k: v for k, v in log[0].items() if k not in ("event", "time_s")} == env


def test_saved_model_loads_with_plain_transformers_and_holds_the_zeros(run_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(run_dir / "model")
    processor = WhisperProcessor.from_pretrained(run_dir / "model")
    masks = load_file(str(run_dir / "masks.safetensors"))
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name
    assert sum(int((params[n] == 0).sum()) for n in masks) == json.loads((run_dir / "metrics.json").read_text())["pool_pruned"]
    # the processor matches the (windowed) encoder: its features feed the model directly
    feats = processor(torch.zeros(16000).numpy(), sampling_rate=16000, return_tensors="pt").input_features
    assert feats.shape[-1] == 2 * model.config.max_source_positions
    out = model.generate(input_features=feats, max_new_tokens=4)
    assert out.shape[0] == 1


def test_report_collects_runs_into_a_table_and_csv(run_dir, tmp_path, capsys):
    from parpkit.cli import main as cli

    out = tmp_path / "report.csv"
    assert cli(["report", str(run_dir.parent), "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(rows) == 1 and rows[0]["run"] == str(run_dir)
    assert float(rows[0]["wer"]) == metrics["stages"]["final"]["wer"]
    assert float(rows[0]["target_sparsity"]) == 0.4 and rows[0]["schedule"] == "parp"
    assert "final error rates against sparsity" in capsys.readouterr().out
    assert cli(["report", str(tmp_path / "nothing-here")]) == 2


def test_report_to_tensorboard_writes_event_files_in_the_run_directory(tmp_path):
    from tests.conftest import tiny_recipe, write_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.max_steps": 2, "training.logging_steps": 1,
                                                            "training.report_to": "tensorboard"}))
    assert main(["run", str(path), "--output-dir", str(tmp_path / "out"), "--quiet"]) == 0
    events = list((tmp_path / "out" / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert len(events) == 1
    assert b"train/loss" in events[0].read_bytes()  # the scalar the Trainer logs at every step
    assert not list((tmp_path / "out" / "checkpoints").rglob("events.out.tfevents.*"))
