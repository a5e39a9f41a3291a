"""``packnet import``: convert a model trained with the official PackNet code or Avalanche."""

from __future__ import annotations

from pathlib import Path

import typer

import packnet_export as pn
from packnet_export.errors import PackNetError

from . import options
from .common import err, handle_errors, print_json


def _triple(text: str | None, option: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise PackNetError(f"{option} takes three comma-separated numbers, e.g. 0.5,0.5,0.5; got {text!r}")
    return values  # type: ignore[return-value]


def _class_options(items: list[str]) -> dict[str, list[str]]:
    from packnet_export.importers.common import read_class_names

    out: dict[str, list[str]] = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise PackNetError(f"--classes takes TASK=PATH (an ImageFolder root or a text file), got {item!r}")
        out[task] = read_class_names(path)
    return out


@handle_errors(flags={"path": "FILE"})
def import_command(
    source_file: Path = typer.Argument(..., metavar="FILE", help="The file to import: an official PackNet "
                                       "checkpoint (.pt) or an Avalanche PackNetModel state dict."),
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint to write (.safetensors)."),
    source: str = typer.Option("auto", "--from", help="official, avalanche, or auto (recognise it)."),
    arch: str | None = typer.Option(None, "--arch", help="Avalanche only: the network, e.g. vgg16."),
    image_size: int | None = typer.Option(None, "--image-size", help="Avalanche only: input size "
                                          "(default: the architecture's)."),
    task_names: str | None = typer.Option(None, "--task-names", help="Avalanche only: comma-separated names "
                                          "of the tasks in order (default: task_0, task_1, ...)."),
    classes: list[str] = typer.Option([], "--classes", help="TASK=PATH: the task's class names, from an "
                                      "ImageFolder root (sorted subfolders) or a text file (one per line). "
                                      "Repeat per task (default: output indices)."),
    mean: str | None = typer.Option(None, "--mean", help="Avalanche only: normalization mean, e.g. 0.5,0.5,0.5 "
                                    "(default: ImageNet's)."),
    std: str | None = typer.Option(None, "--std", help="Avalanche only: normalization std (default: ImageNet's)."),
    force: bool = options.force_option(),
    as_json: bool = options.json_option(),
) -> None:
    """Convert a PackNet model trained with the official code or Avalanche into a checkpoint.

    The file is read with a restricted unpickler: it never runs code from the file, and it
    refuses, naming it, any class a PackNet checkpoint does not hold.
    """
    names = [n.strip() for n in task_names.split(",")] if task_names else None
    model = pn.import_checkpoint(source_file, source=source, arch=arch, image_size=image_size, task_names=names,
                                 classes=_class_options(classes), mean=_triple(mean, "--mean"),
                                 std=_triple(std, "--std"), output=output, force=force)
    summary = {"checkpoint": str(output), "source": model.extra.get("imported_from"), "arch": model.arch,
               "image_size": model.image_size, "per_task_norm": model.per_task_norm,
               "tasks": [{"task": i, "name": t.name, "classes": t.num_classes, "prune": t.prune}
                         for i, t in enumerate(model.tasks, start=1)],
               "free_fraction": model.free_fraction()}
    if as_json:
        print_json(summary)
    else:
        tasks = ", ".join(f"{t.name} ({t.num_classes} classes)" for t in model.tasks)
        err.print(f"imported {summary['source']} {model.arch}: {len(model.tasks)} task(s): {tasks}; "
                  f"{model.free_fraction():.1%} of the weights free. Wrote {output}")


__all__ = ["import_command"]
