"""``packnet report``: what PackNet costs in storage, against separate networks and Piggyback."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

import packnet_export as pn
from packnet_export.errors import PackNetError
from packnet_export.files import output_file

from . import options
from .common import err, handle_errors, out, print_json, styled


@handle_errors
def report_command(
    ckpt: Path | None = typer.Argument(None, help="Checkpoint to report on (omit with --plan)."),
    plan: bool = typer.Option(False, "--plan", help="Report on a model before training it: owners as the "
                              "pruning schedule assigns them (needs --arch and --tasks)."),
    arch: str | None = typer.Option(None, "--arch", help="With --plan: " + options.ARCH_HELP),
    tasks: str | None = typer.Option(None, "--tasks", help="With --plan: NAME:CLASSES,... in training order, "
                                     "e.g. imagenet:1000,cubs:200,cars:196,flowers:102."),
    prune: str | None = typer.Option(None, "--prune", help="With --plan: fraction freed by each task, e.g. "
                                     "0.5,0.75,0.75,0 (default: 0.5 for the first task, 0.75 after)."),
    image_size: int | None = typer.Option(None, "--image-size", help="With --plan: input size in pixels "
                                          "(default: the architecture's)."),
    width: int | None = typer.Option(None, "--width", help="With --plan: base width of vgg_mini."),
    per_task_norm: bool = typer.Option(False, "--per-task-norm", help="With --plan: every task stores its own "
                                       "batch norm and biases."),
    exports: Path | None = typer.Option(None, "--exports", help="Folder of exported ONNX files to measure."),
    skip_unreadable: bool = typer.Option(False, "--skip-unreadable", help="With --exports: list .onnx files that "
                                         "are not readable graphs of this project as skipped, with the reason, "
                                         "instead of stopping with exit 2."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Also show the owners of every layer."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (schema: docs/report.md)."),
    markdown: Path | None = typer.Option(None, "--markdown", help="Also write the report as Markdown here."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write a PNG: storage per approach and "
                                     "owners per layer."),
) -> None:
    """Storage bit-cost of PackNet against separate networks, before training (--plan) or after it.

    Per task: weights owned and used, and the free capacity left; then the bits of separate
    networks, PackNet as the paper counts it, the official one-byte mask, the entropy bound,
    Piggyback, and (with --exports) the files on disk.
    """
    markdown = None if markdown is None else output_file(markdown, "--markdown")  # before the work, not after
    plot = None if plot is None else output_file(plot, "--plot")
    if plan:
        if ckpt is not None:
            raise PackNetError("give either a checkpoint or --plan, not both")
        if arch is None or tasks is None:
            raise PackNetError("--plan needs --arch and --tasks, e.g. --plan --arch vgg16 "
                               "--tasks imagenet:1000,cubs:200 --prune 0.5,0")
        result = pn.plan(arch, tasks, prune=prune, image_size=image_size, width=width, per_task_norm=per_task_norm,
                         exports=exports, skip_unreadable=skip_unreadable)
    else:
        if ckpt is None:
            raise PackNetError("give a checkpoint, or --plan --arch ARCH --tasks NAME:CLASSES,...")
        stray = [n for n, v in (("--arch", arch), ("--tasks", tasks), ("--prune", prune),
                                ("--image-size", image_size), ("--width", width)) if v is not None]
        if stray or per_task_norm:
            raise PackNetError(f"{(stray or ['--per-task-norm'])[0]} applies to --plan only; a checkpoint "
                               "already records it")
        result = pn.report(ckpt, exports=exports, skip_unreadable=skip_unreadable)
    _write_and_print(result.to_dict(), markdown, plot, per_layer, as_json)


def _write_and_print(result: dict, markdown: Path | None, plot: Path | None, per_layer: bool, as_json: bool) -> None:
    from packnet_export import checkpoint
    from packnet_export import storage as report

    if markdown is not None:
        text = report.render_markdown(result, per_layer=per_layer)
        with checkpoint.atomic_path(markdown, "w", param="--markdown") as handle:
            handle.write(text)
    if plot is not None:
        report.plot_report(result, plot)
    if as_json:
        print_json(result)
    else:
        _print_tables(result, per_layer)
    for path, what in ((markdown, "Markdown"), (plot, "plot")):
        if path is not None:
            err.print(f"wrote {what} to {path}")


def _print_tables(r: dict, per_layer: bool) -> None:
    from packnet_export import storage as report

    n = r["prunable_weights"]
    src = r["checkpoint"] or "plan"
    out.print(styled(str(src), "bold"), f": {r['arch']} {r['arch_kwargs'] or ''} at {r['image_size']} px, "
              f"{n:,} prunable weights, {r['norm_bias_params']:,} norm/bias parameters "
              f"({'per task' if r['per_task_norm'] else 'shared'}), {r['num_tasks']} task(s)", sep="")
    tasks = Table(title="Tasks")
    for col in ("#", "task", "classes", "pruned", "owned", "used (cumulative)", "head params"):
        tasks.add_column(col, justify="left" if col == "task" else "right")
    for t in r["tasks"]:
        tasks.add_row(str(t["task"]), t["name"], str(t["classes"]), f"{t['prune']:.0%}",
                      f"{t['owned']:,} ({t['owned_fraction']:.1%})", f"{t['used']:,} ({t['used_fraction']:.1%})",
                      f"{t['head_params']:,}")
    out.print(tasks)
    out.print(f"free capacity for future tasks: {r['free']:,} weights ({r['free_fraction']:.1%})")
    if per_layer:
        layers = Table(title="Owners per layer")
        layers.add_column("layer")
        for col in ("weights", "free", *[t["name"] for t in r["tasks"]]):
            layers.add_column(col, justify="right")
        for row in r["layers"]:
            layers.add_row(row["layer"], f"{row['weights']:,}", f"{row['free']:,}",
                           *[f"{v:,}" for v in row["owned"]])
        out.print(layers)
    storage = Table(title=f"Storage (MB = 10^6 bytes; owner values {r['owner_values_present']} -> "
                          f"{r['mask_bits_per_weight']} bit(s)/weight, entropy "
                          f"{r['owner_entropy_bits_per_weight']:.3f})")
    for col in ("approach", "bits", "bytes", "MB", "vs separate"):
        storage.add_column(col, justify="left" if col == "approach" else "right")
    for key, s in r["storage"].items():
        storage.add_row(report.SHORT_LABELS[key], f"{s['bits']:,}", f"{s['bytes']:,}", f"{s['megabytes']:,.3f}",
                        "-" if s["ratio_to_separate"] is None else f"{s['ratio_to_separate']:.3f}x")
    out.print(storage)
    if r["files"]:
        files = Table(title="Files on disk")
        for col in ("file", "kind", "task", "bytes", "MB", "theory MB", "vs separate"):
            files.add_column(col, justify="left" if col in ("file", "kind", "task") else "right")
        for f in r["files"]:
            parts = f" (+{len(f['parts']) - 1} sidecar)" if len(f["parts"]) > 1 else ""
            files.add_row(Path(f["path"]).name + parts, report.kind_label(f), f["task"] or "-", f"{f['bytes']:,}",
                          f"{f['megabytes']:,.3f}",
                          "-" if f["reference_bytes"] is None else f"{f['reference_bytes'] / report.MEGABYTE:,.3f}",
                          "-" if f["ratio_to_separate"] is None else f"{f['ratio_to_separate']:.3f}x")
        out.print(files)
        for f in r["files"]:
            if f["kind"] == "skipped":
                err.print(f"skipped: {f['reason']}", soft_wrap=True, markup=False, highlight=False)
