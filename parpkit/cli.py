"""``parpkit run | validate | sweep | report | compare-masks | export | plugins``."""

from __future__ import annotations

import argparse
import enum
import json
import math
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from parpkit.errors import ParpkitError, RunFailed, UsageError, refused
from parpkit.launchers import LAUNCHERS
from parpkit.progress import Progress
from parpkit.version import __version__


class ExitCode(enum.IntEnum):
    """What ``parpkit``'s exit status says. Scripts and schedulers can tell a recipe to fix from a run to
    look at from a sweep to rerun."""

    #: the command did what it was asked
    OK = 0
    #: a bug in parpkit or a plugin: an unexpected exception, with its traceback
    BUG = 1
    #: refused: the input is wrong. A recipe error (unknown key, bad value, a plugin or option that does not
    #: exist, a pool pattern that matches nothing …), a command line that asks for what cannot be done, data,
    #: model or mask files the recipe names that cannot be used (found as they load, before any evaluation or
    #: training), or input another command cannot use (a report of folders without finished runs). One line
    #: names the file and the key, flag or utterance. Fix the input and run again
    REFUSED = 2
    #: work that had started failed: a run stopped while it evaluated, pruned or trained (the loss became NaN,
    #: the disk filled, a checkpoint could not be written), or points of a sweep failed (each named; the others
    #: finished). Rerunning the same command resumes from the last complete checkpoint (with
    #: ``training.save_steps`` set); after a NaN loss it would meet the same loss: change the recipe and pass ``--fresh``
    FAILED = 3
    #: interrupted (Ctrl-C, SIGINT): a run or sweep stopped where it was; rerunning the same command resumes it
    #: (finished sweep points are skipped). A process killed by a signal gets the shell's 128 + N (SIGTERM
    #: 143, SIGKILL 137) and resumes the same way
    INTERRUPTED = 130


def exit_code(exc: BaseException) -> ExitCode:
    """REFUSED or FAILED for an error written for the user (see ``ExitCode``)."""
    return ExitCode.REFUSED if refused(exc) else ExitCode.FAILED

# tables keep their columns when output goes to a file or pipe (rich would assume 80 columns)
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, soft_wrap=True)


def _load(args):
    from parpkit.recipe import load_recipe
    from parpkit.registry import Plugins
    from parpkit.resolve import resolve

    recipe, mapping = load_recipe(args.recipe, args.set or [])
    return resolve(recipe, Plugins(), str(args.recipe)), mapping


def _structured_pruned(resolved, model, pool: list[str], sparsity: float) -> tuple[int, str]:
    """Pool weights a structured criterion prunes at ``sparsity`` (as the run's pruner selects units: the counts
    per kind and scope, whichever units the scores pick), and the units it removes, by kind."""
    from collections import Counter

    import torch

    from parpkit.engine.lifecycle import pruned_groups
    from parpkit.units import select_units, unit_masks

    groups = {g.name: g for g in pruned_groups(resolved.backbone, resolved.criterion, model, pool)}
    if not groups:
        return 0, "no"
    shapes = {n: p.shape for n, p in model.named_parameters() if n in pool}
    chosen = select_units({n: torch.zeros(g.units) for n, g in groups.items()}, groups, sparsity, resolved.recipe.pruning.scope)
    pruned = sum(int((~m).sum()) for m in unit_masks(chosen, groups, shapes).values())
    kinds = Counter()
    for n, g in groups.items():
        kinds[g.kind] += int(chosen[n].sum())
    return pruned, ", ".join(f"{k:,} {kind}" for kind, k in sorted(kinds.items()))


def cmd_validate(args) -> int:
    from parpkit.engine.lifecycle import preflight
    from parpkit.interfaces import StructuredCriterion
    from parpkit.masks import check_donor_exists
    from parpkit.recipe import read_recipe_file
    from parpkit.registry import Plugins
    from parpkit.resolve import pool_groups, resolve

    def checked(resolved):  # the checks parpkit run makes before it loads anything, and the donor mask's presence
        found = preflight(resolved)
        if resolved.recipe.pruning.mask_from:
            check_donor_exists(resolved.recipe.pruning.mask_from, file=resolved.file)
        return found

    resolved, _ = _load(args)
    model, pool = checked(resolved)
    total = sum(p.numel() for p in model.parameters())
    groups = pool_groups(model, pool)
    r = resolved.recipe
    table = Table(title=f"{r.name}: pruning pool of {r.backbone.name}")
    for col in ("tensor group", "tensors", "parameters"):
        table.add_column(col, justify="left" if col == "tensor group" else "right")
    for g in groups:
        table.add_row(g["group"], str(g["tensors"]), f"{g['parameters']:,}")
    pool_size = sum(g["parameters"] for g in groups)
    table.add_row("[b]pool total[/]", str(len(pool)), f"[b]{pool_size:,}[/]")
    console.print(table)
    s = r.pruning.sparsity
    console.print(f"model parameters: {total:,}; pool: {pool_size:,} ({pool_size / total:.1%} of the model)")
    if isinstance(resolved.criterion, StructuredCriterion):
        pruned, units = _structured_pruned(resolved, model, pool, s)
        console.print(f"at sparsity {s:g} ({r.pruning.scope}): {units} whole units removed, {pruned:,} pool weights pruned "
                      f"= {pruned / pool_size:.1%} of the pool, {pruned / total:.1%} of the model (weights outside "
                      "every unit stay)")
    else:
        console.print(f"at sparsity {s:g} ({r.pruning.scope}): {round(s * pool_size):,} pool weights pruned "
                      f"= {round(s * pool_size) / total:.1%} of the model")
    names = {"backbone": r.backbone.name, "dataset": r.dataset.name, "criterion": r.pruning.criterion.name,
             "schedule": r.pruning.schedule.name}
    for kind, provider in resolved.providers.items():
        console.print(f"{kind}: {names[kind]} ({provider})")
    if isinstance(resolved.criterion, StructuredCriterion):
        console.print("whole units at scope per_tensor: every layer keeps the same width, so `parpkit export` can write a "
                      "plain transformers folder" if r.pruning.scope == "per_tensor" else
                      "whole units at scope global: layers end with different widths, so `parpkit export` writes parpkit's "
                      "compact form (scope per_tensor keeps the widths equal, for plain transformers)")
    if r.sweep:
        from parpkit.sweep import point_recipe, points, sweep_of

        data = read_recipe_file(args.recipe)
        plist = points(sweep_of(data, str(args.recipe)), str(args.recipe))
        plugins = Plugins()
        for point in plist:  # every point passes the same checks before anything runs
            where = f"{args.recipe} (sweep point {point.name})"
            checked(resolve(point_recipe(data, point, args.set or [], where)[0], plugins, where))
        console.print(f"sweep: {len(plist)} points, each valid")
    console.print("[green]recipe is valid[/]")
    return 0


def cmd_plugins(args) -> int:
    from parpkit.registry import Plugins

    plugins = Plugins()
    if args.options:
        return show_plugin(plugins, args.options)
    table = Table(title="registered parpkit plugins")
    for col in ("kind", "name", "class", "provided by"):
        table.add_column(col)
    for kind, registry in plugins.registries.items():
        for e in registry.entries():
            table.add_row(kind, e.name, f"{e.cls.__module__}.{e.cls.__qualname__}", e.provider)
    for name, why in plugins.unavailable.items():
        table.add_row("[red]not loaded[/]", escape(name), escape(why), "")
    console.print(table)
    console.print("`parpkit plugins --options NAME` shows a plugin's options and what it is for")
    return 0


def show_plugin(plugins, name: str) -> int:
    """A plugin's docstring, how the engine constructs it, and its options (type, default, the comment above it)."""
    import inspect

    from parpkit.interfaces import option_docs

    found = [(kind, registry.get(name)) for kind, registry in plugins.registries.items() if name in registry.names()]
    if not found:
        known = ", ".join(sorted({n for r in plugins.registries.values() for n in r.names()}))
        raise ParpkitError(f"--options: no plugin named {name!r}; plugins: {known}")
    for kind, e in found:
        console.print(f"[b]{kind} {e.name}[/] ({e.cls.__module__}.{e.cls.__qualname__}, {escape(e.provider)})", highlight=False)
        console.print(escape(inspect.cleandoc(e.cls.__doc__ or "(no docstring)")), highlight=False)
        console.print(f"constructed as {escape(CONSTRUCTED[kind])}", highlight=False)
        docs = option_docs(e.cls.Options)
        if not e.cls.Options.model_fields:
            console.print("options: none")
            continue
        table = Table(title=f"{e.name} options (recipe: {OPTIONS_KEY[kind]})")
        for col in ("option", "type", "default", "what"):
            table.add_column(col)
        for field, info in e.cls.Options.model_fields.items():
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            kind_text = info.annotation.__name__ if isinstance(info.annotation, type) else str(info.annotation).replace("typing.", "")
            table.add_row(field, escape(kind_text), escape(default), escape(docs.get(field, "")))
        console.print(table)
    return 0


#: how the engine constructs each kind of plugin (the keywords besides the validated options)
CONSTRUCTED = {"backbone": "Backbone(options, cache_dir=<parpkit's cache folder>)",
               "dataset": "Dataset(options, cache_dir=<parpkit's cache folder>)",
               "criterion": "Criterion(options, seed=<the recipe's seed>)",
               "schedule": "Schedule(options, target=<the recipe's pruning.sparsity>)"}
OPTIONS_KEY = {"backbone": "backbone.options", "dataset": "dataset.options", "criterion": "pruning.criterion.options",
               "schedule": "pruning.schedule.options"}


def results_table(metrics: dict) -> Table:
    splits = list(metrics.get("eval_splits") or {metrics["eval_split"]: metrics["eval_utterances"]})
    where = ", ".join(f"{k}: {n} utterances" for k, n in (metrics.get("eval_splits") or {splits[0]: metrics["eval_utterances"]}).items())
    table = Table(title=f"{metrics['recipe']}: {metrics['plugins']['schedule']} at {metrics['target_sparsity']:g} ({where})")
    rates = [k for k in ("wer", "cer", "per") if any(k in m for m in metrics["stages"].values())]
    columns = [(split, r) for split in splits for r in rates]
    table.add_column("stage")
    for split, r in columns:
        table.add_column(r.upper() if len(splits) == 1 else f"{r.upper()} {split}", justify="right")
    table.add_column("pool sparsity", justify="right")
    table.add_column("model sparsity", justify="right")
    names = {"dense": "dense", "after_prune": "after first prune", "final": "final"}
    for stage, m in metrics["stages"].items():
        per_split = m.get("splits") or {splits[0]: m}
        table.add_row(names.get(stage, stage), *[f"{per_split[sp][r]:.3f}" if r in per_split.get(sp, {}) else "" for sp, r in columns],
                      f"{m['pool_sparsity']:.4f}", f"{m['model_sparsity']:.4f}")
    return table


def leave_process_group() -> None:
    """Under torchrun, take this rank's process group down once its part of the run is done. Rank 0 goes on
    alone (final evaluation, writing the run directory) while the others exit; a process that exits with
    the group's threads still running aborts ("terminate called without an active exception", SIGABRT),
    and torchrun then reports the whole run as failed. No barrier: rank 0's evaluation may outlast any
    collective timeout."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cmd_run(args) -> int:
    from parpkit.api import run

    progress = Progress(enabled=not args.quiet, console=err_console)
    result = run(args.recipe, overrides=args.set or [], output_dir=args.output_dir, fresh=args.fresh, resume=args.resume,
                 progress=progress, shared=args.shared)
    leave_process_group()
    metrics = result.metrics
    if metrics:
        try:
            console.print(results_table(metrics))
            console.print(f"pool: {metrics['pool_pruned']:,} of {metrics['pool_parameters']:,} weights are zero; "
                          f"{metrics['steps']} steps, {metrics['prunes']} prunes; wall time {metrics['wall_time_s']['total']:.0f} s")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a metrics.json of an older parpkit
            err_console.print(f"warning: {result.run_dir / 'metrics.json'} lacks what this summary shows ({type(exc).__name__}: "
                              f"{exc}); written by an older parpkit? The run is complete", highlight=False, soft_wrap=True,
                              markup=False)
        console.print(f"run directory: {result.run_dir}")
    return 0


def point_state(run_dir: Path, n_phases: int | None) -> str:
    """A sweep point's state for the sweep's list: blank (not started), ``finished``, ``running now`` (another
    process holds its lock: the sweep will skip it), or ``started`` and where it would resume. Only says: a point
    the list cannot read is named so here and fails (or runs) on its own, never stopping the sweep before it
    starts."""
    from parpkit.engine.checkpoints import resume_state
    from parpkit.engine.rundir import last_logged_update, lock_holder

    try:
        if not (run_dir.is_symlink() or run_dir.exists()):
            return ""
        if not run_dir.is_dir():
            return "not a directory: the point will fail"
        lock = run_dir / ".lock"
        if (lock.is_symlink() or lock.exists()) and not lock.is_file():
            return ".lock is not a file: the point will fail"
        holder = lock_holder(run_dir)
        if holder is not None:
            update = last_logged_update(run_dir)
            return f"running now ({holder}{'' if update is None else f'; last logged update {update}'}): the sweep skips it"
        metrics = run_dir / "metrics.json"
        if metrics.exists():
            try:
                finished = isinstance(json.loads(metrics.read_text()), dict)
            except (OSError, ValueError):
                finished = False
            return "finished" if finished else "metrics.json cannot be read: the point will fail (--fresh runs it again)"
        return f"started, {resume_state(run_dir, n_phases)}" if n_phases else "started"
    except OSError as exc:
        return f"started, unreadable ({exc.strerror or type(exc).__name__})"


def cmd_sweep(args) -> int:
    import dataclasses

    from parpkit.errors import RecipeError
    from parpkit.launchers import Job, Resources, check, launch, require
    from parpkit.recipe import read_recipe_file
    from parpkit.registry import Plugins
    from parpkit.resolve import resolve
    from parpkit.sweep import Point, point_recipe, points, run_command, sweep_of, write_index

    resources = Resources(cpus=args.cpus_per_point, gpus=args.gpus_per_point, address=args.address,
                          partition=args.partition, time_min=args.time_min, max_parallel=args.max_parallel,
                          slurm_local=args.slurm_local)
    check(args.launcher, resources)  # flags the launcher would ignore, counts that are not positive
    if not (args.dry_run or args.print_commands):
        require(args.launcher)  # the extra it needs, named before anything runs
    recipe = Path(args.recipe)
    data = read_recipe_file(recipe)
    where = lambda p: f"{recipe} (sweep point {p.name})"  # noqa: E731  (how errors name a point)
    plist, recipes, seen, dropped = [], {}, {}, []
    for p in points(sweep_of(data, str(recipe)), str(recipe), dropped):  # points whose recipes come out the same run once
        model, mapping = point_recipe(data, p, args.set or [], where(p), runs=not args.only or p.name in args.only)
        key = json.dumps(mapping, sort_keys=True, default=str)
        if key in seen:
            dropped.append((p.name, seen[key]))
            continue
        seen[key] = p.name
        plist.append(p)
        recipes[p.name] = (model, mapping)
    for name, same in dropped:
        err_console.print(f"[yellow]sweep point {name} is the same recipe as {same}: left out[/]", highlight=False)
    every = plist
    if args.only:
        unknown = sorted(set(args.only) - {p.name for p in plist})
        if unknown:
            raise RecipeError(f"no sweep point {', '.join(unknown)}; points: {', '.join(p.name for p in plist)}", file=str(recipe))
        plist = [p for p in plist if p.name in args.only]
    if args.output_dir is not None and not args.output_dir.strip():
        raise UsageError("--output-dir is empty; give the sweep's directory (default: the recipe's output_dir or runs/NAME)")
    # the base recipe's directory (with --set, without any point's overrides): a point whose axes set name or
    # output_dir, picked with --only, still runs inside the sweep's directory
    base, _ = point_recipe(data, Point("base", (), {}), args.set or [], str(recipe))
    out = Path(args.output_dir) if args.output_dir else base.run_dir()
    resources = dataclasses.replace(resources, folder=str(out / "submitit"))
    plugins = Plugins()
    checked = [(p, *recipes[p.name]) for p in plist]
    phases = {}
    for p, model, _ in checked:  # every point resolves before any runs
        resolved = resolve(model, plugins, where(p))
        try:  # for the list's "resumes at": the run checks its schedule's phases itself, with a clear error
            phases[p.name] = len(resolved.schedule.phases(model.training.max_steps))
        except Exception:  # noqa: BLE001 (a plugin's own bug is reported where the point runs)
            phases[p.name] = None
    if args.print_commands:
        for p in plist:
            console.print(run_command(recipe, p, out / p.name, out / "shared", args.set or []), markup=False, highlight=False)
        return 0
    table = Table(title=f"sweep {recipe}: {len(plist)} points into {out}")
    for col in ("point", "overrides", "state"):
        table.add_column(col)
    for p in plist:
        state = point_state(out / p.name, phases[p.name])
        table.add_row(escape(p.name), escape(", ".join(f"{k}={v}" for k, v in p.overrides.items())), escape(state))
    console.print(table)
    if args.dry_run:
        return 0
    write_index(out, recipe, every)
    failed, busy = [], []

    def started(i, job):
        err_console.print(f"[bold]sweep point {i}/{len(checked)}: {job.name}[/]", highlight=False)

    def report(job, outcome):
        if outcome.state == "busy":  # another sweep process runs this point: not a failure of it
            err_console.print(f"[yellow]point {job.name} skipped:[/] {escape(outcome.message)}", highlight=False, soft_wrap=True)
            busy.append(job.name)
        elif outcome.state == "failed":
            err_console.print(f"[bold red]point {job.name} failed:[/] {escape(outcome.message)}", highlight=False, soft_wrap=True)
            failed.append(job.name)
        elif outcome.state == "unexpected":  # a bug in one point: the others still run; its traceback is shown
            if outcome.traceback:
                err_console.print(escape(outcome.traceback), highlight=False, soft_wrap=True)
            err_console.print(f"[bold red]point {job.name} failed unexpectedly:[/] {escape(outcome.message)}",
                              highlight=False, soft_wrap=True)
            failed.append(job.name)

    jobs = [Job(p.name, mapping, str(out / p.name), str(out / "shared"), where(p)) for p, _, mapping in checked]
    launch(args.launcher, jobs, resources, args.quiet, started, report)
    done = len(checked) - len(failed) - len(busy)
    running = f", {len(busy)} running in another process ({', '.join(busy)})" if busy else ""
    console.print(f"sweep: {done} of {len(checked)} points finished in {out}{running}; "
                  f"`parpkit report {out}` tabulates and plots them", markup=False)
    if failed:
        raise RunFailed(f"{len(failed)} sweep point(s) failed: {', '.join(failed)}; rerun the sweep to retry them")
    return 0


def cmd_export(args) -> int:
    from parpkit.export import export

    if args.compact and args.format not in (None, "compact"):
        raise ParpkitError(f"--compact is --format compact; it cannot go with --format {args.format}")
    r = export(Path(args.run_dir), "compact" if args.compact else args.format, Path(args.output_dir) if args.output_dir else None,
               args.quantization)
    fmt = r["format"]
    why = " (the smallest form this run allows; --format chooses another)" if r["chosen"] else ""
    if "removed_neurons" in r:
        console.print(f"removed {r['removed_neurons']:,} of {r['neurons']:,} FFN neurons and {r['removed_heads']} of "
                      f"{r['heads']} attention heads: {r['parameters_before']:,} -> {r['parameters_after']:,} parameters")
    zeros = r.get("zeros_kept") or {}
    if any(zeros.values()):
        console.print(f"kept as zeros (the config cannot express their removal): {zeros['ffn']:,} FFN neurons, "
                      f"{zeros['heads']} attention heads; --format compact drops them too")
    if r.get("config"):
        console.print("config: " + ", ".join(f"{k} = {v}" for k, v in r["config"].items()))
    if "bytes" in r and r.get("dense_bytes"):
        console.print(f"{r['dropped']:,} zero weights left out: {r['bytes']:,} bytes against {r['dense_bytes']:,} for "
                      f"model.safetensors ({r['bytes'] / r['dense_bytes']:.1%}); reads back bit for bit")
    if r.get("max_abs_difference") is not None:
        console.print(f"largest output difference against the run's model: {r['max_abs_difference']:.2e}"
                      + (f" ({r['difference_of']})" if r.get("difference_of") else ""))
    console.print(f"wrote {fmt}{why}: {r['output']} (load with {r['load']})")
    return 0


def cmd_report(args) -> int:
    from parpkit.report import choose, collect, compare, family, grouped, write_csv, write_report

    if not args.choose and (args.by or args.within or args.prefer):
        raise UsageError("--by, --within and --prefer go with --choose KEY (the recipe key to choose)")
    if args.choose and not args.by:
        raise UsageError("--choose needs --by: the (validation) splits the choice is judged on, comma-separated")
    if not 0 <= args.within < math.inf:
        raise UsageError(f"--within is {args.within}: give a tolerance of 0 or more")
    if not 100 <= args.resamples <= 1_000_000:
        raise UsageError(f"--resamples is {args.resamples}: give 100 to 1,000,000 (fewer draws give noisy intervals; "
                         "each draw holds an index per utterance in memory)")
    if args.speaker_pattern is not None:
        if not args.compare:
            raise UsageError("--speaker-pattern goes with --compare A B (it groups the speakers of its speaker bootstrap)")
        try:
            re.compile(args.speaker_pattern)
        except re.error as e:
            raise UsageError(f"--speaker-pattern '{args.speaker_pattern}' is not a regular expression: {e}") from None
    seen: dict[frozenset, tuple[str, str]] = {}
    for a, b in args.compare or []:  # one pair twice (either way round) would count twice in Holm's family
        if frozenset((a, b)) in seen and a != b:
            raise UsageError(f"--compare {a} {b} given twice ({' '.join(seen[frozenset((a, b))])} before): each pair once, "
                             "so that Holm's family counts it once")
        seen[frozenset((a, b))] = (a, b)
    paths = [Path(p) for p in args.runs]
    rows, skipped = collect(paths)
    by = [split.strip() for split in (args.by or "").split(",") if split.strip()]
    choices = choose(rows, args.choose, by, args.within, args.prefer or "lower") if args.choose else None
    # one family: Holm over every row; refused (an unknown method, no per-utterance errors …) before anything is written
    pairs = (family([p for a, b in args.compare for p in compare(rows, a, b, resamples=args.resamples,
                                                                      speaker_pattern=args.speaker_pattern)])
             if args.compare else None)
    for problem in skipped:
        err_console.print(f"[yellow]skipped[/] {escape(problem)}", highlight=False, soft_wrap=True)
    groups = grouped(rows)
    splits = list(dict.fromkeys(s for g in groups for s in g["splits"]))
    rate = groups[0]["rate"].upper()
    table = Table(title=f"{len(rows)} runs: final error rates against sparsity")
    for col in ("method", "sparsity", "seeds", *[f"{rate} {s}" for s in splits], "pool sparsity", "mask IoU with first", "steps"):
        table.add_column(col, justify="left" if col == "method" else "right")
    fmt = lambda v: "" if v != v else f"{v:.3f}"  # noqa: E731  (NaN: not measured)
    for g in groups:
        scores = [g["scores"].get(s, (math.nan, math.nan)) for s in splits]  # runs scored on other splits
        table.add_row(escape(g["method"]), f"{g['sparsity']:g}", str(g["seeds"]),
                      *[fmt(m) + (f" ± {d:.3f}" if g["seeds"] > 1 and d == d else "") for m, d in scores],
                      f"{g['pool_sparsity']:.4f}", fmt(g["mask_iou_initial"][0]), str(g["steps"]))
    console.print(table)
    if args.csv:
        write_csv(rows, Path(args.csv))
        console.print(f"wrote {args.csv}")
    out = Path(args.output_dir) if args.output_dir else (paths[0] / "report" if len(paths) == 1 and (paths[0] / "sweep.json").is_file() else None)
    if out is not None:
        notes: list[str] = []
        for path in write_report(rows, out, notes):
            console.print(f"wrote {path}")
        for note in notes:
            err_console.print(f"[yellow]{escape(note)}[/]", highlight=False, soft_wrap=True)
    if choices is not None:
        report_choice(args, choices, out)
    if pairs is not None:
        from parpkit.report import compare_markdown, family_note, interval_cells, write_compare_csv

        table = Table(title="final error rate of A minus B: paired bootstrap over utterances, over seeds too (where both "
                            "have several), paired t over seeds, bootstrap over speakers")
        level = f"{pairs[0]['level']:.0%} interval"
        for col in ("A", "B", "sparsity", "split", "seeds", "A − B", level, "P(A worse)", f"{level}, seeds too",
                    "P(A worse), seeds too", "paired t", "paired seeds", "Holm p (t)", f"{level}, speakers", "speakers",
                    "Holm p (speakers)"):
            table.add_column(col, justify="left" if col in ("A", "B", "split") else "right")
        for p in pairs:
            table.add_row(escape(p["a"]), escape(p["b"]), f"{p['sparsity']:g}", p["split"], f"{p['seeds_a']}/{p['seeds_b']}",
                          f"{p['difference']:+.4f}", *interval_cells(p))
        console.print(table)
        console.print(family_note(pairs), soft_wrap=True, markup=False)
        for p in pairs:
            if p["notes"]:
                console.print(f"{p['a']} − {p['b']} at {p['sparsity']:g}, {p['split']}: {p['notes']}", soft_wrap=True,
                              markup=False)
        if out is not None:
            (out / "compare.md").write_text(compare_markdown(pairs))
            write_compare_csv(pairs, out / "compare.csv")
            console.print(f"wrote {out / 'compare.md'} and {out / 'compare.csv'}")
    if out is None:  # printed only: say how to keep it
        err_console.print("printed only: --output-dir DIR writes table.md, table.csv and the plots"
                          + (", compare.md and compare.csv" if pairs is not None else "")
                          + (", choice.md and choice.csv" if choices is not None else ""), highlight=False)
    return 0


def report_choice(args, choices: list[dict], out: Path | None) -> None:
    """``parpkit report --choose KEY --by SPLITS``: the rule's table, printed and (with an output folder) written."""
    from parpkit.report import CHOICE_COLUMNS, write_choice

    splits = [k for k in choices[0] if k not in CHOICE_COLUMNS]  # <rate>_<split>, as choose deduplicated them
    table = Table(title=f"{args.choose} chosen on the mean of {', '.join(k.split('_', 1)[1] for k in splits)}"
                        + (f" (within {args.within:g}: the {args.prefer or 'lower'} value)" if args.within else ""))
    for col in ("method", "sparsity", args.choose, "seeds", "mean", *splits, "chosen", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    for c in choices:
        table.add_row(escape(c["method"]), f"{c['sparsity']:g}", f"{c['value']:g}", str(c["seeds"]), f"{c['mean']:.4f}",
                      *[f"{c[k]:.3f}" for k in splits], "yes" if c["chosen"] else "", escape(c["note"]))
    console.print(table)
    if out is not None:
        for path in write_choice(choices, out):
            console.print(f"wrote {path}")


def cmd_compare_masks(args) -> int:
    from parpkit.report import compare_masks, write_overlap

    result = compare_masks([Path(r) for r in args.runs])
    table = Table(title="intersection over union of the kept weights")
    table.add_column("run")
    for label in result["labels"]:
        table.add_column(escape(label), justify="right")
    for label, row in zip(result["labels"], result["overall"], strict=True):
        table.add_row(escape(label), *[f"{v:.4f}" for v in row])
    console.print(table)
    if args.output_dir:
        for path in write_overlap(result, Path(args.output_dir)):
            console.print(f"wrote {path}")
    return 0


def output_dir_flag(parser: argparse.ArgumentParser, text: str) -> None:
    """``--output-dir DIR``, one name for where every command writes; ``--output`` (the old spelling of
    report, compare-masks and export) is still accepted, and not shown."""
    parser.add_argument("--output-dir", metavar="DIR", help=text)
    parser.add_argument("--output", dest="output_dir", metavar="DIR", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parpkit", description="Pluggable pruning for speech recognition models")
    parser.add_argument("--version", action="version", version=f"parpkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in (("run", cmd_run, "prune and fine-tune as a recipe says"),
                           ("validate", cmd_validate, "resolve a recipe and show what would be pruned")):
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", help="YAML recipe file")
        p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a recipe key (repeatable)")
        p.set_defaults(fn=fn)
    output_dir_flag(sub.choices["run"], "run directory (default: the recipe's output_dir or runs/NAME)")
    sub.choices["run"].add_argument("--quiet", action="store_true", help="no progress bars")
    sub.choices["run"].add_argument("--shared", metavar="DIR", help="folder of work other runs repeat (a sweep's SWEEP_DIR/shared): "
                                                     "looked up and added to; never changes a result")
    again = sub.choices["run"].add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint; an error if there is none (without the flag, "
                            "a run directory with a checkpoint is resumed and one without starts afresh)")
    again.add_argument("--fresh", action="store_true", help="discard checkpoints and results in the run directory")
    p = sub.add_parser("sweep", help="run every point of a recipe's sweep: section (finished points are skipped, "
                                     "killed ones resume)")
    p.add_argument("recipe", help="YAML recipe file with a sweep: section")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a key of every point (repeatable); refused where a point that runs sets the key itself")
    output_dir_flag(p, "sweep directory (default: the recipe's output_dir or runs/NAME)")
    p.add_argument("--only", action="append", metavar="POINT", help="run only this point (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="where the points run: one after another in this process (default), as Ray tasks "
                        "(pip install 'parpkit[ray]'), or as Slurm jobs through submitit (pip install 'parpkit[slurm]')")
    p.add_argument("--cpus-per-point", type=float, metavar="N", help="ray, slurm: CPUs each point asks for (ray's default: 1)")
    p.add_argument("--gpus-per-point", type=float, metavar="N", help="ray, slurm: GPUs each point asks for (default: none)")
    p.add_argument("--address", help="ray: the cluster to join (default: start a local Ray instance)")
    p.add_argument("--partition", metavar="NAME", help="slurm: the partition")
    p.add_argument("--time-min", type=int, metavar="MINUTES", help="slurm: each point's time limit in minutes")
    p.add_argument("--max-parallel", type=int, metavar="N", help="slurm: points running at once (the job array's parallelism)")
    p.add_argument("--slurm-local", action="store_true",
                   help="slurm: run the jobs as local processes (submitit's LocalExecutor), for testing without a cluster")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="list the points and their state (finished, or where a started one would resume) and check their "
                           "recipes; run nothing")
    mode.add_argument("--print-commands", action="store_true",
                      help="print one `parpkit run` command per point (for a scheduler, or one process per GPU)")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("export", help="write a run's model in a smaller or deployable form (plain transformers with pruned "
                                      "neurons removed, compact, sparse, or a backbone's own such as whisper's ct2)")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--format", help="transformers (plain, removed FFN neurons dropped where all layers keep one width), compact "
                                    "(every removed neuron and head dropped; parpkit.load_compact), sparse (bitmask + kept "
                                    "values; parpkit.load_sparse), or a backbone's own (whisper: ct2, for faster-whisper); "
                                    "default: the smallest the run allows")
    p.add_argument("--compact", action="store_true", help="same as --format compact")
    p.add_argument("--quantization", help="for a backbone's formats: e.g. int8 for ct2 (default: the weights' own type)")
    output_dir_flag(p, "where to write it (default RUN_DIR/FORMAT)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("report", help="finished runs in one table, and (with --output-dir, or for a sweep) Markdown, CSV and plots")
    p.add_argument("runs", nargs="+", help="run directories, or folders holding them (a sweep directory)")
    p.add_argument("--csv", metavar="FILE", help="also write one row per run to this CSV file")
    output_dir_flag(p, "write table.md, table.csv, wer_vs_sparsity.png, learning_curves.png, heatmaps/ and the mask "
                       "overlap here (default for a sweep directory: SWEEP_DIR/report)")
    p.add_argument("--compare", nargs=2, action="append", metavar=("A", "B"),
                   help="method A against method B: the difference of final error rates with a paired bootstrap interval "
                        "over utterances, one over seeds and utterances where both have several seeds, a paired t-interval "
                        "over the seeds both ran and a bootstrap over speakers, at every sparsity and split both have, with "
                        "Holm-adjusted p over all rows (repeatable; written to compare.md and compare.csv)")
    p.add_argument("--resamples", type=int, default=2000, metavar="N",
                   help="bootstrap draws of --compare's intervals (default 2000); no bootstrap p falls below 2/(N+1), so "
                        "a table of many rows needs more for its Holm p to show a difference")
    p.add_argument("--speaker-pattern", metavar="REGEX",
                   help="with --compare: group the transcripts' speaker names into the speakers its bootstrap resamples, "
                        "by this regular expression's match (its first group, if it has one), where a dataset names one "
                        "voice several ways: '^[^@]+' drops the rate and pitch the synthetic corpora add "
                        "(flite:slt@1.18/97 -> flite:slt). Default: each name its own speaker")
    p.add_argument("--choose", metavar="KEY", help="a recipe key the runs vary (training.learning_rate): for every method "
                   "and sparsity, the value whose runs have the lowest error rate averaged over the --by splits (written "
                   "to choice.md and choice.csv)")
    p.add_argument("--by", metavar="SPLIT,...", help="with --choose: the splits it is judged on, comma-separated (validation "
                   "splits: never the ones you report)")
    p.add_argument("--within", type=float, default=0.0, metavar="X",
                   help="with --choose: values whose mean is within X of the lowest count as tied (default 0)")
    p.add_argument("--prefer", choices=("lower", "higher"),
                   help="with --choose: of tied values, take this one (default: lower)")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("compare-masks", help="intersection over union of the kept weights between runs (matrix, per layer)")
    p.add_argument("runs", nargs="+", help="run directories (their masks.safetensors) or mask files")
    output_dir_flag(p, "write mask_iou.csv, mask_iou_layers.csv and mask_iou.png here")
    p.set_defaults(fn=cmd_compare_masks)
    p = sub.add_parser("plugins", help="list registered backbones, criteria, schedules and datasets")
    p.add_argument("--options", metavar="NAME", help="show one plugin: what it does, how it is constructed, its options")
    p.set_defaults(fn=cmd_plugins)
    return parser


def _quiet_transformers() -> None:
    """parpkit reports progress itself; transformers' own bars and advice would interleave with it."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def disk_full(exc: BaseException, *folders: Path) -> bool:
    """Whether an error (or one it was raised from) says the disk is full, or came while one of ``folders``
    had under 64 MiB free. Writers other than Python's own raise their own types: safetensors has ENOSPC
    only in its message, and torch.save only "unexpected pos"."""
    import errno
    import shutil

    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        if getattr(seen, "errno", None) == errno.ENOSPC or "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    for folder in folders:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            if shutil.disk_usage(folder).free < 64 * 2**20:
                return True
        except OSError:
            pass
    return False


def main(argv: list[str] | None = None) -> int:
    """The ``parpkit`` command; returns an ``ExitCode``."""
    args = build_parser().parse_args(argv)  # a command line it cannot parse: argparse exits 2 (REFUSED)
    _quiet_transformers()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume (finished runs and sweep points are kept)")
        return ExitCode.INTERRUPTED
    except Exception as exc:
        if isinstance(exc, ParpkitError):
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            return exit_code(exc)
        resume = "free space and rerun the same command: runs resume from their last complete checkpoint"
        if isinstance(exc, OSError):  # a full disk, a read-only or missing folder: say which file, no traceback
            where = f"{exc.filename}: " if exc.filename else ""
            what = exc.strerror or str(exc)
            if isinstance(exc, (FileExistsError, NotADirectoryError)) and exc.filename:
                blocker = next((p for p in (Path(exc.filename), *Path(exc.filename).parents) if p.is_file()), None)
                if blocker is not None:  # a folder was asked for where a file is
                    where, what = f"{blocker}: ", "is a file; expected a folder"
            full = disk_full(exc)
            hint = f"; {resume}" if full else ""
            err_console.print(f"[bold red]error:[/] {escape(where + what + hint)}", highlight=False, soft_wrap=True)
            return ExitCode.FAILED if full else exit_code(exc)
        folders = [Path.cwd(), *([Path(args.output_dir).absolute()] if getattr(args, "output_dir", None) else [])]
        if disk_full(exc, *folders):  # safetensors' and torch's writers raise their own error types
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            err_console.print(f"[bold red]error:[/] the disk is full ({escape(first)}); {resume}", highlight=False,
                              soft_wrap=True)
            return ExitCode.FAILED
        raise  # a bug: keep the traceback (the interpreter exits 1)


if __name__ == "__main__":
    sys.exit(main())
