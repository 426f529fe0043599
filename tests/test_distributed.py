"""The same recipe under torchrun: two CPU processes (gloo DDP), one run directory."""

import json
import os
import socket
import subprocess
import sys

from safetensors.torch import load_file

from tests.conftest import requires_offline, tiny_recipe, write_recipe

pytestmark = requires_offline


def test_two_processes_under_torchrun(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(**{"training.max_steps": 4, "training.batch_size": 2,
                                                            "training.save_steps": 2, "training.logging_steps": 1}))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port on the loopback for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                           "--master-port", port,
                           "-m", "parpkit.cli", "run", str(path), "--output-dir", str(out), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert metrics["batch"] == {"per_device": 2, "accumulation": 1, "devices": 2, "global": 4}  # batch_size is per device
    events = [json.loads(line) for line in (out / "log.jsonl").open()]
    train = [e for e in events if e["event"] == "train" and "loss" in e]
    assert [e["step"] for e in train] == [1, 2, 3, 4]  # logged once, by rank 0
    assert train[0]["epoch"] == 0.5  # 8 utterances, 2 ranks x batch 2: an epoch is 2 steps, so data was sharded
    masks = load_file(str(out / "masks.safetensors"))
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * metrics["pool_parameters"])
    assert proc.stdout.count("after first prune") == 1  # one results table, from rank 0
