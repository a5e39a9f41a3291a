"""``packnet-export`` (also ``packnet export``) and ``packnet validate``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

import packnet_export as pn
from packnet_export.errors import ValidationFailed
from packnet_export.exporter import formats as export_formats
from packnet_export.exporter.formats import DEFAULT_CALIBRATION_IMAGES, DEFAULT_MAX_ACCURACY_DROP

from . import options
from .common import Command, err, flags_in, handle_errors, out, print_json, printable, styled

EXPORT_FLAGS = {"tasks": "--task"}
"""``export(tasks=...)`` is ``--task`` (repeated); ``report --plan`` has a ``--tasks``."""


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _report_line(name: str, report: dict, entry: dict) -> Text:
    provider = report["provider"].replace("ExecutionProvider", "")
    parts = [f"{name} [{entry['task']}]", provider]
    if "accuracy_fp32" in entry:  # int8: accuracy against the fp32 model, no logit tolerance
        parts.append(f"top-1 fp32 {entry['accuracy_fp32']:.2f}% -> {report.get('precision')} "
                     f"{entry['accuracy']:.2f}% (drop {entry['accuracy_drop']:+.2f}, max "
                     f"{entry['max_accuracy_drop']:.2f}) on {entry['samples']} {entry['inputs']}")
        parts.append(f"agree {entry['top1_agreement']:.1%}")
    elif "max_abs_diff" in entry:
        parts.append(f"max|diff| {entry['max_abs_diff']:.2e} (tol {entry['tolerance']:.1e})")
        parts.append(f"top-1 agree {entry['top1_agreement']:.1%} on {entry['samples']} {entry['inputs']} inputs")
    else:
        parts.append("outputs finite" if entry["finite"] else "outputs NOT finite")
        if "top1_agreement" in entry:
            parts.append(f"top-1 agree {entry['top1_agreement']:.1%} on {entry['samples']} {entry['inputs']} inputs "
                         "(int8: pass --data to compare accuracy)")
    if "accuracy" in entry and "accuracy_fp32" not in entry:
        parts.append(f"accuracy {entry['accuracy']:.2f}%")
    if "latency_ms" in entry:
        parts.append(f"{entry['latency_ms']:.2f} ms/image")
    line = Text(printable("  ".join(parts) + "  "))
    line.append("ok" if entry["passed"] else "FAILED", style="green" if entry["passed"] else "bold red")
    return line


def _note(text: str) -> None:
    err.print(styled("note:", "yellow"), text, soft_wrap=True)


def _print_report(report: dict) -> None:
    if report.get("notice"):
        _note(report["notice"])
    for entry in report["tasks"]:
        err.print(_report_line(Path(report["path"]).name, report, entry), soft_wrap=True)


def _failures(reports: list[dict]) -> str:
    """One line naming every file and task that does not match PyTorch."""
    bad = [f"{Path(r['path']).name}[{e['task']}]" for r in reports for e in r["tasks"] if not e["passed"]]
    return f"validation failed for {', '.join(bad)} (see the lines above, or --json)"


def _format_help() -> str:
    described = "; ".join(f"{f.name}: {f.summary}" for f in export_formats.REGISTRY.values())
    return f"{described}; {export_formats.ALL}: every format."


@handle_errors(flags=EXPORT_FLAGS)
def export_command(
    task: list[str] | None = typer.Option(None, "--task", help="Task to export (repeat for several)."),
    ckpt: Path | None = typer.Option(None, "--checkpoint", help="PackNet checkpoint (default: the bundled "
                                     "sample samples/packnet-6task.safetensors)."),
    fmt: options.Format = typer.Option("dense", "--format", help=_format_help()),
    all_tasks: bool = typer.Option(False, "--all-tasks", help="Export every task of the checkpoint."),
    output: Path = typer.Option(Path("exports"), "-o", "--output", help="Output folder; files are "
                                + ", ".join(f.file_name("<task>") for f in export_formats.REGISTRY.values())
                                + " (fp16/int8: <task>.dense.int8.onnx, ...)."),
    opset: int = typer.Option(export_formats.DEFAULT_OPSET, "--opset", help=f"ONNX opset "
                              f"({export_formats.MIN_OPSET} to {export_formats.MAX_OPSET})."),
    ir_version: int | None = typer.Option(None, "--ir-version", help="ONNX IR version to write (default: the "
                                          "lowest the opset needs, 8 for opset 18, which onnxruntime 1.14 and "
                                          "newer load; see docs/export.md)."),
    provider: options.Provider = options.provider_option(),
    data: Path | None = options.data_option("Validate on these images instead of random inputs: an ImageFolder "
                                            "root with test/ (DIR/<task>/test/ for several tasks)."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the onnxruntime comparison."),
    layout: options.Layout = typer.Option(export_formats.DEFAULT_LAYOUT, "--multitask-layout", help="branches: "
                                          "the dense graph's speed, one weight set per task in memory once loaded "
                                          "(opset 16+); runtime-mask: one weight set, masked on every call (lean "
                                          "memory, 2-7x slower); portable: like runtime-mask, for edge converters "
                                          "(ncnn, MNN, TVM, OpenVINO; float32 task_index; docs/deploying.md). Same "
                                          "file size."),
    precision: options.Precision = typer.Option(export_formats.DEFAULT_PRECISION, "--precision", help="fp32 (as "
                                                "trained), fp16 (half the size) or int8 (QDQ static quantization, "
                                                "~1/4 the size; needs --calibration). Files are named "
                                                "<task>.<format>.<precision>.onnx for fp16 and int8."),
    calibration: Path | None = typer.Option(None, "--calibration", help="int8: training images that calibrate "
                                            "the activations: an ImageFolder root with train/ (DIR/<task>/train/ "
                                            "for several tasks). Default: --data, when it has them."),
    calibration_images: int = typer.Option(DEFAULT_CALIBRATION_IMAGES, "--calibration-images",
                                           help="int8: images per task used for calibration (a fixed, "
                                           "seeded choice)."),
    max_accuracy_drop: float = typer.Option(DEFAULT_MAX_ACCURACY_DROP, "--max-accuracy-drop",
                                            help="int8: top-1 points a file may lose against the fp32 model "
                                            "(on --data's test images, else on the calibration images)."),
    fp16_io: bool = typer.Option(False, "--fp16-io", help="fp16: float16 inputs and logits too (default: "
                                 "float32, cast inside the graph)."),
    activation_type: options.ActivationType | None = typer.Option(
        None, "--activation-type", help="int8: type of the quantized activations: uint8 (default; fastest on x86 "
        "VNNI/AMX) or int8 (TFLite's int8 scheme, for ARM CPUs, NPUs and DSPs). Weights are int8 either way.",
        show_default=False),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
    as_json: bool = options.json_option(),
) -> None:
    """Export PackNet tasks to ONNX and check them against PyTorch with onnxruntime.

    Exit status: 0 when every file matches PyTorch (int8: loses at most --max-accuracy-drop
    points), 1 when a file does not (or --provider cuda cannot use CUDA), 2 for a bad input
    (unknown task, existing file, bad checkpoint, missing calibration images).
    """
    formats = export_formats.resolve_formats(fmt.value)
    if all_tasks:
        tasks = None
    elif task:
        tasks = list(task)
    else:  # the multi-task graph needs no task; the library says which to choose for the others
        tasks = []

    def progress(message: str) -> None:
        if not as_json:
            err.print(flags_in(message, EXPORT_FLAGS), soft_wrap=True)

    files = pn.export(ckpt, output, tasks=tasks, formats=formats, opset=opset, ir_version=ir_version,
                      layout=layout.value, force=force, validate=not no_validate, provider=provider.value, data=data,
                      precision=precision.value, calibration=calibration, calibration_images=calibration_images,
                      max_accuracy_drop=max_accuracy_drop, fp16_io=fp16_io,
                      activation_type=activation_type.value if activation_type else None, progress=progress)
    reports = [f.validation.to_dict() for f in files if f.validation is not None]
    for f in files:
        line = f"wrote {f.path} ({_size(f.bytes)}"
        if f.size_bound is not None:
            line += f"; size target {_size(int(f.size_bound))} {'met' if f.bytes <= f.size_bound else 'missed'}"
        if not as_json:
            err.print(line + ")", soft_wrap=True)
            if f.validation is not None:
                _print_report(f.validation.to_dict())
    passed = all(r["passed"] for r in reports)
    if as_json:
        print_json({"checkpoint": str(files.checkpoint), "source_sha256": files.source_sha256, "opset": files.opset,
                    "ir_version": files.ir_version, "notice": files.notice,
                    "files": [f.summary() for f in files], "validation": reports if not no_validate else None,
                    "passed": passed if not no_validate else None})
    if not passed:
        raise ValidationFailed(_failures(reports))


@handle_errors(flags={"onnx_path": "MODEL.onnx"})
def validate_command(
    model_path: Path = typer.Argument(..., metavar="MODEL.onnx", help="A file written by packnet-export."),
    ckpt: Path | None = typer.Option(None, "--checkpoint", help="Checkpoint to compare with (default: the "
                                     "bundled sample when the file came from it; else the graph alone is checked)."),
    task: str | None = typer.Option(None, "--task", help="Task to check (a multi-task graph checks all by default)."),
    data: Path | None = options.data_option("ImageFolder root with test/: compare on these images and report "
                                            "accuracy through onnxruntime (DIR/<task>/ for several tasks)."),
    provider: options.Provider = options.provider_option(),
    max_accuracy_drop: float = typer.Option(DEFAULT_MAX_ACCURACY_DROP, "--max-accuracy-drop",
                                            help="int8 files with --data: top-1 points the file may lose "
                                            "against the fp32 model."),
    as_json: bool = options.json_option(),
) -> None:
    """Check an exported ONNX file: ONNX checker, onnxruntime against PyTorch, latency, accuracy.

    Exit status 1 when it does not match PyTorch, 2 for a bad input.
    """
    report = pn.validate(model_path, ckpt, task=task, data=data, provider=provider.value,
                         max_accuracy_drop=max_accuracy_drop)
    result = report.to_dict(options.flag)
    if as_json:
        print_json(result)
    else:
        for n in result["notices"]:
            _note(n)
        _print_report(result)
        out.print(f"{model_path}: {'passed' if report.passed else 'FAILED'}")
    if not report.passed:
        raise ValidationFailed(_failures([result]))


app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
app.command(cls=Command)(export_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
