"""Finished runs as tables and plots: WER against sparsity method by method, learning curves, per-layer
sparsity, and how much the masks of different runs overlap; and paired comparisons of two methods
(``parpkit report --compare A B``: ``compare``, written to compare.csv and compare.md).

compare.csv, one row per (pair, sparsity, split); compare.md shows the columns named in brackets, and
says under the table how many comparisons it makes and why an interval is missing:

a, b, sparsity, split: the pair (method A, method B), the target sparsity, the evaluation split [A, B, sparsity, split]
seeds_a, seeds_b: the runs (seeds) of each method [seeds A, seeds B]
difference: A − B of the corpus error rate (WER, or PER), each utterance's edits averaged over a method's seeds [A − B]
low, high, p_a_worse: 95% percentile interval of the paired bootstrap over utterances (models held fixed), and the
    share of draws with A worse [95% interval, P(A worse)]
p, p_holm: its two-sided bootstrap p, and that p Holm-adjusted over the table's rows
seed_low, seed_high, seed_p_a_worse, seeds_paired: the same with the seeds resampled too (both methods with two or
    more seeds; in pairs where both ran the same seeds) [95% interval, seeds too; P(A worse), seeds too]
t_seeds, t_difference: the seeds both methods ran, and the mean of the per-seed differences over them
t_low, t_high, t_p, t_p_holm: 95% paired t-interval over those per-seed differences (t with t_seeds − 1 degrees
    of freedom; none under two paired seeds, or where every paired seed gave the same difference), its two-sided
    p, and that p Holm-adjusted over the table's rows
    [95% t-interval, paired seeds; paired seeds; Holm p (t)]
speakers: the speakers (clusters) of the split's utterances, as the dataset names them (or as --speaker-pattern
    groups those names)
speaker_low, speaker_high, speaker_p_a_worse, speaker_p, speaker_p_holm: 95% interval of the bootstrap over
    speakers (models held fixed; none under MIN_SPEAKERS (5) or without speakers in the transcripts), the share
    of draws with A worse, its two-sided p, and that p Holm-adjusted over the table's rows
    [95% interval, speakers; speakers; Holm p (speakers)]
speaker_pattern: the regular expression that grouped the transcripts' speaker names into those speakers
    (--speaker-pattern; empty: each name its own speaker)
utterances, resamples, level: utterances compared, bootstrap draws (--resamples), interval level
comparisons: the rows of the table (the family the Holm adjustments are over)
notes: why an interval is missing or rough, what the t-interval is over when that is less than all seeds, and
    splits left out because not every run scored them
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import torch

from parpkit.errors import ParpkitError
from parpkit.sweep import axis_text

COLUMNS = ["run", "method", "backbone", "dataset", "criterion", "schedule", "scope", "seed", "target_sparsity", "pool_sparsity",
           "model_sparsity", "wer", "cer", "per", "dense_wer", "dense_cer", "dense_per", "mask_iou_initial", "steps",
           "wall_time_s"]


def _is_run(path: Path) -> bool:
    """A run directory, finished or not (what ``parpkit run`` writes first)."""
    return any((path / name).is_file() for name in ("metrics.json", "recipe.yaml", "log.jsonl"))


def find_runs(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Run directories holding a metrics.json (folders are searched one level down), each once; and the
    runs that have not finished (started ones, and a sweep's points without a metrics.json), named."""
    found: list[Path] = []
    unfinished: list[Path] = []
    for p in paths:
        if (p / "metrics.json").is_file():
            found.append(p)
        elif _is_run(p):
            unfinished.append(p)
        elif p.is_dir():
            children = sorted(c for c in p.iterdir() if c.is_dir())
            found += [c for c in children if (c / "metrics.json").is_file()]
            unfinished += [c for c in children if _is_run(c) and not (c / "metrics.json").is_file()]
            unfinished += [p / name for name in _sweep_points(p) if not (p / name).exists()]
        elif not p.exists():
            raise ParpkitError(f"{p}: no such run or sweep directory")
    found = list(OrderedDict((r.resolve(), r) for r in found).values())  # a run named twice counts once
    unfinished = list(OrderedDict((r.resolve(), r) for r in unfinished).values())
    if not found:
        raise ParpkitError(f"no finished runs (metrics.json) in {', '.join(map(str, paths))}")
    return found, [f"{r}: not finished (no metrics.json)" for r in unfinished]


def unique_labels(paths: list[Path]) -> list[str]:
    """Short names that tell the paths apart: a run's folder name (a mask file's own folder for
    ``masks*.safetensors``), with as many parent folders as it takes to make them differ."""
    parts = [(p.parent if p.is_file() and p.name.startswith("masks") else p).resolve().parts for p in paths]
    depth = [1] * len(paths)
    labels = ["/".join(ps[-d:]) for ps, d in zip(parts, depth, strict=True)]
    for _ in range(max((len(ps) for ps in parts), default=0)):
        counts = {label: labels.count(label) for label in labels}
        if all(c == 1 for c in counts.values()):
            break
        depth = [d + 1 if counts[label] > 1 and d < len(ps) else d for ps, d, label in zip(parts, depth, labels, strict=True)]
        labels = ["/".join(ps[-d:]) for ps, d in zip(parts, depth, strict=True)]
    if len(set(labels)) < len(labels):  # the same path twice
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    return labels


def _sweep_index(folder: Path) -> list[dict]:
    """The points of a sweep folder's ``sweep.json`` (none without one); a damaged one is refused, named: its
    points' axes label the runs (the ``method`` axis among them)."""
    index = folder / "sweep.json"
    if not index.is_file():
        return []
    try:
        points = json.loads(index.read_text())["points"]
        if not isinstance(points, list) or not all(isinstance(p, dict) and isinstance(p.get("name"), str)
                                                   and isinstance(p.get("axes"), dict) for p in points):
            raise ValueError("its points are not a list of {name, axes}")
    except (ValueError, KeyError, TypeError) as exc:
        raise ParpkitError(f"{index}: not a sweep index parpkit can read ({type(exc).__name__}: {exc}); its points label "
                           "the sweep's runs: repair it, or move it away to label them by schedule and criterion") from None
    return points


def _sweep_points(folder: Path) -> list[str]:
    """The point names a sweep folder's ``sweep.json`` lists (none if it has none)."""
    return [point["name"] for point in _sweep_index(folder)]


def _labels(run_dir: Path) -> dict[str, Any]:
    """A sweep point's axes (``sweep.json`` in the folder above), e.g. ``{"method": "parp", …}``."""
    return next((point["axes"] for point in _sweep_index(run_dir.parent) if point["name"] == run_dir.name), {})


#: the axes a method's rows vary over: the table's sparsity column, and seeds averaged in one row
ROW_AXES = ("pruning.sparsity", "seed")


def method_of(metrics: dict, labels: dict) -> str:
    """What the point compares: the sweep's ``method`` label, else the schedule (with a criterion other
    than magnitude); ``dense`` at sparsity 0. The point's other axes are added (``parp learning_rate=0.001``),
    so points that differ in more than sparsity and seed are never averaged as if they were seeds."""
    if "method" in labels:
        base = str(labels["method"])
    elif metrics["target_sparsity"] == 0:
        base = "dense"
    else:
        schedule, criterion = metrics["plugins"]["schedule"], metrics["plugins"]["criterion"]
        if criterion == "random" and schedule == "fixed":
            base = "random"
        else:
            base = schedule if criterion == "magnitude" else f"{schedule}+{criterion}"
    extra = [f"{axis.rsplit('.', 1)[-1]}={axis_text(value)}" for axis, value in labels.items()
             if axis != "method" and axis not in ROW_AXES]
    return " ".join([base, *extra])


def collect(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """One row per finished run; damaged metrics.json files and unfinished runs are skipped and named.
    Runs that would fall in one row but share a seed (they differ in something no sweep axis names, such
    as the pool) are labelled with their directory names instead of being averaged as seeds."""
    found, skipped = find_runs(paths)
    rows = []
    for run_dir in found:
        try:
            m = json.loads((run_dir / "metrics.json").read_text())
            final, dense = m["stages"].get("final", {}), m["stages"].get("dense", {})
            seed = _recipe_seed(run_dir)
            row = {"run": str(run_dir), "method": method_of(m, _labels(run_dir)),
                   **{k: m["plugins"][k] for k in ("backbone", "dataset", "criterion", "schedule")},
                   "scope": m.get("scope"), "seed": seed, "target_sparsity": m["target_sparsity"],
                   "pool_sparsity": final.get("pool_sparsity"), "model_sparsity": final.get("model_sparsity"),
                   "wer": final.get("wer"), "cer": final.get("cer"), "per": final.get("per"),
                   "dense_wer": dense.get("wer"), "dense_cer": dense.get("cer"), "dense_per": dense.get("per"),
                   "mask_iou_initial": m.get("mask_iou_initial"), "steps": m["steps"], "wall_time_s": m["wall_time_s"]["total"],
                   "model_parameters": m.get("model_parameters"),
                   "nonzero_parameters": (None if m.get("model_parameters") is None or final.get("model_sparsity") is None
                                          else round(m["model_parameters"] * (1 - final["model_sparsity"]))),
                   "splits": {k: v for k, v in (final.get("splits") or {m["eval_split"]: final}).items()},
                   "dense_splits": dense.get("splits") or ({m["eval_split"]: dense} if dense else {}),
                   "curve": m.get("curve") or [],
                   # the settings every stage was scored at (parpkit 0.2.0 on: the model's native ones); None before
                   "judged": (m.get("backbone_settings") or {}).get("judged"),
                   "eval_sizes": {k: n for k, n in (m.get("eval_splits") or {}).items() if _number(n)},
                   "corpus": corpus_digests(run_dir / "transcripts_final.jsonl"),
                   "machine": machine_of(m.get("environment"))}
            _check_row(row)
        except (ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
            skipped.append(f"{run_dir / 'metrics.json'}: unreadable ({type(exc).__name__}: {exc})")
            continue
        rows.append(row)
    if not rows:
        raise ParpkitError("no readable runs: " + "; ".join(skipped))
    _one_setting(rows)
    _true_seeds(rows)
    seeds: defaultdict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        seeds[(r["method"], r["target_sparsity"], r["seed"])].append(r)
    for same in seeds.values():
        if len(same) > 1:
            for r, label in zip(same, unique_labels([Path(r["run"]) for r in same]), strict=True):
                r["method"] = f"{r['method']} [{label}]"
    rows.sort(key=lambda r: (r["backbone"], r["dataset"], r["method"], r["target_sparsity"], r["seed"] or 0))
    return rows, skipped


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_row(row: dict) -> None:
    """The values the tables and plots compute with are numbers, and the learning curve's points have what its
    plot reads (a damaged or hand-edited metrics.json with ``target_sparsity: null`` or ``"0.5"``, or a curve point
    without a split, is skipped and named, not a crash)."""
    if not _number(row["target_sparsity"]) or not 0 <= row["target_sparsity"] < 1:
        raise ValueError(f"target_sparsity is {row['target_sparsity']!r}, expected a number in [0, 1)")
    for key in ("pool_sparsity", "model_sparsity", "wer", "cer", "per", "dense_wer", "dense_cer", "dense_per",
                "mask_iou_initial", "wall_time_s"):
        if row[key] is not None and not (_number(row[key]) and math.isfinite(row[key])):
            raise ValueError(f"{key} is {row[key]!r}, expected a number")  # NaN would print as a blank, "not measured"
    if not _number(row["steps"]) or not _number(row["wall_time_s"]):
        raise ValueError(f"steps and wall_time_s.total must be numbers, got {row['steps']!r} and {row['wall_time_s']!r}")
    for what in ("splits", "dense_splits"):
        for split, rates in row[what].items():
            if not isinstance(rates, dict) or any(not (_number(rates.get(k, 0)) and math.isfinite(rates.get(k, 0)))
                                                  for k in ("wer", "cer", "per")):
                raise ValueError(f"{what[:-1].replace('_', ' ')} {split!r} holds {rates!r}, expected error rates")
    for method in ("backbone", "dataset"):
        if not isinstance(row[method], str):
            raise ValueError(f"plugins.{method} is {row[method]!r}, expected a name")
    if not isinstance(row["curve"], list):
        raise ValueError(f"curve is {row['curve']!r}, expected a list of learning-curve points")
    for point in row["curve"]:
        if not (isinstance(point, dict) and _number(point.get("step")) and isinstance(point.get("split"), str)
                and any(_number(point.get(k)) and math.isfinite(point[k]) for k in ("wer", "per"))):
            raise ValueError(f"curve point {point!r}: expected a step, a split and an error rate (wer or per)")


def _one_setting(rows: list[dict]) -> None:
    """One table compares methods on one model and one corpus; mixed runs would share one zero-shot line
    and one set of columns. Runs of different backbones or datasets, or of one dataset whose split of one
    name holds different numbers of utterances (another corpus), are refused, naming them. (Runs scored
    on different splits of one corpus are fine: each split is a column.)"""
    settings: OrderedDict[str, list[str]] = OrderedDict()
    for r in rows:
        settings.setdefault(f"{r['backbone']} on {r['dataset']}", []).append(r["run"])
    if len(settings) > 1:
        parts = [f"{name}: {len(runs)} run(s), e.g. {runs[0]}" for name, runs in settings.items()]
        raise ParpkitError("these runs differ in backbone or dataset and do not belong in one table; report each "
                           "group on its own: " + "; ".join(parts))
    sizes: defaultdict[str, OrderedDict[int, str]] = defaultdict(OrderedDict)
    for r in rows:
        for split, n in r["eval_sizes"].items():
            sizes[split].setdefault(n, r["run"])
    for split, seen in sizes.items():
        if len(seen) > 1:
            parts = [f"{n} in {run}" for n, run in seen.items()]
            raise ParpkitError(f"these runs were scored on different corpora (split {split!r} holds {'; '.join(parts)} "
                               "utterances) and do not belong in one table; report each group on its own")
    corpora: defaultdict[str, OrderedDict[str, list[str]]] = defaultdict(OrderedDict)
    for r in rows:
        for split, digest in r["corpus"].items():
            corpora[split].setdefault(digest, []).append(r["run"])
    for split, seen in corpora.items():
        if len(seen) > 1:
            parts = [f"{', '.join(runs[:3])}{' …' if len(runs) > 3 else ''}" for runs in seen.values()]
            raise ParpkitError(f"these runs were scored on different corpora (split {split!r} holds other utterances or "
                               f"references in {' | '.join(parts)}: another dataset seed or options?) and do not belong in "
                               "one table; report each group on its own")


def corpus_digests(transcripts: Path) -> dict[str, str]:
    """Per scored split, a digest of its utterances (ids and references) from a run's transcripts: runs of one
    corpus share it. Empty where the run wrote none (or they cannot be read)."""
    import hashlib

    rows: defaultdict[str, list[tuple[str, str]]] = defaultdict(list)
    try:
        with transcripts.open() as f:
            for line in f:
                row = json.loads(line)
                rows[str(row.get("split"))].append((str(row["id"]), str(row.get("reference"))))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    return {split: hashlib.sha256(json.dumps(sorted(pairs)).encode()).hexdigest()[:16] for split, pairs in rows.items()}


#: recipe keys that do not make another configuration: the seed (what seeds vary), names and folders, the
#: variables (already substituted), the sweep section, and training settings that change no number
_NOT_CONFIGURATION = {"seed", "name", "output_dir", "vars", "sweep"}


def recipe_configuration(run_dir: Path, without: set[str] = _NOT_CONFIGURATION) -> dict[str, Any] | None:
    """A run's resolved recipe as flat dotted keys, without what does not make another configuration (the seed,
    names, bookkeeping: the top-level keys ``without``); None without a readable recipe.yaml."""
    from parpkit.recipe import BOOKKEEPING, parse_yaml

    try:
        data = parse_yaml((run_dir / "recipe.yaml").read_text())
    except Exception:  # noqa: BLE001  (missing, unreadable, not YAML: no configuration to compare)
        return None
    if not isinstance(data, dict):
        return None
    flat: dict[str, Any] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            flat[key] = node

    walk({k: v for k, v in data.items() if k not in without}, "")
    return {k: v for k, v in flat.items() if not (k.startswith("training.") and k.split(".", 1)[1] in BOOKKEEPING)}


def _true_seeds(rows: list[dict]) -> None:
    """Rows that would be averaged as seeds of one method (same label and sparsity) but whose recipes differ in more
    than the seed (another width, learning rate, step count …) are told apart: each configuration's label gets the
    keys in which it differs (``parp d_model=32``), or its folder where they are many or a recipe is missing."""
    groups: defaultdict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["target_sparsity"])].append(r)
    for same in groups.values():
        configs = [recipe_configuration(Path(r["run"])) for r in same]
        texts = [json.dumps(c, sort_keys=True, default=str) for c in configs]
        if len(set(texts)) < 2:
            continue
        if None in configs:
            differing: list[str] = []
        else:
            keys = sorted(set().union(*configs))
            differing = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]
        if 0 < len(differing) <= 3:
            for r, c in zip(same, configs, strict=True):
                r["method"] += " " + " ".join(f"{k.rsplit('.', 1)[-1]}={axis_text(c.get(k))}" for k in differing)
        else:  # one label per configuration: its first run's folder
            first: dict[str, str] = {}
            for r, t in zip(same, texts, strict=True):
                first.setdefault(t, r["run"])
            labels = dict(zip(first.values(), unique_labels([Path(p) for p in first.values()]), strict=True))
            for r, t in zip(same, texts, strict=True):
                r["method"] += f" [{labels[first[t]]}]"


def _recipe_seed(run_dir: Path) -> int | None:
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return None
    match = re.search(r"^seed:\s*(-?\d+)\s*$", path.read_text(), re.M)
    return int(match.group(1)) if match else None


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    splits = sorted({s for r in rows for s in r["splits"]})
    extra = [f"{k}_{s}" for s in splits for k in ("wer", "cer", "per") if any(k in r["splits"].get(s, {}) for r in rows)]
    # the pretrained model's scores per split (zero-shot), and the non-zero parameters of the final model
    extra += [f"dense_{k}_{s}" for s in splits for k in ("wer", "cer", "per") if any(k in r["dense_splits"].get(s, {}) for r in rows)]
    extra += ["model_parameters", "nonzero_parameters"] + (["machine"] if any(r.get("machine") for r in rows) else [])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS + extra, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, **{f"{k}_{s}": r["splits"].get(s, {}).get(k) for s in splits for k in ("wer", "cer", "per")},
                             **{f"dense_{k}_{s}": r["dense_splits"].get(s, {}).get(k) for s in splits for k in ("wer", "cer", "per")}})


# ------------------------------------------------------------------------------------------ grouping

def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (the seeds' spread), of the values present."""
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return sum(values) / len(values), (max(values) - min(values)) / 2


def grouped(rows: list[dict]) -> list[dict]:
    """Rows averaged over seeds: one per (method, target sparsity)."""
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for r in rows:
        groups.setdefault((r["method"], r["target_sparsity"]), []).append(r)
    out = []
    for (method, sparsity), rs in groups.items():
        splits = list(OrderedDict.fromkeys(s for r in rs for s in r["splits"]))
        rate = next((k for k in ("wer", "per") if any(k in r["splits"].get(splits[0], {}) for r in rs)), "wer")
        entry = {"method": method, "sparsity": sparsity, "seeds": len(rs), "rate": rate, "splits": splits,
                 "pool_sparsity": _spread([r["pool_sparsity"] for r in rs])[0],
                 "model_sparsity": _spread([r["model_sparsity"] for r in rs])[0],
                 "steps": rs[0]["steps"], "wall_time_s": sum(r["wall_time_s"] for r in rs),
                 "nonzero_parameters": _spread([r.get("nonzero_parameters") for r in rs])[0],
                 "mask_iou_initial": _spread([r["mask_iou_initial"] for r in rs]),
                 "scores": {s: _spread([r["splits"].get(s, {}).get(rate) for r in rs]) for s in splits},
                 "values": {s: [r["splits"].get(s, {}).get(rate) for r in rs] for s in splits},  # one per seed, in seed order
                 "cer": {s: _spread([r["splits"].get(s, {}).get("cer") for r in rs]) for s in splits}}
        out.append(entry)
    return out


def _fmt(mean_spread: tuple[float, float], seeds: int, values: list | None = None) -> str:
    """``mean`` for one seed; ``mean ± half range (every seed's value)`` for several."""
    mean, spread = mean_spread
    if math.isnan(mean):
        return ""
    if seeds == 1:
        return f"{mean:.3f}"
    each = ", ".join("–" if v is None else f"{v:.3f}" for v in values) if values else ""
    return f"{mean:.3f} ± {spread:.3f}" + (f" ({each})" if each else "")


def zero_shot(rows: list[dict]) -> dict[str, dict] | None:
    """The pretrained model's scores per split, where every run shares one (else None)."""
    dense = [r for r in rows if r["dense_splits"]]
    zeros = {json.dumps(r["dense_splits"], sort_keys=True) for r in dense}
    return dense[0]["dense_splits"] if len(zeros) == 1 else None


def _decoding(judged: dict) -> str:
    """How a run's transcripts were decoded, in words ('' for one decoding with no fallback)."""
    temperatures = judged.get("temperature")
    if not temperatures:
        return ""
    tests = [f"compression ratio above {judged['compression_ratio_threshold']:g}"] if judged.get("compression_ratio_threshold") else []
    if judged.get("logprob_threshold") is not None:
        tests.append(f"mean log-probability below {judged['logprob_threshold']:g}")
    return (f"with temperature fallback: again at {', '.join(f'{t:g}' for t in temperatures[1:])} where "
            f"{' or '.join(tests) or 'asked'} (sampling seed {judged.get('seed')})")


def machine_of(environment: Any) -> str | None:
    """The kind of machine a run was scored on, as far as it rounds floats differently: the GPU's name, or the
    CPU kernels torch chose (``AVX2``, ``AVX512`` …) and, where recorded, its thread count (some kernels split
    their sums by thread: a convolution's weight gradient differs between one thread and two); None for a run
    that does not record it (one made before December 2026)."""
    if not isinstance(environment, dict):
        return None
    if environment.get("gpu"):
        return str(environment["gpu"])
    if not environment.get("cpu_capability"):
        return None
    threads = environment.get("threads")
    return (f"CPU ({environment['cpu_capability']} kernels"
            + (f", {threads} thread{'' if threads == 1 else 's'})" if isinstance(threads, int) else ")"))


def judged_note(rows: list[dict]) -> list[str]:
    """Where the scores were judged: at the model's native settings (parpkit 0.2.0 on), or, for runs made
    before that, at their training settings (whisper's training window), which this table cannot compare
    with the model as published."""
    old = [r for r in rows if r.get("judged") is None]
    windows = sorted({r["judged"]["encoder_window_s"] for r in rows if (r.get("judged") or {}).get("encoder_window_s")})
    out = []
    if windows and not old:
        out.append(f"Every score, zero-shot included, at the model's native settings (encoder window "
                   f"{', '.join(f'{w:g}' for w in windows)} s).")
    decodings = {_decoding(r["judged"]) for r in rows if r.get("judged")}
    if len(decodings) == 1 and next(iter(decodings)):
        out.append(f"Decoded {next(iter(decodings))}.")
    elif len(decodings) > 1:
        out.append("The runs were decoded differently (" + "; ".join(sorted(d or "greedy, no fallback" for d in decodings))
                   + "): compare rows decoded alike.")
    machines = Counter(r.get("machine") for r in rows)
    if len(machines) > 1:  # float rounding differs between them: a source of variation beside the seed
        out.append("The runs ran on more than one kind of machine or thread count (" + "; ".join(
            f"{kind or 'not recorded'}: {n}" for kind, n in sorted(machines.items(), key=lambda kv: (kv[0] is None, kv[0] or "")))
            + "), which round floats differently: a source of variation beside the seed.")
    if old:
        out.append(f"{len(old)} of {len(rows)} runs were scored before parpkit 0.2.0, at their training settings "
                   "(whisper: the recipe's encoder window), not at the model's own: their zero-shot is not the model as "
                   "published.")
    return [""] + out if out else []


def _cell(label: str) -> str:
    """A label as a Markdown table cell: ``|`` escaped (``parp|magnitude`` would split the row)."""
    return label.replace("|", "\\|")


def markdown(rows: list[dict]) -> str:
    """method × sparsity: error rates per split (mean ± half the range over seeds, then every seed's value),
    each split's mean over the zero-shot model's where all runs share one, sparsity and non-zero parameters,
    compute (optimizer steps, those that found the mask included; wall time of all seeds)."""
    groups = grouped(rows)
    splits = list(OrderedDict.fromkeys(s for g in groups for s in g["splits"]))
    rate = groups[0]["rate"].upper()
    zero = zero_shot(rows)
    ratio_splits = [s for s in splits if zero and (zero.get(s) or {}).get(groups[0]["rate"])]
    head = ["method", "sparsity", "seeds"] + [f"{rate} {s}" for s in splits] + [f"× zero-shot {s}" for s in ratio_splits]
    head += [f"CER {s}" for s in splits if rate == "WER"]
    head += ["pool sparsity", "model sparsity", "non-zero parameters", "mask IoU with first", "steps (mask finding included)",
             "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [_cell(g["method"]), f"{g['sparsity']:g}", str(g["seeds"])]
        cells += [_fmt(g["scores"].get(s, (math.nan, math.nan)), g["seeds"], g["values"].get(s)) for s in splits]
        cells += ["" if math.isnan(g["scores"].get(s, (math.nan,))[0]) else f"{g['scores'][s][0] / zero[s][groups[0]['rate']]:.2f}"
                  for s in ratio_splits]
        if rate == "WER":
            cells += [_fmt(g["cer"].get(s, (math.nan, math.nan)), g["seeds"]) for s in splits]
        iou, nonzero = g["mask_iou_initial"], g["nonzero_parameters"]
        cells += [f"{g['pool_sparsity']:.4f}", f"{g['model_sparsity']:.4f}", "" if math.isnan(nonzero) else f"{nonzero / 1e6:.2f}M",
                  "" if math.isnan(iou[0]) else f"{iou[0]:.4f}", str(g["steps"]), f"{g['wall_time_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if zero is not None:
        scores = "; ".join(f"{s} {zero[s].get(groups[0]['rate'], math.nan):.3f}" for s in zero)
        lines.append("")
        lines.append(f"Pretrained model before fine-tuning (zero-shot): {rate} {scores}.")
    elif any(r["dense_splits"] for r in rows):  # different pretrained models (a backbone option as a sweep axis)
        different = len({json.dumps(r["dense_splits"], sort_keys=True) for r in rows if r["dense_splits"]})
        lines.append("")
        lines.append(f"Pretrained model before fine-tuning (zero-shot): differs between the runs ({different} different "
                     "scores); see each run's metrics.json.")
    lines += judged_note(rows)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ paired comparisons

def compare(rows: list[dict], a: str, b: str, *, resamples: int = 2000, seed: int = 0,
            speaker_pattern: str | None = None) -> list[dict]:
    """Method ``a`` against method ``b`` at every sparsity both have, on every split: the difference of
    final error rates A − B (each utterance's edits averaged over a method's seeds first) with four
    intervals (``parpkit.stats``):

    - over utterances (``low``/``high``, ``p_a_worse``, two-sided ``p``), the trained models held fixed;
    - over seeds and utterances (``seed_low``/``seed_high``/``seed_p_a_worse``), where both methods have two
      or more seeds: paired by seed (``seeds_paired``) where both ran the same seeds, each method's seeds
      drawn on their own otherwise (None otherwise);
    - a paired t-interval over the seeds both ran (``t_low``/``t_high``, ``t_p``; ``t_seeds`` of them, their
      mean difference ``t_difference``), where there are two or more such seeds;
    - over speakers (``speaker_low``/``speaker_high``, ``speaker_p``; ``speakers`` of them), where the
      transcripts name each utterance's speaker and there are ``MIN_SPEAKERS`` or more (under ``FEW_SPEAKERS`` a
      note calls it rough). ``speaker_pattern``, a regular expression, groups the names first where they are
      finer than the voices (``speaker_cluster``).

    Where an interval cannot be given its columns are None and ``notes`` says why. The Holm-adjusted p
    columns (``p_holm``, ``t_p_holm``, ``speaker_p_holm``) and ``comparisons`` are over the rows returned
    here; ``family`` recomputes them over several calls' rows (what ``parpkit report`` does for all its
    ``--compare`` pairs). The columns: this module's docstring. Refused, naming what is wrong: an unknown method,
    a method against itself, and runs whose per-utterance errors cannot be compared (``_comparable``; damaged
    transcripts by ``parpkit.stats``)."""
    from parpkit.stats import paired_bootstrap, read_utterance_errors, seed_bootstrap

    methods = {r["method"] for r in rows}
    for name in (a, b):
        if name not in methods:
            raise ParpkitError(f"--compare: no method {name!r} among the runs; methods: {', '.join(sorted(methods))}")
    if a == b:
        raise ParpkitError(f"--compare: {a!r} against itself; name two methods: {', '.join(sorted(methods))}")
    out = []
    for sparsity in sorted({r["target_sparsity"] for r in rows if r["method"] == a} & {r["target_sparsity"] for r in rows
                                                                                         if r["method"] == b}):
        runs = {m: sorted((r for r in rows if r["method"] == m and r["target_sparsity"] == sparsity),
                          key=lambda r: (r["seed"] is None, r["seed"] or 0)) for m in (a, b)}  # seed order: pairs line up
        splits = [s for s in runs[a][0]["splits"] if all(s in r["splits"] for rs in runs.values() for r in rs)]
        partly = sorted({s for rs in runs.values() for r in rs for s in r["splits"]} - set(splits))
        left_out = [f"split {s} left out: not scored by " + ", ".join(r["run"] for rs in runs.values() for r in rs
                                                                       if s not in r["splits"]) for s in partly]
        unscored: list[str] = []
        for split in splits:
            files = {m: [Path(r["run"]) / "transcripts_final.jsonl" for r in rs] for m, rs in runs.items()}
            per = {m: [read_utterance_errors(f, split) if f.is_file() else {} for f in fs] for m, fs in files.items()}
            ids = sorted(set.intersection(*[set(e) for es in per.values() for e in es]))
            if not _comparable(runs, per, ids, split):  # runs written before per-utterance errors were recorded
                unscored.append(split)
                continue
            mean = {m: [(sum(e[i][0] for e in es) / len(es), es[0][i][1]) for i in ids] for m, es in per.items()}
            result = paired_bootstrap(mean[a], mean[b], resamples=resamples, seed=seed)
            result.update(seed_low=None, seed_high=None, seed_p_a_worse=None, seeds_paired=None)
            notes: list[str] = [] if any(o["sparsity"] == sparsity for o in out) else list(left_out)  # once, first row
            seeds = {m: [r["seed"] for r in rs] for m, rs in runs.items()}
            if min(len(per[a]), len(per[b])) > 1:  # the spread between training runs too
                edits = {m: [[e[i][0] for i in ids] for e in es] for m, es in per.items()}
                paired = seeds[a] == seeds[b] and None not in seeds[a] and len(set(seeds[a])) == len(seeds[a])
                both = seed_bootstrap(edits[a], edits[b], [w for _, w in mean[a]], paired=paired, resamples=resamples,
                                      seed=seed)
                result["seeds_paired"] = paired
                result.update({k: v for k, v in both.items() if k.startswith("seed_")})
            result.update(_paired_t(per, seeds, a, b, ids, notes))
            result.update(_by_speaker(files, split, ids, mean[a], mean[b], notes, resamples, seed, speaker_pattern))
            out.append({"a": a, "b": b, "sparsity": sparsity, "split": split, "seeds_a": len(runs[a]), "seeds_b": len(runs[b]),
                        **result, "speaker_pattern": speaker_pattern, "notes": "; ".join(notes)})
        first = next((o for o in out if o["sparsity"] == sparsity), None)
        if unscored and first is not None:  # said once, on the sparsity's first row, as left_out is
            first["notes"] = "; ".join(filter(None, [first["notes"], *(
                f"split {u} left out: no run of the pair has per-utterance errors on it" for u in unscored)]))
    if not out:
        raise ParpkitError(f"--compare: {a!r} and {b!r} share no sparsity with per-utterance errors on a common split")
    return family(out)


def _comparable(runs: dict[str, list[dict]], per: dict[str, list[dict]], ids: list[str], split: str) -> bool:
    """Whether the runs' per-utterance errors on ``split`` can be compared: False where no run has them (written
    before parpkit recorded them); refused, naming the runs, where only some have them, or where the runs count
    an utterance's reference words differently (scored with other normalisers: their rates are over other words)."""
    each = [(r["run"], e) for m in runs for r, e in zip(runs[m], per[m], strict=True)]
    lacking = [run for run, e in each if not e]
    if len(lacking) == len(each):
        return False
    if lacking:
        raise ParpkitError(f"--compare: {', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no per-utterance "
                           f"errors on {split!r} (no transcripts_final.jsonl, or one written before parpkit recorded "
                           "them) and the other runs compared have: rerun them, or report the other runs by name")
    words: OrderedDict[str, list[str]] = OrderedDict()
    for run, e in each:
        words.setdefault(json.dumps([e[i][1] for i in ids]), []).append(run)
    if len(words) > 1:
        groups = " | ".join(", ".join(group) for group in words.values())
        raise ParpkitError(f"--compare: the runs count the reference words of split {split!r} differently ({groups}): "
                           "most likely scored with different normalisers (evaluation.normalizer); compare runs scored alike")
    return bool(ids)


def _paired_t(per: dict[str, list[dict]], seeds: dict[str, list], a: str, b: str, ids: list[str], notes: list[str]) -> dict:
    """The paired t-interval's columns over the seeds both methods ran (None, with a note, under two)."""
    from parpkit.stats import paired_t_interval

    blank = {"t_seeds": 0, "t_difference": None, "t_low": None, "t_high": None, "t_p": None}
    rate = lambda errors: sum(errors[i][0] for i in ids) / max(1, sum(errors[i][1] for i in ids))  # noqa: E731
    by_seed = {m: {s: rate(e) for s, e in zip(seeds[m], per[m], strict=True) if s is not None} for m in (a, b)}
    common = sorted(set(by_seed[a]) & set(by_seed[b]))
    blank["t_seeds"] = len(common)
    if len(common) < 2:
        shown = {m: "none named" if not by_seed[m] else ", ".join(map(str, sorted(by_seed[m]))) for m in (a, b)}
        notes.append(f"no t-interval: {len(common)} seed(s) ran by both (A: {shown[a]}; B: {shown[b]}); it needs two")
        return blank
    t = paired_t_interval([by_seed[a][s] - by_seed[b][s] for s in common])
    if len(common) < max(len(seeds[a]), len(seeds[b])):  # its centre is not the row's A − B (all seeds of each)
        notes.append(f"t-interval over the {len(common)} seeds both ran ({', '.join(map(str, common))}), whose A − B is "
                     f"{t['difference']:+.4f}")
    if t["p"] is None:
        notes.append(f"no t-interval: every paired seed gave the same difference ({t['difference']:+.4f}); with no spread "
                     "between seeds a t-test has nothing to scale by")
    return {"t_seeds": len(common), "t_difference": t["difference"], "t_low": t["low"], "t_high": t["high"], "t_p": t["p"]}


#: the speakers a speaker bootstrap needs before ``compare`` gives its interval, and under how many it says the
#: interval is rough: a percentile bootstrap of G clusters sees only their spread among themselves
#: (tests/test_report_stats.py measures how often a 95% interval holds a true difference of 0 at 4 and at 20)
MIN_SPEAKERS, FEW_SPEAKERS = 5, 10


def speaker_cluster(name: str, pattern: str | None) -> str:
    """The speaker (cluster) a transcript's speaker ``name`` belongs to under ``pattern`` (``--speaker-pattern``):
    the name itself without one; else the first group of the pattern's first match (``re.search``), or the whole
    match where the pattern has no group. A dataset may name a speaker more finely than one voice (the synthetic
    corpora add the rate and pitch each voice was synthesised at: ``flite:slt@1.18/97``), and utterances of one
    voice under several names would be resampled as if independent. Refused, naming it, where nothing matches."""
    if pattern is None:
        return name
    m = re.search(pattern, name)
    speaker = m and m.group(1 if m.re.groups else 0)
    if not speaker:
        what = "does not match" if m is None else "matches only an empty " + ("first group in" if m.re.groups else "string in")
        raise ParpkitError(f"--speaker-pattern '{pattern}' {what} the speaker name {name!r}: give a pattern whose match "
                           "(or first group) is the part of every name that says the voice")
    return speaker


def _by_speaker(files: dict[str, list[Path]], split: str, ids: list[str], a: list, b: list, notes: list[str],
                resamples: int, seed: int, pattern: str | None = None) -> dict:
    """The speaker bootstrap's columns (None, with a note, where the transcripts name no speakers, disagree
    on them, or name one), over the names grouped by ``pattern`` (``speaker_cluster``)."""
    from parpkit.stats import read_speakers, speaker_bootstrap

    blank = {"speakers": None, "speaker_low": None, "speaker_high": None, "speaker_p_a_worse": None, "speaker_p": None}
    found: dict[str, str] = {}
    names: dict[str, set[str]] = defaultdict(set)  # an utterance's names, as each run wrote it
    for f in (f for fs in files.values() for f in fs):
        for uid, name in (read_speakers(f, split) if f.is_file() else {}).items():
            names[uid].add(name)
            try:
                who = speaker_cluster(name, pattern)
            except ParpkitError as exc:
                raise ParpkitError(f"{f}, split {split}, utterance {uid!r}: {exc}") from None
            if found.setdefault(uid, who) != who:
                notes.append(f"no speaker interval: the runs name different speakers for utterance {uid!r}")
                return blank
    missing = [i for i in ids if i not in found]
    if missing:
        notes.append(f"no speaker interval: the transcripts name no speaker for {len(missing)} of {len(ids)} utterances "
                     "(written before parpkit recorded speakers, or the dataset names none)")
        return blank
    speakers = [found[i] for i in ids]
    g = len(set(speakers))
    named = len(set().union(*(names[i] for i in ids)))
    if named > g:
        notes.append(f"{named} speaker names grouped into {g} speakers by --speaker-pattern")
    if g < MIN_SPEAKERS:
        notes.append(f"no speaker interval: {g} speaker{'s' if g != 1 else ''}; a speaker bootstrap needs "
                     f"{MIN_SPEAKERS} or more (with few its interval is far too narrow)")
        return {**blank, "speakers": g}
    if g < FEW_SPEAKERS:
        notes.append(f"speaker interval over {g} speakers: too narrow with under {FEW_SPEAKERS} (a bootstrap of few "
                     "clusters understates their spread); read it as rough")
    s = speaker_bootstrap(a, b, speakers, resamples=resamples, seed=seed)
    return {"speakers": s["speakers"], "speaker_low": s["low"], "speaker_high": s["high"],
            "speaker_p_a_worse": s["p_a_worse"], "speaker_p": s["p"]}


def family(pairs: list[dict]) -> list[dict]:
    """Holm-adjusted p-values over all ``pairs`` (one family: every row of one compare table), for each of
    the three two-sided p columns, and ``comparisons``: how many rows the family has. Returns ``pairs``."""
    from parpkit.stats import holm

    for column in ("p", "t_p", "speaker_p"):
        for pair, adjusted in zip(pairs, holm([p.get(column) for p in pairs]), strict=True):
            pair[f"{column}_holm"] = adjusted
    for pair in pairs:
        pair["comparisons"] = len(pairs)
    return pairs


COMPARE_COLUMNS = ["a", "b", "sparsity", "split", "seeds_a", "seeds_b", "difference", "low", "high", "p_a_worse",
                   "seed_low", "seed_high", "seed_p_a_worse", "seeds_paired", "utterances", "resamples", "level",
                   "p", "p_holm", "t_seeds", "t_difference", "t_low", "t_high", "t_p", "t_p_holm",
                   "speakers", "speaker_low", "speaker_high", "speaker_p_a_worse", "speaker_p", "speaker_p_holm", "speaker_pattern",
                   "comparisons", "notes"]

def write_compare_csv(pairs: list[dict], path: Path) -> None:
    """The pairs of ``compare`` as CSV (full precision), the table README findings are checked against;
    its columns: this module's docstring."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COMPARE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(pairs)


def _interval(low: float | None, high: float | None) -> str:
    return "—" if low is None else f"[{low:+.4f}, {high:+.4f}]"


def _p(value: float | None) -> str:
    return "—" if value is None else "<0.001" if value < 0.001 else f"{value:.3f}"


def interval_cells(p: dict) -> tuple[str, ...]:
    """A compare pair's intervals as the printed table and compare.md show them ("—" where there is none):
    over utterances and P(A worse); seeds too and P(A worse); the paired t-interval, its paired seeds and
    Holm p; over speakers, their number and Holm p (p under 0.001 as "<0.001")."""
    return (_interval(p["low"], p["high"]), f"{p['p_a_worse']:.3f}", _interval(p["seed_low"], p["seed_high"]),
            "—" if p["seed_p_a_worse"] is None else f"{p['seed_p_a_worse']:.3f}", _interval(p.get("t_low"), p.get("t_high")),
            str(p.get("t_seeds", "—")),
            _p(p.get("t_p_holm")), _interval(p.get("speaker_low"), p.get("speaker_high")),
            "—" if p.get("speakers") is None else str(p["speakers"]), _p(p.get("speaker_p_holm")))


def family_note(pairs: list[dict]) -> str:
    """How many comparisons the table makes, and how the Holm columns treat them."""
    tested = {k: sum(p.get(k) is not None for p in pairs) for k in ("t_p", "speaker_p")}
    text = (f"{len(pairs)} comparison{'s' if len(pairs) != 1 else ''} in this table. Holm-adjusted p (Holm 1979) over the rows with each p: "
            f"{tested['t_p']} with a paired t-test, {tested['speaker_p']} with a speaker bootstrap, {len(pairs)} with an "
            "utterance bootstrap (compare.csv: p_holm). Read a difference as shown at a family-wise level of 5% only "
            "where its Holm p is below 0.05; an interval that excludes 0 is a difference at 95% for that row alone.")
    resamples = pairs[0]["resamples"]
    floor = 2 / (resamples + 1)  # the smallest p a bootstrap of this many draws gives (parpkit.stats.bootstrap_p)
    floors = [f"{rows * floor:.3f} in the {name} bootstrap's column ({rows} rows)"
              for name, rows in (("utterance", len(pairs)), ("speaker", tested["speaker_p"])) if rows * floor > 0.05]
    if floors:
        text += (f" With {resamples} resamples no bootstrap p is below {floor:.4f}, so no Holm p falls below "
                 f"{' or '.join(floors)}: raise --resamples (at least {math.ceil(len(pairs) * 2 / 0.01)} for a floor "
                 "of 0.01).")
    return text


def compare_markdown(pairs: list[dict]) -> str:
    level = f"{pairs[0]['level']:.0%}"
    head = ["A", "B", "sparsity", "split", "seeds A", "seeds B", "A − B", f"{level} interval", "P(A worse)",
            f"{level} interval, seeds too", "P(A worse), seeds too", f"{level} t-interval, paired seeds", "paired seeds",
            "Holm p (t)", f"{level} interval, speakers", "speakers", "Holm p (speakers)", "utterances"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in pairs:
        lines.append(f"| {_cell(p['a'])} | {_cell(p['b'])} | {p['sparsity']:g} | {p['split']} | {p['seeds_a']} | "
                     f"{p['seeds_b']} | {p['difference']:+.4f} | {' | '.join(interval_cells(p))} | {p['utterances']} |")
    notes = [f"- {p['a']} − {p['b']} at {p['sparsity']:g}, {p['split']}: {p['notes']}" for p in pairs if p.get("notes")]
    text = "\n".join(lines) + (
        f"\n\nFour intervals for A − B ({pairs[0]['resamples']} bootstrap resamples; parpkit.stats and "
        "docs/how-to/compare-runs.md):\n"
        "- over utterances: the trained models held fixed, utterances resampled one by one;\n"
        "- seeds too: the seeds resampled as well (where both methods have two or more; in pairs where they ran "
        "the same seeds): a rough guide with few seeds;\n"
        "- paired t-interval: one difference per seed both ran, t with (paired seeds − 1) degrees of freedom: "
        "the interval for training the methods again, on these utterances;\n"
        "- speakers: speakers resampled with all their utterances, the models held fixed (utterances of one voice "
        "go together)" + (f"; the transcripts' speaker names (where they give them) grouped into speakers by the regular expression "
                          f"`{pairs[0]['speaker_pattern']}` (--speaker-pattern)" if pairs[0].get("speaker_pattern") else "")
        + ".\n\n" + family_note(pairs) + "\n")
    if notes:
        text += "\nNotes (a missing or rough interval, seeds, splits left out):\n" + "\n".join(notes) + "\n"
    return text


# ------------------------------------------------------------------------------------------ plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sparsity(rows: list[dict], path: Path) -> None:
    """Final error rate against sparsity, one line per method (seeds: mean with the range as error bars),
    one panel per evaluation split; the dense fine-tune and the zero-shot model as reference lines."""
    plt = _pyplot()
    groups = grouped(rows)
    splits = list(OrderedDict.fromkeys(s for g in groups for s in g["splits"]))
    rate = groups[0]["rate"]
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4.2), squeeze=False)
    zero = zero_shot(rows) or {}  # no line where the runs' zero-shot scores differ (the table says so), not one run's
    for ax, split in zip(axes[0], splits, strict=True):
        by_method: dict[str, list[dict]] = defaultdict(list)
        for g in groups:
            by_method[g["method"]].append(g)
        for method, gs in by_method.items():
            gs = sorted(gs, key=lambda g: g["sparsity"])
            if method == "dense" or all(g["sparsity"] == 0 for g in gs):
                mean = gs[0]["scores"][split][0]
                ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"dense fine-tune ({mean:.3f})")
                continue
            xs = [g["sparsity"] for g in gs]
            ys = [g["scores"].get(split, (math.nan, 0))[0] for g in gs]
            err = [g["scores"].get(split, (0, 0))[1] for g in gs]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
        if split in zero and rate in zero[split]:
            ax.axhline(zero[split][rate], color="grey", linestyle=":", linewidth=1, label=f"zero-shot ({zero[split][rate]:.3f})")
        ax.set_xlabel("pool sparsity (target)")
        ax.set_ylabel(f"final {rate.upper()} ({split})")
        ax.set_title(split)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(rows: list[dict], path: Path) -> bool:
    """Learning curves (periodic validation) of every run that has one; False if none has."""
    with_curve = [r for r in rows if r["curve"]]
    if not with_curve:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    rate = next(k for k in ("wer", "per") if k in with_curve[0]["curve"][0])
    for r in with_curve:
        pts = [c for c in r["curve"] if rate in c]
        ax.plot([c["step"] for c in pts], [c[rate] for c in pts], marker=".",
                label=f"{r['method']} {r['target_sparsity']:g}" + (f" seed {r['seed']}" if r["seed"] else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{rate.upper()} ({with_curve[0]['curve'][0]['split']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


_LAYER = re.compile(r"^(?P<layer>.*?\.layers\.\d+)\.(?P<kind>.+)$")


def layer_table(sparsity_csv: Path) -> tuple[list[str], list[str], list[list[float]]]:
    """(layers, tensor kinds, sparsity[layer][kind]) from a run's sparsity.csv."""
    cells: dict[str, dict[str, float]] = OrderedDict()
    kinds: list[str] = []
    with sparsity_csv.open() as f:
        for row in csv.DictReader(f):
            m = _LAYER.match(row["name"])
            layer, kind = (m.group("layer"), m.group("kind")) if m else ("other", row["name"])
            cells.setdefault(layer, {})[kind] = float(row["sparsity"])
            if kind not in kinds:
                kinds.append(kind)
    layers = list(cells)
    return layers, kinds, [[cells[layer].get(k, math.nan) for k in kinds] for layer in layers]


def plot_heatmap(run_dir: Path, path: Path) -> None:
    """Per-layer sparsity of a run: layers × tensor kinds."""
    plt = _pyplot()
    layers, kinds, values = layer_table(run_dir / "sparsity.csv")
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(kinds) + 2), max(3, 0.35 * len(layers) + 1.5)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), [l.removeprefix("model.") for l in layers], fontsize=7)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="sparsity")
    ax.set_title(f"{run_dir.name}: sparsity per layer and tensor")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ mask overlap

def load_run_masks(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = run_dir / "masks.safetensors" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise ParpkitError(f"{run_dir}: no masks.safetensors (a finished run that pruned, or a mask file)")
    try:
        return {k: v.bool() for k, v in load_file(str(path)).items()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ParpkitError(f"{path}: not a readable safetensors mask file ({exc})") from None


def iou(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str] | None = None) -> float:
    """Intersection over union of the kept weights (``True``) over ``names`` (default: all)."""
    names = names if names is not None else list(a)
    inter = sum(int((a[n] & b[n]).sum()) for n in names)
    union = sum(int((a[n] | b[n]).sum()) for n in names)
    return inter / union if union else 1.0


def compare_masks(runs: list[Path], labels: list[str] | None = None) -> dict[str, Any]:
    """IoU matrix of the runs' kept weights, overall and per layer."""
    masks = [load_run_masks(r) for r in runs]
    labels = labels or unique_labels(runs)
    names = list(masks[0])
    for r, m in zip(runs, masks, strict=True):
        if set(m) != set(names) or any(m[n].shape != masks[0][n].shape for n in names):
            raise ParpkitError(f"{r}: its masks cover other tensors or shapes than {runs[0]}'s; compare runs of one model and pool")
    layers: OrderedDict[str, list[str]] = OrderedDict()
    for n in names:
        m = _LAYER.match(n)
        layers.setdefault(m.group("layer") if m else "other", []).append(n)
    k = len(masks)
    overall = [[iou(masks[i], masks[j]) for j in range(k)] for i in range(k)]
    per_layer = {layer: [[iou(masks[i], masks[j], ns) for j in range(k)] for i in range(k)] for layer, ns in layers.items()}
    return {"labels": labels, "overall": overall, "per_layer": per_layer}


def write_overlap(result: dict[str, Any], directory: Path) -> list[Path]:
    """``mask_iou.csv`` (the overall matrix), ``mask_iou_layers.csv`` (run, run, layer, IoU) and
    ``mask_iou.png``."""
    directory.mkdir(parents=True, exist_ok=True)
    labels, overall = result["labels"], result["overall"]
    matrix = directory / "mask_iou.csv"
    with matrix.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *labels])
        for label, row in zip(labels, overall, strict=True):
            w.writerow([label, *[f"{v:.6f}" for v in row]])
    per_layer = directory / "mask_iou_layers.csv"
    with per_layer.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_a", "run_b", "layer", "iou"])
        for layer, m in result["per_layer"].items():
            for i, a in enumerate(labels):
                for j, b in enumerate(labels):
                    if j > i:
                        w.writerow([a, b, layer, f"{m[i][j]:.6f}"])
    plt = _pyplot()
    size = max(4, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(overall, vmin=min(min(r) for r in overall), vmax=1, cmap="magma")
    ax.set_xticks(range(len(labels)), labels, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i, row in enumerate(overall):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=6, color="white" if v < 0.9 else "black")
    fig.colorbar(image, ax=ax, label="IoU of kept weights")
    fig.tight_layout()
    png = directory / "mask_iou.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [matrix, per_layer, png]


# ------------------------------------------------------------------------------------------ choosing a setting

CHOICE_COLUMNS = ["method", "sparsity", "axis", "value", "seeds", "mean", "chosen", "note"]


def choose(rows: list[dict], axis: str, splits: list[str], within: float = 0.0, prefer: str = "lower") -> list[dict]:
    """A rule for choosing one setting per method on validation splits, applied as written before the runs: for
    every method and sparsity, the value of recipe key ``axis`` (``training.learning_rate``) whose runs have the
    lowest error rate averaged over ``splits`` (each split's corpus rate, averaged over the value's seeds); of the
    values within ``within`` of that lowest mean, the ``prefer``-most (``lower`` or ``higher``). A method is the
    runs whose recipes agree in everything but ``axis``, the sparsity, the seed and bookkeeping. One row per
    value, with its mean over the splits, each split's rate (``<rate>_<split>``), ``chosen``, and a note where the
    chosen value is an end of the grid (the rule cannot tell that a value beyond it would not be better), the only
    value run, or where the values were run on different seeds."""
    if prefer not in ("lower", "higher"):
        raise ParpkitError(f"--prefer takes lower or higher, not {prefer!r}")
    if not (_number(within) and 0 <= within < math.inf):
        raise ParpkitError(f"--within is {within!r}: give a tolerance of 0 or more")
    splits = list(dict.fromkeys(splits))
    if not splits:
        raise ParpkitError("choosing needs the splits it is judged on (--by validation,...)")
    rate = next((k for k in ("wer", "per") if all(k in r["splits"].get(sp, {}) for r in rows for sp in splits)), None)
    if rate is None:
        for r in rows:
            if missing := [sp for sp in splits if not any(k in r["splits"].get(sp, {}) for k in ("wer", "per"))]:
                raise ParpkitError(f"{r['run']} was not scored on {', '.join(missing)}; it was on {', '.join(r['splits'])}")
        raise ParpkitError("the runs are scored by different error rates (WER and PER): choose among runs of one kind")
    if axis == "pruning.sparsity":
        raise ParpkitError("--choose pruning.sparsity: the rule chooses a value for every method and sparsity, so it cannot "
                           "choose the sparsity; choose a key the runs vary at each sparsity, such as training.learning_rate")
    if axis.startswith("vars."):
        raise ParpkitError(_variable_advice(rows, axis))
    values: dict[str, Any] = {}
    groups: defaultdict[tuple, defaultdict[Any, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        config = recipe_configuration(Path(r["run"])) or {}
        if axis not in config:
            if inside := [k for k in config if k.startswith(axis + ".")]:
                raise ParpkitError(f"{r['run']}: its {axis} is a mapping ({', '.join(inside)}); choose one of its keys that "
                                   "holds a number")
            raise ParpkitError(f"{r['run']}: its recipe.yaml sets no {axis} (choose by a recipe key the runs set, such "
                               "as training.learning_rate; not the seed or bookkeeping)")
        if not _number(config[axis]):
            raise ParpkitError(f"{r['run']}: {axis} is {config[axis]!r}; choosing compares numbers (the rule prefers "
                               "the lower or the higher of values within --within)")
        values[r["run"]] = config[axis]
        rest = json.dumps({k: v for k, v in config.items() if k not in (axis, "pruning.sparsity")}, sort_keys=True, default=str)
        groups[(rest, r["target_sparsity"])][config[axis]].append(r)
    def label(r: dict) -> str:  # the method's label without the chosen key's value (how method_of adds it)
        token = f"{axis.rsplit('.', 1)[-1]}={axis_text(values[r['run']])}"
        return " ".join(t for t in r["method"].split(" ") if t != token)

    named = sorted(((label(next(iter(by_value.values()))[0]), sparsity, by_value) for (_, sparsity), by_value in groups.items()),
                   key=lambda g: g[:2])
    out = []
    for method, sparsity, by_value in named:
        table = []
        for value, runs in by_value.items():
            per_split = {sp: sum(_rate(r["splits"][sp][rate]) for r in runs) / len(runs) for sp in splits}
            table.append({"method": method, "sparsity": sparsity, "axis": axis, "value": value, "seeds": len(runs),
                          "mean": sum(per_split.values()) / len(splits), **{f"{rate}_{sp}": v for sp, v in per_split.items()},
                          "chosen": False, "note": ""})
        if any(not math.isfinite(t["mean"]) for t in table):
            raise ParpkitError(f"{method} at {sparsity:g}: an error rate on {', '.join(splits)} is not a number")
        table.sort(key=lambda t: t["value"])
        best = min(t["mean"] for t in table)
        near = [t for t in table if t["mean"] <= best + within + 1e-12]
        pick = near[0] if prefer == "lower" else near[-1]
        pick["chosen"] = True
        notes = []
        if len(table) == 1:
            notes.append("the only value tried: nothing was compared")
        elif pick in (table[0], table[-1]):
            notes.append(f"the {'lowest' if pick is table[0] else 'highest'} value tried: a value beyond it may be better")
        if len({tuple(sorted(str(r["seed"]) for r in runs)) for runs in by_value.values()}) > 1:
            notes.append("the values were run on different seeds")
        pick["note"] = "; ".join(notes)
        out += table
    return out


def _variable_advice(rows: list[dict], axis: str) -> str:
    """Why ``--choose vars.NAME`` is refused, and the keys the variable sets: those that hold its value in every run."""
    recipes = [recipe_configuration(Path(r["run"]), without=_NOT_CONFIGURATION - {"vars"}) or {} for r in rows]
    keys = [k for k in recipes[0] if k != axis and not k.startswith("vars.") and all(
        axis in c and c.get(k) == c[axis] for c in recipes)]
    return (f"--choose {axis}: variables are left out of the configuration compared (each run's recipe.yaml holds the "
            f"values they set); choose the key it sets: {', '.join(keys) or 'the recipe key that ${' + axis[5:] + '} is in'}")


def _rate(value: Any) -> float:
    return float(value) if _number(value) else math.nan


def choice_markdown(choices: list[dict]) -> str:
    """The choices as a Markdown table, the chosen value of each method in bold."""
    splits = [k for k in choices[0] if k not in CHOICE_COLUMNS]
    lines = ["| method | sparsity | " + choices[0]["axis"] + " | seeds | mean | " + " | ".join(splits) + " | note |",
             "|---|---|---|---|---|" + "---|" * len(splits) + "---|"]
    for c in choices:
        value = f"**{axis_text(c['value'])}**" if c["chosen"] else axis_text(c["value"])
        lines.append(f"| {_cell(c['method'])} | {c['sparsity']:g} | {value} | {c['seeds']} | {c['mean']:.4f} | "
                     + " | ".join(f"{c[k]:.3f}" for k in splits) + f" | {c['note']} |")
    return "\n".join(lines) + "\n"


def write_choice(choices: list[dict], directory: Path) -> list[Path]:
    """``choice.csv`` (every row of ``choose``) and ``choice.md``."""
    directory.mkdir(parents=True, exist_ok=True)
    splits = [k for k in choices[0] if k not in CHOICE_COLUMNS]
    with (directory / "choice.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CHOICE_COLUMNS[:6] + splits + CHOICE_COLUMNS[6:])
        writer.writeheader()
        writer.writerows(choices)
    (directory / "choice.md").write_text(choice_markdown(choices))
    return [directory / "choice.csv", directory / "choice.md"]


# ------------------------------------------------------------------------------------------ re-prunes

#: what prunes.csv takes of each ``prune`` event (the log's fields)
PRUNE_FIELDS = ("step", "sparsity", "regrown", "pruned_max", "kept_min", "lr_sum")
PRUNE_COLUMNS = ["run", "method", "seed", "target_sparsity", "step", "before_scoring", *PRUNE_FIELDS[1:]]


def prune_events(run_dir: Path) -> list[dict]:
    """The ``prune`` events of a run's log.jsonl in step order, one per step (a run that resumed from a checkpoint
    before a re-prune it had logged logs it again: the later entry is the one the run went on from; the re-prune
    before scoring is kept apart). Unreadable lines are passed over."""
    events: dict[tuple, dict] = {}
    try:
        lines = (run_dir / "log.jsonl").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and e.get("event") == "prune" and _number(e.get("step")):
            events[(e["step"], bool(e.get("before_scoring")))] = e
    return [events[k] for k in sorted(events)]


def write_prunes(rows: list[dict], path: Path) -> bool:
    """``prunes.csv``: one row per (re-)prune of every run (its step, whether it was the one before scoring, the
    weights it let back and how near the mask came to moving; see the log's ``prune`` event). False, and nothing
    written, where no run re-pruned."""
    table = [{"run": r["run"], "method": r["method"], "seed": r["seed"], "target_sparsity": r["target_sparsity"],
              "before_scoring": bool(e.get("before_scoring")), **{k: e.get(k) for k in PRUNE_FIELDS}}
             for r in rows for e in prune_events(Path(r["run"]))]
    if not any(t["regrown"] is not None for t in table):
        path.unlink(missing_ok=True)  # an earlier report's, of other runs
        return False
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PRUNE_COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    return True


# ------------------------------------------------------------------------------------------ all of it

def write_report(rows: list[dict], directory: Path, notes: list[str] | None = None) -> list[Path]:
    """Everything ``parpkit report`` writes: table.md, table.csv, wer_vs_sparsity.png, learning_curves.png
    (where periodic evaluation ran), prunes.csv (where a run re-pruned), heatmaps/<run>.png and the mask overlap
    of the runs that pruned (left out, with a line in ``notes``, when their masks cover different pools)."""
    pruned = [Path(r["run"]) for r in rows if (Path(r["run"]) / "masks.safetensors").is_file() and r["target_sparsity"] > 0]
    overlap = None
    if len(pruned) > 1:
        try:
            overlap = compare_masks(pruned)
        except ParpkitError as exc:
            if notes is None:
                raise
            notes.append(f"no mask overlap: {exc}")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    (directory / "table.md").write_text(markdown(rows))
    write_csv(rows, directory / "table.csv")
    plot_sparsity(rows, directory / "wer_vs_sparsity.png")
    written += [directory / "table.md", directory / "table.csv", directory / "wer_vs_sparsity.png"]
    if plot_curves(rows, directory / "learning_curves.png"):
        written.append(directory / "learning_curves.png")
    if write_prunes(rows, directory / "prunes.csv"):
        written.append(directory / "prunes.csv")
    with_sparsity = [Path(r["run"]) for r in rows if (Path(r["run"]) / "sparsity.csv").is_file()]
    # named by the run's folder, with as many parents as tell two sweeps' same-named points apart (not overwritten)
    for run_dir, label in zip(with_sparsity, unique_labels(with_sparsity), strict=True):
        (directory / "heatmaps").mkdir(exist_ok=True)
        plot_heatmap(run_dir, directory / "heatmaps" / f"{label.replace('/', '__')}.png")
    if (directory / "heatmaps").is_dir():
        written.append(directory / "heatmaps")
    if overlap is not None:
        written += write_overlap(overlap, directory)
    return written
