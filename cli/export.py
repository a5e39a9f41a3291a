"""``packnet-export`` (also ``packnet export``) and ``packnet validate``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from packnet_export import checkpoint
from packnet_export.errors import PackNetError, ValidationFailed
from packnet_export.exporter import formats as export_formats
from packnet_export.exporter import pipeline, validation, writer
from packnet_export.exporter.calibration import DEFAULT_CALIBRATION_IMAGES
from packnet_export.exporter.validation import DEFAULT_MAX_ACCURACY_DROP
from packnet_export.files import output_folder, regular_file

from .common import err, handle_errors, out, print_json


def _data_map(data: Path | None, names: list[str]) -> dict[str, Path] | None:
    """Task name -> ImageFolder root: DATA itself for one task, DATA/<task> for several."""
    if data is None:
        return None
    if not data.is_dir():
        raise PackNetError(f"--data {data} is not a folder")
    if len(names) == 1:
        return {names[0]: data}
    found = {n: data / n for n in names if (data / n).is_dir()}
    if not found:
        raise PackNetError(f"with several tasks, --data must hold one folder per task ({data}/<task>/test/...); "
                           f"none of {', '.join(names)} is there")
    return found


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _report_line(name: str, report: dict, entry: dict) -> str:
    provider = report["provider"].replace("ExecutionProvider", "")
    parts = [escape(f"{name} [{entry['task']}]"), provider]
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
    parts.append("[green]ok[/]" if entry["passed"] else "[bold red]FAILED[/]")
    return "  ".join(parts)


def _print_report(report: dict) -> None:
    if report.get("notice"):
        err.print(f"[yellow]note:[/] {report['notice']}", soft_wrap=True)
    for entry in report["tasks"]:
        err.print(_report_line(Path(report["path"]).name, report, entry), soft_wrap=True)


def _failures(reports: list[dict]) -> str:
    bad = [f"{Path(r['path']).name}[{e['task']}]" for r in reports for e in r["tasks"] if not e["passed"]]
    return f"validation failed for {', '.join(bad)} (see the lines above, or --json)"


@handle_errors
def export_command(
    task: list[str] | None = typer.Option(None, "--task", help="Task to export (repeat for several)."),
    ckpt: Path | None = typer.Option(None, "--checkpoint", help="PackNet checkpoint (default: the bundled "
                                     "sample samples/packnet-6task.safetensors)."),
    fmt: str = typer.Option("dense", "--format", help="dense (one plain graph per task, runs anywhere), sparse "
                            "(only the weights the task uses), multitask (one graph, task_index input) or all."),
    all_tasks: bool = typer.Option(False, "--all-tasks", help="Export every task of the checkpoint."),
    output: Path = typer.Option(pipeline.DEFAULT_OUTPUT, "-o", "--output", help="Output folder; files are "
                                "<task>.dense.onnx, <task>.sparse.onnx, multitask.onnx (fp16/int8: "
                                "<task>.dense.int8.onnx, ...)."),
    opset: int = typer.Option(export_formats.DEFAULT_OPSET, "--opset", help=f"ONNX opset "
                              f"({export_formats.MIN_OPSET} to {export_formats.MAX_OPSET})."),
    ir_version: int | None = typer.Option(None, "--ir-version", help="ONNX IR version to write (default: the "
                                          "lowest the opset needs, 8 for opset 18, which onnxruntime 1.14 and "
                                          "newer load; see docs/export.md)."),
    provider: str = typer.Option("auto", "--provider", help="Validation provider: auto (CUDA when it really "
                                 "runs, else CPU with a notice), cuda (fail when unusable) or cpu."),
    data: Path | None = typer.Option(None, "--data", help="Validate on these images instead of random inputs: "
                                     "an ImageFolder root with test/ (DIR/<task>/test/ for several tasks)."),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the onnxruntime comparison."),
    layout: str = typer.Option("branches", "--multitask-layout", help="branches: the dense graph's speed, one "
                               "weight set per task in memory once loaded; runtime-mask: one weight set, masked "
                               "on every call (lean memory, 2-7x slower). Same file size."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 (as trained), fp16 (half the size) or int8 "
                                  "(QDQ static quantization, ~1/4 the size; needs --calibration). Files are named "
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
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Export PackNet tasks to ONNX and check them against PyTorch with onnxruntime.

    Exit status: 0 when every file matches PyTorch (int8: loses at most --max-accuracy-drop
    points), 1 when a file does not (or --provider cuda cannot use CUDA), 2 for a bad input
    (unknown task, existing file, bad checkpoint, missing calibration images).
    """
    formats = export_formats.resolve_formats(fmt)
    output = output_folder(output, "--output")
    if ckpt is not None:  # before the provider probe: a bad path is the first thing to report
        regular_file(ckpt, "checkpoint")
    export_formats.check_opset(opset)
    ir_version = writer.ir_version_for(opset, ir_version)
    export_formats.check_precision(precision)
    if fp16_io and precision != "fp16":
        raise PackNetError("--fp16-io applies to --precision fp16 only")
    if max_accuracy_drop < 0:
        raise PackNetError(f"--max-accuracy-drop must be 0 or more, got {max_accuracy_drop}")
    if provider not in validation.PROVIDERS:
        raise PackNetError(f"unknown --provider {provider!r}; choose auto, cuda or cpu")
    notice = None
    if not no_validate:  # once, before any work: --provider cuda fails here when CUDA is unusable
        notice = validation.probe_provider(provider).notice
        if notice:
            provider = "cpu"
            if not as_json:
                err.print(f"[yellow]note:[/] {notice}", soft_wrap=True)
    model, source, sha = pipeline.load_source(ckpt)
    if all_tasks:
        tasks = list(range(1, len(model.tasks) + 1))
    elif task:
        tasks = [model.task_number(name) for name in dict.fromkeys(task)]
    elif formats == ["multitask"]:
        tasks = []
    else:
        raise PackNetError(f"choose a task with --task NAME or --all-tasks; {source} has: "
                           f"{', '.join(model.task_names) or 'no task yet'}")
    checked = [model.tasks[k - 1].name for k in tasks] or model.task_names
    data_map = _data_map(data, checked) if not no_validate else None
    if ckpt is None and not as_json:
        err.print(f"using the bundled sample {source}")
    calibrated = None
    if precision == "int8":
        if calibration is None and data is not None:
            calibration = data
            if not as_json:
                err.print(escape(f"calibrating on the training images of --data {data}"), soft_wrap=True)
        calibrated = pipeline.calibration_sets(model, tasks, formats, calibration, calibration_images, layout)
    files = pipeline.export(model, output, tasks, formats, opset, force, sha,
                            progress=None if as_json else lambda msg: err.print(msg), layout=layout,
                            precision=precision, calibration=calibrated, fp16_io=fp16_io, ir_version=ir_version)
    by_name = {model.tasks[k - 1].name: c for k, c in (calibrated or {}).items()}
    reports = []
    for f in files:
        line = f"wrote {f.path} ({_size(f.bytes)}"
        if f.size_bound is not None:
            line += f"; size target {_size(int(f.size_bound))} {'met' if f.bytes <= f.size_bound else 'missed'}"
        if not as_json:
            err.print(escape(line + ")"), soft_wrap=True)
        if not no_validate:
            names = [n for n in checked if f.task is None or n == f.task]
            report = validation.validate_file(f.path, model, names, provider, data_map, calibration=by_name,
                                              max_accuracy_drop=max_accuracy_drop)
            reports.append(report)
            if not as_json:
                _print_report(report)
    passed = all(r["passed"] for r in reports)
    if as_json:
        print_json({"checkpoint": str(source), "source_sha256": sha, "opset": opset, "ir_version": ir_version,
                    "notice": notice,
                    "files": [f.summary() for f in files], "validation": reports if not no_validate else None,
                    "passed": passed if not no_validate else None})
    if not passed:
        raise ValidationFailed(_failures(reports))


@handle_errors
def validate_command(
    model_path: Path = typer.Argument(..., metavar="MODEL.onnx", help="A file written by packnet-export."),
    ckpt: Path | None = typer.Option(None, "--checkpoint", help="Checkpoint to compare with (default: the "
                                     "bundled sample when the file came from it; else the graph alone is checked)."),
    task: str | None = typer.Option(None, "--task", help="Task to check (a multi-task graph checks all by default)."),
    data: Path | None = typer.Option(None, "--data", help="ImageFolder root with test/: compare on these images "
                                     "and report accuracy through onnxruntime (DIR/<task>/ for several tasks)."),
    provider: str = typer.Option("auto", "--provider", help="auto, cuda or cpu."),
    max_accuracy_drop: float = typer.Option(DEFAULT_MAX_ACCURACY_DROP, "--max-accuracy-drop",
                                            help="int8 files with --data: top-1 points the file may lose "
                                            "against the fp32 model."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Check an exported ONNX file: ONNX checker, onnxruntime against PyTorch, latency, accuracy.

    Exit status 1 when it does not match PyTorch, 2 for a bad input.
    """
    meta = validation.read_metadata(model_path)
    model = None
    notices = []
    source_sha = meta.get("packnet.source_sha256", "")
    if ckpt is not None:
        model = checkpoint.load(ckpt)
        if source_sha and checkpoint.file_sha256(ckpt) != source_sha:
            notices.append(f"{ckpt} is not the checkpoint {model_path.name} was exported from (sha256 differs)")
    elif pipeline.SAMPLE_CHECKPOINT.is_file() and source_sha == checkpoint.file_sha256(pipeline.SAMPLE_CHECKPOINT):
        model = checkpoint.load(pipeline.SAMPLE_CHECKPOINT)
        notices.append(f"comparing with the bundled sample {pipeline.SAMPLE_CHECKPOINT} it was exported from")
    else:
        notices.append("no --checkpoint: checked the graph and that it runs; pass --checkpoint to compare with PyTorch")
    if data is not None and model is None:
        raise PackNetError("--data needs the checkpoint the file came from: pass --checkpoint")
    names = [task] if task else validation.file_tasks(meta)
    report = validation.validate_file(model_path, model, [task] if task else None, provider, _data_map(data, names),
                                      max_accuracy_drop=max_accuracy_drop)
    report["notices"] = notices
    if as_json:
        print_json(report)
    else:
        for n in notices:
            err.print(f"[yellow]note:[/] {n}", soft_wrap=True)
        _print_report(report)
        out.print(f"{model_path}: {'passed' if report['passed'] else 'FAILED'}")
    if not report["passed"]:
        raise ValidationFailed(_failures([report]))


app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
app.command()(export_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
