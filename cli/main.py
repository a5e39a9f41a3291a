"""``packnet``: train PackNet models task by task, inspect, evaluate, export and report them."""

from __future__ import annotations

from pathlib import Path

import typer

import packnet_export as pn
from packnet_export.errors import PackNetError

from . import options
from .common import Group, err, handle_errors, out, print_json, styled

app = typer.Typer(
    name="packnet",
    help="Pack several image classification tasks into one network with PackNet "
    "(Mallya & Lazebnik, CVPR 2018), then export each task to ONNX.\n\n"
    "Typical session:\n\n"
    "  packnet init --arch vgg_mini -o model.safetensors\n\n"
    "  packnet add-task model.safetensors --name flowers --data data/flowers\n\n"
    "  packnet add-task model.safetensors --name cars --data data/cars\n\n"
    "  packnet-export --checkpoint model.safetensors --task cars",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=Group,
)


def _parse_arch_kwargs(text: str | None) -> dict:
    import json

    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PackNetError(f"--arch-kwargs is not JSON ({exc.msg}); e.g. '{{\"width_mult\": 0.5}}'"
                                      ) from None
    if not isinstance(value, dict):
        raise PackNetError("--arch-kwargs must be a JSON object of argument names and values")
    return value


def _print_architectures(as_json: bool) -> None:
    from rich import box
    from rich.table import Table

    from packnet_export import models

    archs = models.list_architectures()
    if as_json:
        print_json(archs)
        return
    table = Table(box=box.SIMPLE_HEAD, title="Architectures (packnet init --arch NAME)")
    for column in ("name", "source", "default px", "--pretrained", "about"):
        table.add_column(column, justify="right" if column == "default px" else "left")
    for a in archs:
        table.add_row(a["name"], a["source"], str(a["default_image_size"]), "yes" if a["pretrained"] else "",
                      a["description"])
    out.print(table)
    timm = "installed: timm/NAME builds timm.create_model(NAME)" if models.timm_available() else \
        "not installed (pip install 'packnet-export[timm]' adds timm/NAME)"
    out.print(f"timm: {timm}. Networks of your own: packnet_export.models.register_builder (docs/architectures.md).")


@app.command()
@handle_errors
def init(
    arch: str | None = typer.Option(None, "--arch", help=options.ARCH_HELP),
    output: Path | None = typer.Option(None, "-o", "--output", help="Checkpoint file to write (.safetensors)."),
    arch_kwargs_json: str | None = typer.Option(None, "--arch-kwargs", help="Keyword arguments of the "
                                                "architecture's builder as JSON, stored in the checkpoint, "
                                                "e.g. '{\"width_mult\": 0.5}' for mobilenet_v2."),
    list_archs: bool = typer.Option(False, "--list-archs", help="List every architecture --arch accepts "
                                    "(with --json: name, source, default image size, pretrained) and exit."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Start from torchvision's ImageNet weights "
                                    "(downloads them once; needs internet)."),
    weights: Path | None = typer.Option(None, "--weights", help="Start from a local state dict "
                                        "(.pth/.pt read with weights_only=True, or .safetensors)."),
    image_size: int | None = typer.Option(None, "--image-size", help="Input size in pixels "
                                          "(default: the architecture's, e.g. 224; 48 for vgg_mini)."),
    width: int | None = typer.Option(None, "--width", help="Base width of vgg_mini (default: 16)."),
    per_task_norm: bool = typer.Option(False, "--per-task-norm", help="Learn and store batch norm and biases "
                                       "per task (CPG-style) instead of freezing them after task 1."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights."),
    force: bool = options.force_option(),
    as_json: bool = options.json_option(),
) -> None:
    """Create an empty PackNet model: every weight free, no task yet.

    Any torchvision classification model works by name: its classifier becomes the per-task head.

    `packnet init --list-archs` lists them; register networks of your own from Python (docs/architectures.md).
    """
    if list_archs:
        _print_architectures(as_json)
        return
    if arch is None or output is None:
        raise PackNetError("init needs --arch NAME and -o OUTPUT (`packnet init --list-archs` lists the "
                           "architectures)")
    model = pn.create(arch, image_size=image_size, width=width, per_task_norm=per_task_norm, pretrained=pretrained,
                      weights=weights, seed=seed, output=output, force=force,
                      arch_kwargs=_parse_arch_kwargs(arch_kwargs_json))
    n = sum(o.numel() for o in model.owners.values())
    started = pretrained or weights is not None
    if as_json:
        print_json({"checkpoint": str(output), "arch": arch, "image_size": model.image_size,
                    "prunable_weights": n, "pretrained": started})
    else:
        err.print(f"wrote {output}: {arch}, {model.image_size} px, {n:,} prunable weights, all free"
                  + (" (pretrained; its ImageNet head is kept for a first task added with --pretrained-head)"
                     if started else ""))


@app.command("add-task")
@handle_errors
def add_task_command(
    ckpt: Path = typer.Argument(..., help="Checkpoint to add the task to."),
    name: str = typer.Option(..., "--name", help="Name of the new task, e.g. cars."),
    data: Path = typer.Option(..., "--data", help="ImageFolder root with train/<class>/ (and test/<class>/)."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Where to write the result "
                                       "(default: update CKPT in place, atomically)."),
    epochs: int = typer.Option(20, "--epochs", help="Training epochs on the free weights (0: prune the "
                               "weights as they are, e.g. pretrained ImageNet ones)."),
    finetune_epochs: int | None = typer.Option(None, "--finetune-epochs", help="Fine-tuning epochs after pruning "
                                               "(default: 10; 0 with --prune 0, as the official scripts end).",
                                               show_default=False),
    prune: float | None = typer.Option(None, "--prune", help="Fraction of the task's weights to free for later "
                                       "tasks (default: 0.5 for the first task, 0.75 after; 0 for a last task). "
                                       "Every weight tied with the cutoff magnitude is freed too, as the official "
                                       "pruner does, so a task can free more; exact zeros are always freed."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate (x0.1 every --lr-decay-every epochs)."),
    lr_decay_every: int = typer.Option(10, "--lr-decay-every", help="Epochs between learning-rate drops."),
    finetune_lr: float = typer.Option(1e-4, "--finetune-lr", help="Learning rate of fine-tuning."),
    finetune_lr_decay_every: int | None = typer.Option(None, "--finetune-lr-decay-every", help="Epochs between "
                                                       "x0.1 drops of the fine-tuning lr (default: constant; the "
                                                       "official ImageNet pruning uses 5).", show_default=False),
    resize: options.Resize = typer.Option("crop", "--resize", help="crop: resize to 8/7 of the input size "
                                          "and crop (random crop in training, centre in evaluation); squash: "
                                          "resize the whole image to the input size, no crop, as the official "
                                          "code does for pre-cropped data (CUBS-cropped, Cars-cropped). Stored "
                                          "with the task: eval and export use it."),
    momentum: float = typer.Option(0.9, "--momentum"),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Applied to the new task's weights only."),
    batch_size: int = typer.Option(32, "--batch-size"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of train/ held out to pick the best "
                                       "epoch (never the test images)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    workers: int = typer.Option(0, "--workers", help="Data-loading worker processes."),
    amp: options.Amp = typer.Option("off", "--amp", help="Mixed precision: off, bf16 or fp16 (fp16 with loss "
                                    "scaling, CUDA only). bf16 also speeds up CPUs with AMX or AVX512-BF16 (1.2-2.2x "
                                    "measured)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="Channels-last memory format "
                                       "(faster convolutions on recent GPUs and CPUs)."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="Under torchrun: batch-norm statistics over the "
                                 "global batch, not each process's --batch-size images (first task, or "
                                 "--per-task-norm models): N processes x b then train like 1 x N*b."),
    recompute_bn_stats: bool = typer.Option(False, "--recompute-bn-stats", help="After fine-tuning, set batch "
                                            "norm's running statistics to their exact average over the training "
                                            "images (first task, or --per-task-norm models). For networks with a "
                                            "small batch-norm momentum (mobilenet_v3, efficientnet: 0.01) trained "
                                            "for few steps."),
    pretrained_head: bool = typer.Option(False, "--pretrained-head", help="First task only: use the "
                                         "pretrained network's own head (e.g. ImageNet's 1000 classes)."),
    seed: int = typer.Option(0, "--seed"),
    strict: bool = typer.Option(False, "--strict", help="Fail on an unreadable image instead of skipping it."),
    restart: bool = typer.Option(False, "--restart", help="Discard the state of an interrupted run and start over."),
    force: bool = options.force_option("OUTPUT (when it is not CKPT)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the task's metrics."),
) -> None:
    """Train a new task on the free weights, prune it, fine-tune it and freeze it.

    The best epoch of each phase is chosen on --val-fraction of train/; in fine-tuning the
    pruned weights compete too (a fine-tune epoch is kept only if it beats them).

    ImageNet as task 1 (the paper): after `packnet init --pretrained` (or --weights FILE),
    `add-task --name imagenet --data DIR --pretrained-head --epochs 0 --finetune-lr 1e-4
    --finetune-lr-decay-every 5` prunes the pretrained network and fine-tunes it (docs/training.md).

    An interrupted run (Ctrl-C, SIGTERM, a crash) keeps its last finished epoch in
    OUTPUT.resume: run the same command again to go on from there.
    """
    from packnet_export.distributed import is_main_process
    from packnet_export.training import resume_path_for

    from .progress import RichObserver

    config = pn.TrainConfig(epochs=epochs, finetune_epochs=finetune_epochs, lr=lr, finetune_lr=finetune_lr,
                            lr_decay_every=lr_decay_every, finetune_lr_decay_every=finetune_lr_decay_every,
                            resize=resize.value, momentum=momentum, weight_decay=weight_decay,
                            batch_size=batch_size, prune=prune, val_fraction=val_fraction, seed=seed, device=device,
                            workers=workers, strict=strict, use_pretrained_head=pretrained_head,
                            channels_last=channels_last, amp=amp.value, sync_bn=sync_bn,
                            recompute_bn_stats=recompute_bn_stats)
    observer = RichObserver(enabled=is_main_process())
    try:
        added = pn.add_task(ckpt, name, data, config, output=output, force=force, restart=restart, observer=observer)
    except KeyboardInterrupt:
        observer.end_phase()
        if is_main_process():
            resume = resume_path_for(output or ckpt)
            if resume.exists():
                err.print(styled("interrupted", "yellow"), f": the last finished epoch is saved in {resume}; "
                          "run the same command again to resume (or add --restart to start over)", sep="")
            else:
                err.print(styled("interrupted", "yellow"), "before the first epoch finished; nothing was saved")
        raise
    if is_main_process():
        info = added.task
        if as_json:
            print_json({"checkpoint": str(added.checkpoint), "task": name, "task_number": added.number,
                        "classes": info.num_classes, "prune": info.prune, "resize": info.resize_mode,
                        "metrics": info.metrics,
                        "free_fraction": added.free_fraction})
        else:
            m = info.metrics
            test = (f", test top-1 {m['test_top1']:.2f}% top-5 {m['test_top5']:.2f}% on {m['test_images']} images"
                    if "test_top1" in m else "")
            val = f"val top-1 {m['val_top1']:.2f}%" if "val_top1" in m else "no validation split"
            err.print(f"added task {added.number} {name!r} ({info.num_classes} classes): {val}{test}; "
                      f"{added.free_fraction:.1%} of the weights remain free. Wrote {added.checkpoint}")


@app.command("eval")
@handle_errors
def eval_command(
    ckpt: Path = typer.Argument(..., help="Checkpoint."),
    task: str = typer.Option(..., "--task", help="Task to evaluate."),
    data: Path = typer.Option(..., "--data", help="ImageFolder root of that task."),
    split: options.Split = typer.Option("test", "--split", help="The ImageFolder split to read."),
    batch_size: int = typer.Option(128, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
    workers: int = typer.Option(0, "--workers"),
    strict: bool = typer.Option(False, "--strict", help="Fail on an unreadable image instead of skipping it."),
    as_json: bool = options.json_option(),
) -> None:
    """Top-1 and top-5 accuracy of one task, computed as the task runs (its weights, head, norm)."""
    from .progress import RichObserver

    result = pn.evaluate(ckpt, task, data, split=split.value, batch_size=batch_size, device=device, workers=workers,
                         strict=strict, observer=RichObserver(enabled=not as_json))
    if as_json:
        print_json(result.to_dict())
    else:
        skipped = f" ({result.skipped_images} unreadable skipped)" if result.skipped_images else ""
        out.print(f"{task} ({result.split}): top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  "
                  f"on {result.images} images{skipped}")


@app.command()
@handle_errors
def inspect(
    ckpt: Path = typer.Argument(..., help="Checkpoint."),
    as_json: bool = options.json_option(),
) -> None:
    """Tasks, classes, accuracies, per-layer owner counts and the free capacity left."""
    from rich import box
    from rich.table import Table

    found = pn.inspect(ckpt)
    if as_json:
        print_json(found.to_dict())
        return
    n = found.prunable_weights
    out.print(styled(str(ckpt), "bold"), f": {found.arch} {found.arch_kwargs or ''} at {found.image_size} px, "
              f"{n:,} prunable weights, {len(found.tasks)} task(s), "
              f"norm/bias {'per task' if found.per_task_norm else 'shared (frozen after task 1)'}", sep="")
    table = Table(title="Tasks")
    for col in ("#", "task", "classes", "pruned", "resize", "owned", "used", "test top-1"):
        table.add_column(col, justify="right" if col not in ("task",) else "left")
    for t in found.tasks:
        top1 = t.metrics.get("test_top1")
        table.add_row(str(t.task), t.name, str(t.classes), f"{t.prune:.0%}", t.resize,
                      f"{t.owned:,} ({t.owned / n:.1%})", f"{t.used:,} ({t.used / n:.1%})",
                      "-" if top1 is None else f"{top1:.2f}%")
    out.print(table)
    # tasks are numbered in the columns (names are in the table above) so that six or more fit 80 columns
    layer_table = Table(title="Owners per layer (columns 1..N: weights owned by task N)", box=box.SIMPLE_HEAD,
                        pad_edge=False)
    layer_table.add_column("layer", no_wrap=True)
    for header in ["weights", "free", *map(str, range(1, len(found.tasks) + 1))]:
        layer_table.add_column(header, justify="right", no_wrap=True)
    for row in found.layers:
        layer_table.add_row(row.layer, f"{row.weights:,}", f"{row.free:,}", *[f"{v:,}" for v in row.owned.values()])
    out.print(layer_table)
    out.print(f"free capacity for future tasks: {found.free:,} weights ({found.free_fraction:.1%})")

from .report import report_command  # noqa: E402

app.command("report")(report_command)

from .importer import import_command  # noqa: E402

app.command("import")(import_command)

from .export import export_command, validate_command  # noqa: E402

app.command("export")(export_command)
app.command("validate")(validate_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
