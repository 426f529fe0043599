"""The same recipe under torchrun: two CPU processes (gloo DDP), one run directory."""

import json
import os
import socket
import subprocess
import sys

import pytest

from safetensors.torch import load_file

from tests.conftest import requires_offline, tiny_recipe, write_recipe

pytestmark = requires_offline


@pytest.mark.slow
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


WORDS = ["one two three", "four five six", "seven eight nine", "red green blue", "cats and dogs", "up and down",
         "left or right", "north and south"]  # each 5 label tokens: every rank's mean loss weighs its tokens alike


def _equal_length_corpus(root):
    """8 training utterances whose transcripts have the same number of tokens (the decoder loss is a mean
    over a batch's tokens: with equal counts, the mean of the ranks' means is the mean over the global batch)."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(WORDS):
        sf.write(root / f"u{i}.wav", (rng.standard_normal(8000 + 1000 * i) * 0.1).astype(np.float32), 16000)
        rows.append(json.dumps({"audio": f"u{i}.wav", "text": text}))
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    (root / "test.jsonl").write_text("\n".join(rows[:2]) + "\n")
    return {"name": "manifest", "options": {"splits": {"train": str(root / "train.jsonl"), "test": str(root / "test.jsonl")}}}


def _torchrun(path, out, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
                           "127.0.0.1", "--master-port", port, "-m", "parpkit.cli", "run", str(path), "--output-dir", str(out),
                           "--quiet"], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_two_processes_give_one_process_result_with_the_same_global_batch(tmp_path):
    """gloo DDP with 2 ranks x batch 2 against one process x batch 4, PARP re-pruning twice: the same masks
    (each rank's masks are also checked equal at every prune) and the same weights to float tolerance."""
    import torch

    dataset = _equal_length_corpus(tmp_path)
    runs = {}
    for nproc, batch in ((2, 2), (1, 4)):
        recipe = tiny_recipe(**{"dataset": {**dataset, "train_split": "train", "eval_split": "test"},
                                "backbone.options.encoder_window_s": 2, "training.max_steps": 4, "training.batch_size": batch,
                                "training.save_steps": 2,
                                "training.learning_rate": 3e-3, "pruning.schedule": {"name": "parp", "options": {"interval": 2}},
                                "evaluation.dense": False, "evaluation.after_prune": False})
        path = write_recipe(tmp_path / f"r{nproc}.yaml", recipe)
        out = tmp_path / f"out{nproc}"
        proc = _torchrun(path, out, nproc)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[nproc] = out
    m2, m1 = (json.loads((runs[n] / "metrics.json").read_text()) for n in (2, 1))
    assert m2["batch"]["global"] == m1["batch"]["global"] == 4 and m2["batch"]["devices"] == 2
    assert m2["prunes"] == m1["prunes"] >= 3  # the first mask and the re-prunes
    # the training loss: each rank's mean over its micro-batches, averaged over the ranks (checkpoints at updates
    # 2 and 4 settle it on every rank): the one process's mean over the same utterances
    assert m2["train_loss_updates"] == m1["train_loss_updates"] == 4
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5)
    k2, k1 = load_file(str(runs[2] / "masks.safetensors")), load_file(str(runs[1] / "masks.safetensors"))
    assert all(torch.equal(k2[n], k1[n]) for n in k1)
    w2, w1 = (load_file(str(runs[n] / "model" / "model.safetensors")) for n in (2, 1))
    assert all(torch.allclose(w2[n], w1[n], atol=2e-5, rtol=1e-4) for n in w1), \
        max((float((w2[n] - w1[n]).abs().max()), n) for n in w1)


def _ranks(rank, port, results):
    import torch
    import torch.distributed as dist

    from parpkit.errors import ParpkitError
    from parpkit.masks import check_ranks_agree

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    same = {"a": torch.tensor([True, False, True, True]), "b": torch.ones(2, 3, dtype=torch.bool)}
    check_ranks_agree(same)  # agrees: nothing happens
    differ = {"a": torch.tensor([True, False, True, True]) if rank == 0 else torch.tensor([True, True, False, True]),
              "b": torch.ones(2, 3, dtype=torch.bool)}  # the same count kept, other positions
    try:
        check_ranks_agree(differ)
        results[rank] = "agreed"
    except ParpkitError as exc:
        results[rank] = str(exc)
    dist.destroy_process_group()


def test_masks_that_differ_between_ranks_are_an_error_on_every_rank():
    import multiprocessing

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_ranks, args=(r, port, results)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]
        assert all("2 processes hold different masks for 1 pool tensors (first: a)" in results[r] for r in range(2)), dict(results)
