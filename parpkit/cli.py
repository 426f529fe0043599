"""``parpkit run | validate | plugins``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from parpkit.errors import ParpkitError
from parpkit.progress import Progress

# tables keep their columns when output goes to a file or pipe (rich would assume 80 columns)
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, soft_wrap=True)


def _load(args):
    from parpkit.recipe import load_recipe
    from parpkit.registry import Plugins
    from parpkit.resolve import resolve

    recipe, mapping = load_recipe(args.recipe, args.set or [])
    return resolve(recipe, Plugins(), str(args.recipe)), mapping


def cmd_validate(args) -> int:
    from parpkit.resolve import pool_groups

    resolved, _ = _load(args)
    resolved.dataset.check()
    model = resolved.backbone.skeleton()
    pool = resolved.select_pool(model)
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
    console.print(f"at sparsity {s:g} ({r.pruning.scope}): {round(s * pool_size):,} pool weights pruned "
                  f"= {round(s * pool_size) / total:.1%} of the model")
    names = {"backbone": r.backbone.name, "dataset": r.dataset.name, "criterion": r.pruning.criterion.name,
             "schedule": r.pruning.schedule.name}
    for kind, provider in resolved.providers.items():
        console.print(f"{kind}: {names[kind]} ({provider})")
    console.print("[green]recipe is valid[/]")
    return 0


def cmd_plugins(args) -> int:
    from parpkit.registry import Plugins

    plugins = Plugins()
    table = Table(title="registered parpkit plugins")
    for col in ("kind", "name", "class", "provided by"):
        table.add_column(col)
    for kind, registry in plugins.registries.items():
        for e in registry.entries():
            table.add_row(kind, e.name, f"{e.cls.__module__}.{e.cls.__qualname__}", e.provider)
    console.print(table)
    return 0


def results_table(metrics: dict) -> Table:
    table = Table(title=f"{metrics['recipe']}: {metrics['plugins']['schedule']} at {metrics['target_sparsity']:g} "
                        f"({metrics['eval_split']}, {metrics['eval_utterances']} utterances)")
    rates = [k for k in ("wer", "cer", "per") if any(k in m for m in metrics["stages"].values())]
    for col in ("stage", *[r.upper() for r in rates], "pool sparsity", "model sparsity"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    names = {"dense": "dense", "after_prune": "after first prune", "final": "final"}
    for stage, m in metrics["stages"].items():
        table.add_row(names.get(stage, stage), *[f"{m[r]:.3f}" if r in m else "" for r in rates],
                      f"{m['pool_sparsity']:.4f}", f"{m['model_sparsity']:.4f}")
    return table


def cmd_run(args) -> int:
    from parpkit.api import run

    progress = Progress(enabled=not args.quiet, console=err_console)
    result = run(args.recipe, overrides=args.set or [], output_dir=args.output_dir, fresh=args.fresh, resume=args.resume,
                 progress=progress)
    metrics = result.metrics
    if metrics:
        console.print(results_table(metrics))
        console.print(f"pool: {metrics['pool_pruned']:,} of {metrics['pool_parameters']:,} weights are zero; "
                      f"{metrics['steps']} steps, {metrics['prunes']} prunes; wall time {metrics['wall_time_s']['total']:.0f} s")
        console.print(f"run directory: {result.run_dir}")
    return 0


def cmd_export(args) -> int:
    from parpkit.export import export_compact

    if not args.compact:
        raise ParpkitError("export writes a compact model: pass --compact")
    r = export_compact(Path(args.run_dir), Path(args.output) if args.output else None)
    console.print(f"removed {r['removed_neurons']:,} of {r['neurons']:,} FFN neurons and {r['removed_heads']} of "
                  f"{r['heads']} attention heads: {r['parameters_before']:,} -> {r['parameters_after']:,} parameters")
    console.print(f"largest output difference against the masked model: {r['max_abs_difference']:.2e}")
    console.print(f"compact model: {r['output']} (load with parpkit.load_compact)")
    return 0


def cmd_report(args) -> int:
    from parpkit.report import collect, write_csv

    rows = collect([Path(p) for p in args.runs])
    rates = [k for k in ("wer", "cer", "per") if any(r[k] is not None for r in rows)]
    table = Table(title=f"{len(rows)} runs: final error rates against sparsity")
    for col in ("run", "schedule", "criterion", "target", "pool sparsity", *[r.upper() for r in rates], "dense " + rates[0].upper(), "steps"):
        table.add_column(col, justify="left" if col in ("run", "schedule", "criterion") else "right")
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        table.add_row(Path(r["run"]).name, r["schedule"], r["criterion"], f"{r['target_sparsity']:g}", f"{r['pool_sparsity']:.4f}",
                      *[fmt(r[k]) for k in rates], fmt(r["dense_" + rates[0]]), str(r["steps"]))
    console.print(table)
    if args.csv:
        write_csv(rows, Path(args.csv))
        console.print(f"wrote {args.csv}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parpkit", description="Pluggable pruning for speech recognition models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in (("run", cmd_run, "prune and fine-tune as a recipe says"),
                           ("validate", cmd_validate, "resolve a recipe and show what would be pruned")):
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe", help="YAML recipe file")
        p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a recipe key (repeatable)")
        p.set_defaults(fn=fn)
    sub.choices["run"].add_argument("--output-dir", help="run directory (default: the recipe's output_dir or runs/NAME)")
    sub.choices["run"].add_argument("--quiet", action="store_true", help="no progress bars")
    again = sub.choices["run"].add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from the newest complete checkpoint; an error if there is none (without the flag, "
                            "a run directory with a checkpoint is resumed and one without starts afresh)")
    again.add_argument("--fresh", action="store_true", help="discard checkpoints and results in the run directory")
    p = sub.add_parser("export", help="write a smaller model without the pruned neurons and heads")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--compact", action="store_true", help="remove pruned FFN neurons and attention heads")
    p.add_argument("--output", help="where to write it (default RUN_DIR/compact)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("report", help="one table (and CSV) of finished runs: error rates against sparsity")
    p.add_argument("runs", nargs="+", help="run directories, or folders holding them")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("plugins", help="list registered backbones, criteria, schedules and datasets")
    p.set_defaults(fn=cmd_plugins)
    return parser


def _quiet_transformers() -> None:
    """parpkit reports progress itself; transformers' own bars and advice would interleave with it."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        return args.fn(args)
    except ParpkitError as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
