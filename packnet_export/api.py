"""The public Python API: what the command line does, as keyword-only functions.

Every command of ``packnet`` and ``packnet-export`` parses its options, calls one function
here and prints the result. Tasks are named by name (an int is accepted as the 1-based
position); results are the dataclasses below; a bad argument raises
:class:`~packnet_export.errors.ParameterError` naming the parameter (the command line
prints the matching flag instead). Importing this module is cheap: torch, torchvision and
onnxruntime are imported by the functions that need them.

See ``docs/python-api.md`` for a walk-through.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PackNetError, ParameterError, name_parameters

if TYPE_CHECKING:
    from .checkpoint import PackNet, TaskInfo
    from .exporter.writer import ExportedFile
    from .training import Observer, TrainConfig

PathLike = str | os.PathLike
TaskRef = str | int
"""A task by name, or by its 1-based position in the model."""


# ----------------------------------------------------------------------------- results
@dataclass
class AddedTask:
    """What :func:`add_task` trained."""

    model: PackNet
    """The model with the new task (the input model is left unchanged)."""
    task: TaskInfo
    number: int
    """1-based position of the new task."""
    free_fraction: float
    """Share of the prunable weights still free for later tasks."""
    checkpoint: Path | None
    """Where it was written (None without ``output`` and for a model given as an object)."""

    @property
    def metrics(self) -> dict:
        """Validation and test accuracy of the task, as stored in the checkpoint."""
        return self.task.metrics


@dataclass
class Evaluation:
    """Top-1/top-5 accuracy (%) of one task on one split of an ImageFolder tree."""

    task: str
    split: str
    top1: float
    top5: float
    images: int
    skipped_images: int = 0
    """Unreadable images skipped (``strict=False``)."""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "extra"}, **self.extra}


@dataclass
class TaskCheck:
    """One task of an ONNX file compared with PyTorch (or, without a model, run alone)."""

    task: str
    passed: bool
    inputs: str
    """``random`` (seeded) or ``images`` (the task's ``test/`` images)."""
    finite: bool
    max_abs_diff: float | None = None
    tolerance: float | None = None
    top1_agreement: float | None = None
    samples: int | None = None
    accuracy: float | None = None
    """Top-1 (%) through onnxruntime, with images."""
    latency_ms: float | None = None
    """Median time of one call at batch 1."""
    extra: dict = field(default_factory=dict)
    """What a precision adds (int8: ``accuracy_fp32``, ``accuracy_drop``, ``max_accuracy_drop``)."""

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        return {**d, **self.extra}


@dataclass
class ValidationReport:
    """An exported file checked with the ONNX checker and onnxruntime."""

    path: Path
    format: str | None
    provider: str
    """The execution provider that really ran (read back from the session)."""
    notice: str | None
    """Why CUDA was not used under ``provider="auto"``, or None."""
    compared: bool
    """False when no model was given: the graph was only checked and run."""
    tasks: list[TaskCheck]
    passed: bool
    notices: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    """What a precision adds (``precision``)."""
    """What was compared with what (:func:`validate`), with ``$parameter`` names (see
    ``errors.ParameterError``; ``notice_lines`` renders them)."""

    def notice_lines(self, name: Callable[[str], str] | None = None) -> list[str]:
        return [name_parameters(n, name) for n in self.notices]

    def to_dict(self, name: Callable[[str], str] | None = None) -> dict:
        return {"path": str(self.path), "format": self.format, "provider": self.provider, "notice": self.notice,
                "compared": self.compared, "tasks": [t.to_dict() for t in self.tasks], "passed": self.passed,
                "notices": self.notice_lines(name), **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ValidationReport:
        """From ``exporter.validation.validate_file``'s dict; keys without a field go to ``extra``."""
        names = TaskCheck.__dataclass_fields__
        tasks = [TaskCheck(**{k: v for k, v in t.items() if k in names},
                           extra={k: v for k, v in t.items() if k not in names and v is not None})
                 for t in d["tasks"]]
        own = ("path", "format", "provider", "notice", "compared", "tasks", "passed")
        return cls(Path(d["path"]), d["format"], d["provider"], d["notice"], d["compared"], tasks, d["passed"],
                   extra={k: v for k, v in d.items() if k not in own})


class Exports(list):
    """The files one :func:`export` wrote (a list of ``ExportedFile``), and what they came from."""

    def __init__(self, files: Iterable[ExportedFile], *, checkpoint: Path | None, source_sha256: str | None,
                 opset: int, ir_version: int, notice: str | None) -> None:
        super().__init__(files)
        self.checkpoint = checkpoint
        """The checkpoint exported (None for a model given as an object)."""
        self.source_sha256 = source_sha256
        self.opset = opset
        self.ir_version = ir_version
        """The IR version every file was written with."""
        self.notice = notice
        """Why validation ran on the CPU under ``provider="auto"``, or None."""

    @property
    def passed(self) -> bool | None:
        """Every file matches PyTorch (None when not validated)."""
        results = [f.passed for f in self]
        return None if any(r is None for r in results) else all(results)


@dataclass
class StorageReport:
    """The storage report of ``packnet report`` (fields: ``docs/report.md``)."""

    data: dict

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def storage(self) -> dict:
        """Bits, bytes, MB and ratio to separate networks of every approach."""
        return self.data["storage"]

    @property
    def files(self) -> list[dict]:
        """The exported files measured (``exports``), with their theory."""
        return self.data["files"]

    def to_dict(self) -> dict:
        return self.data


@dataclass
class TaskSummary:
    """One task of a checkpoint: what it owns and what it runs with."""

    task: int
    """1-based position in training order."""
    name: str
    classes: int
    prune: float
    """The fraction of its trained weights the task freed."""
    resize: str
    owned: int
    """Prunable weights this task owns."""
    used: int
    """Prunable weights the task runs with: those of tasks 1..``task``."""
    metrics: dict


@dataclass
class LayerOwners:
    """Owner counts of one prunable layer."""

    layer: str
    shape: list[int]
    weights: int
    free: int
    owned: dict[str, int]
    """Task name -> weights of this layer it owns."""


@dataclass
class Inspection:
    """What ``packnet inspect`` shows: the architecture, its tasks and every layer's owners."""

    checkpoint: str | None
    arch: str
    arch_kwargs: dict
    image_size: int
    mean: list[float]
    std: list[float]
    per_task_norm: bool
    prunable_weights: int
    free: int
    free_fraction: float
    """Free weights over prunable weights: the capacity left for future tasks."""
    tasks: list[TaskSummary]
    layers: list[LayerOwners]

    def to_dict(self) -> dict:
        """The ``--json`` output of ``packnet inspect``."""
        return asdict(self)


# ----------------------------------------------------------------------------- models
def inspect(model_or_path: PackNet | PathLike) -> Inspection:
    """Tasks, classes, accuracies and per-layer owner counts of a checkpoint (needs no torchvision)."""
    from .storage import owner_layers, owner_totals

    model, path = _model(model_or_path)
    counted = owner_layers(model)
    totals = owner_totals(counted, len(model.tasks))
    layers = [LayerOwners(c.name, c.shape, c.weights, c.counts[0], dict(zip(model.task_names, c.counts[1:])))
              for c in counted]
    n = sum(totals)
    tasks = [TaskSummary(i, t.name, t.num_classes, t.prune, t.resize_mode, totals[i], sum(totals[1:i + 1]), t.metrics)
             for i, t in enumerate(model.tasks, start=1)]
    return Inspection(None if path is None else str(path), model.arch, model.arch_kwargs, model.image_size,
                      list(model.mean), list(model.std), model.per_task_norm, n, totals[0],
                      totals[0] / n if n else 0.0, tasks, layers)


def create(arch: str, *, image_size: int | None = None, width: int | None = None, per_task_norm: bool = False,
           pretrained: bool = False, weights: PathLike | None = None, seed: int = 0, output: PathLike | None = None,
           force: bool = False, arch_kwargs: dict | None = None) -> PackNet:
    """An empty PackNet model: every weight free, no task yet.

    ``pretrained`` starts from torchvision's ImageNet weights (downloads them once);
    ``weights`` from a local state dict (.pth/.pt read with ``weights_only=True``, or
    .safetensors). ``width`` is vgg_mini's base width; ``arch_kwargs`` other keyword arguments
    of the architecture's builder (JSON values, stored in the checkpoint). With ``output`` the model is also
    written there (:func:`save`; checked before anything is built or downloaded).
    """
    from . import checkpoint, models, params

    spec = models.get_arch(arch)  # every parameter first, before any file is touched
    arch_kwargs = dict(arch_kwargs or {})
    if width is not None:
        if arch != "vgg_mini":
            raise ParameterError("width", "$width applies to vgg_mini only; other architectures take $arch_kwargs")
        arch_kwargs["width"] = params.integer(width, "width", 1, params.MAX_WIDTH)
    image_size = params.image_size(image_size or spec.default_image_size, "image_size", arch, arch_kwargs)
    params.seed(seed)
    if output is not None:
        _check_new_file(output, force)
    if pretrained and weights is not None:
        raise ParameterError("weights", "choose one of $pretrained and $weights")
    state, classes = None, None
    if pretrained:
        state, classes = models.pretrained_state_dict(arch)
    elif weights is not None:
        from .weights import load_state_dict

        state = load_state_dict(weights)
    model = checkpoint.PackNet.create(arch, image_size, arch_kwargs, per_task_norm, state, classes, seed)
    if output is not None:
        save(model, output, force=True)
    return model


def load(path: PathLike) -> PackNet:
    """Read a checkpoint (every check of the file format runs)."""
    from . import checkpoint

    return checkpoint.load(path)


def save(model: PackNet, path: PathLike, *, force: bool = False) -> Path:
    """Write ``model`` to ``path`` atomically; an existing file needs ``force``."""
    from . import checkpoint

    path = Path(path)
    _check_new_file(path, force)
    checkpoint.save(model, path)
    return path


def _check_new_file(path: PathLike, force: bool) -> None:
    """Before any work: ``path`` can be written (``files.output_file``) and, unless ``force``,
    does not exist yet."""
    from .files import output_file

    if output_file(path, "output").exists() and not force:
        raise ParameterError("force", f"{path} exists; pass $force to overwrite it")


def _model(model_or_path: PackNet | PathLike) -> tuple[PackNet, Path | None]:
    from .checkpoint import PackNet

    if isinstance(model_or_path, PackNet):
        return model_or_path, None
    return load(model_or_path), Path(model_or_path)


def _task_number(model: PackNet, task: TaskRef, parameter: str = "task") -> int:
    if isinstance(task, bool) or not isinstance(task, int | str):
        raise ParameterError(parameter, f"${parameter} must be a task name or a 1-based position, not {task!r}")
    if isinstance(task, int):
        if not 1 <= task <= len(model.tasks):
            raise ParameterError(parameter, f"${parameter} {task} is not a task position: the model has "
                                 f"{len(model.tasks)} task(s) ({', '.join(model.task_names) or 'none yet'})")
        return task
    return model.task_number(task)


MAX_ONNX_FILE_BYTES = 2**31
"""Protobuf's limit on one serialized message: no ONNX graph file is larger."""


# ----------------------------------------------------------------------------- training
def add_task(model: PackNet | PathLike, name: str, data: PathLike, config: TrainConfig | None = None, *,
             output: PathLike | None = None, force: bool = False, restart: bool = False,
             observer: Observer | None = None) -> AddedTask:
    """Train task ``name`` on the free weights of ``model``, prune it, fine-tune it, freeze it.

    ``model`` is a checkpoint path (the result replaces it, atomically, unless ``output``
    names another file) or a ``PackNet`` (then nothing is written unless ``output`` is
    given). With a file to write, an interrupted run keeps its last finished epoch in
    ``<output>.resume`` and the same call resumes from it (``restart`` discards it); the
    result is bit-identical to an uninterrupted run. Under ``torchrun`` every process calls
    this; rank 0 writes.
    """
    from . import checkpoint, params
    from .distributed import is_main_process, setup_from_env
    from .training import TrainConfig, resume_path_for
    from .training import add_task as train_task

    config = config or TrainConfig()
    params.name(name, "name")  # every parameter before any file is read or written
    config.validate()
    source, path = _model(model)
    output = Path(output) if output is not None else path
    setup_from_env(config.device)
    if output is not None:  # fail now, not after the first (possibly hour-long) epoch
        from .files import output_file

        output = output_file(output, "output" if output != path else "checkpoint")
        if output != path and output.exists() and not force:
            raise ParameterError("output", f"{output} exists; pass $force to overwrite it, or choose another $output")
    if config.amp == "fp16" and not config.device.startswith("cuda"):
        raise ParameterError("amp", "$amp fp16 is for CUDA GPUs (on a CPU it runs ~100x slower than fp32); "
                             "use $amp bf16 on a CPU, or $device cuda")
    resume = resume_path_for(output) if output is not None else None
    if restart and resume is not None and resume.exists() and is_main_process():
        resume.unlink()
    sha = checkpoint.file_sha256(path) if path is not None else ""
    new = train_task(source, name, data, config, observer, resume, sha)
    if output is not None and is_main_process():
        try:
            checkpoint.check_model(new)
        except PackNetError as exc:  # e.g. an infinite running variance: the run diverged
            if resume is not None:
                resume.unlink(missing_ok=True)  # its epochs hold the same diverged weights
            raise ParameterError("lr", f"training diverged ({exc}); nothing was written: lower $lr (or "
                                 "$finetune_lr) and run again") from None
        checkpoint.save(new, output)
        resume.unlink(missing_ok=True)
    return AddedTask(new, new.tasks[-1], len(new.tasks), new.free_fraction(), output)


def evaluate(model: PackNet | PathLike, task: TaskRef, data: PathLike, *, split: str = "test", batch_size: int = 128,
             device: str = "cpu", workers: int = 0, strict: bool = False,
             observer: Observer | None = None) -> Evaluation:
    """Accuracy of ``task`` on ``data``'s ``split`` folder, computed as the task runs."""
    from . import params
    from .choices import SPLITS
    from .training import evaluate_task

    if split not in SPLITS:
        raise ParameterError("split", f"$split must be {' or '.join(SPLITS)}, not {split!r}")
    params.eval_options(split, batch_size, device, workers)
    net, _ = _model(model)
    name = net.tasks[_task_number(net, task) - 1].name
    result = dict(evaluate_task(net, name, data, split, batch_size, device, workers, strict, observer))
    fields = Evaluation.__dataclass_fields__
    return Evaluation(**{k: result.pop(k) for k in list(result) if k in fields and k != "extra"}, extra=result)


# ----------------------------------------------------------------------------- export
def _data_map(data: PathLike | Mapping[str, PathLike] | None, names: list[str]) -> dict[str, Path] | None:
    """Task name -> ImageFolder root: ``data`` itself for one task, ``data/<task>`` for several."""
    if data is None:
        return None
    if isinstance(data, Mapping):
        return {k: Path(v) for k, v in data.items()}
    from .files import existing_folder

    data = existing_folder(data, "$data")  # a FIFO, a symlink loop, a path too long: one line
    if len(names) == 1:
        return {names[0]: data}
    found = {n: data / n for n in names if (data / n).is_dir()}
    if not found:
        raise ParameterError("data", f"with several tasks, $data must hold one folder per task "
                             f"({data}/<task>/test/...); none of {', '.join(names)} is there")
    return found


def export(model_or_path: PackNet | PathLike | None = None, out_dir: PathLike = "exports", *,
           tasks: Sequence[TaskRef] | None = None, formats: str | Iterable[str] = ("dense",), opset: int | None = None,
           ir_version: int | None = None, layout: str | None = None, force: bool = False, validate: bool = True,
           provider: str = "auto", data: PathLike | Mapping[str, PathLike] | None = None,
           precision: str | None = None, calibration: PathLike | None = None, calibration_images: int | None = None,
           max_accuracy_drop: float | None = None, fp16_io: bool = False, activation_type: str | None = None,
           progress: Callable[[str], None] | None = None) -> Exports:
    """Export ``tasks`` of a model (the bundled sample when None) to ONNX in ``out_dir``,
    then check each file against PyTorch with onnxruntime (``validate``).

    ``tasks`` None exports every task; ``formats`` is a name of ``exporter.FORMATS``, a list
    of them, or ``"all"``. ``opset`` (default 18), ``ir_version`` (default: the lowest the
    opset needs), ``layout`` of the multi-task graph (default ``branches``). ``data``: an
    ImageFolder root (``<data>/<task>`` for several tasks, or a mapping task -> root) whose
    ``test/`` images replace the random validation inputs. ``progress`` receives one line
    per step (a provider notice, each file as it is written).

    ``precision``: fp32 (default), fp16 (``fp16_io``: float16 inputs and logits too) or int8,
    calibrated on ``calibration_images`` training images per task from ``calibration`` (an
    ImageFolder root with ``train/``; default: ``data``); an int8 file fails validation when
    it loses more than ``max_accuracy_drop`` top-1 points against the fp32 model
    (``docs/quantization.md``); its activations are ``activation_type`` uint8 (default,
    fastest on x86) or int8 (ARM CPUs, NPUs, TFLite's int8 scheme).

    Returns the files written (:class:`Exports`, a list); with ``validate`` each carries
    its :class:`ValidationReport` (``file.validation``, ``file.passed``). Every check that
    can fail runs before the first file is written, ``provider="cuda"`` without a usable GPU
    included.
    """
    from . import checkpoint
    from .exporter import formats as fmt
    from .exporter import pipeline, validation
    from .exporter.writer import ir_version_for
    from .files import existing_folder, output_folder, regular_file

    opset = fmt.DEFAULT_OPSET if opset is None else opset
    layout = fmt.DEFAULT_LAYOUT if layout is None else layout
    precision = fmt.DEFAULT_PRECISION if precision is None else precision
    calibration_images = fmt.DEFAULT_CALIBRATION_IMAGES if calibration_images is None else calibration_images
    max_accuracy_drop = fmt.DEFAULT_MAX_ACCURACY_DROP if max_accuracy_drop is None else max_accuracy_drop
    names = fmt.resolve_formats(formats)
    fmt.check_opset(opset)
    written_ir = ir_version_for(opset, ir_version)
    fmt.check_precision(precision)
    if fp16_io and precision != "fp16":
        raise ParameterError("fp16_io", "$fp16_io applies to $precision fp16 only")
    if activation_type is not None and precision != "int8":
        raise ParameterError("activation_type", "$activation_type applies to $precision int8 only")
    activation_type = fmt.DEFAULT_ACTIVATION_TYPE if activation_type is None else activation_type
    fmt.check_activation_type(activation_type, names)
    if "multitask" in names:  # the same checks as the pipeline's, before the provider probe prints anything
        fmt.check_layout(layout)
        fmt.check_layout_opset(layout, opset)
        fmt.check_layout_precision(layout, precision)
    if max_accuracy_drop < 0:
        raise ParameterError("max_accuracy_drop", f"$max_accuracy_drop must be 0 or more, got {max_accuracy_drop}")
    out_dir = output_folder(out_dir, "output")
    if model_or_path is not None and not isinstance(model_or_path, checkpoint.PackNet):
        regular_file(model_or_path, "checkpoint")  # a bad path is reported before the provider probe
    if data is not None and not isinstance(data, Mapping):
        existing_folder(data, "$data")
    if provider not in fmt.PROVIDERS:
        raise ParameterError("provider", f"unknown $provider {provider!r}; choose one of: {', '.join(fmt.PROVIDERS)}")
    if model_or_path is None:
        model_or_path = pipeline.sample_checkpoint()
        if progress:
            progress(f"using the bundled sample {model_or_path}")
    model, path = _model(model_or_path)
    sha = checkpoint.file_sha256(path) if path is not None else None
    if tasks is None:
        numbers = list(range(1, len(model.tasks) + 1))
    else:
        numbers = list(dict.fromkeys(_task_number(model, t, "tasks") for t in tasks))
    per_task = [f for f in names if fmt.REGISTRY[f].per_task]
    if not numbers and per_task:
        raise ParameterError("tasks", f"choose a task with $tasks NAME for the {'/'.join(per_task)} files; "
                             f"{path or 'the model'} has: {', '.join(model.task_names) or 'no task yet'}")
    checked = [model.tasks[k - 1].name for k in numbers] or model.task_names
    data_map = _data_map(data, checked) if validate else None
    for name, root in (data_map or {}).items():  # a bad data folder fails before anything is written
        validation.check_image_data(model, model.task_number(name), root)
    calibrated = None
    if precision == "int8":
        if calibration is None and data is not None and not isinstance(data, Mapping):
            calibration = data
            if progress:
                progress(f"calibrating on the training images of $data {data}")
        calibrated = pipeline.calibration_sets(model, numbers, names, calibration, calibration_images, layout)
    notice = None
    if validate:  # after every check, before any file: provider="cuda" fails here when CUDA is unusable
        notice = validation.probe_provider(provider).notice
        if notice:
            provider = "cpu"
            if progress:
                progress(f"note: {notice}")
    files = pipeline.export(model, Path(out_dir), numbers, names, opset, force, sha, progress, layout, ir_version,
                            precision=precision, calibration=calibrated, fp16_io=fp16_io,
                            activation_type=activation_type)
    if validate:
        by_name = {model.tasks[k - 1].name: c for k, c in (calibrated or {}).items()}
        for f in files:
            wanted = [n for n in checked if f.task is None or n == f.task]
            f.validation = ValidationReport.from_dict(validation.validate_file(
                f.path, model, wanted, provider, data_map, calibration=by_name, max_accuracy_drop=max_accuracy_drop))
    return Exports(files, checkpoint=path, source_sha256=sha, opset=opset, ir_version=written_ir, notice=notice)


def validate(onnx_path: PathLike, model: PackNet | PathLike | None = None, *, task: TaskRef | None = None,
             data: PathLike | Mapping[str, PathLike] | None = None, provider: str = "auto",
             max_accuracy_drop: float | None = None) -> ValidationReport:
    """Check an exported file: the ONNX checker, onnxruntime against ``model`` on random
    inputs or ``data``'s test images, accuracy and latency. Without ``model`` the graph is
    only checked and run. A mismatch is a report with ``passed`` False, not an exception.
    """
    from . import checkpoint
    from .exporter import pipeline, validation
    from .files import existing_folder, regular_file

    onnx_path = regular_file(onnx_path, "$onnx_path")  # never open a FIFO or a device
    if onnx_path.stat().st_size > MAX_ONNX_FILE_BYTES:  # do not read 10 GB to find out
        raise ParameterError("onnx_path", f"$onnx_path {onnx_path} is {onnx_path.stat().st_size / 1e9:.1f} GB: not "
                             "an ONNX file (protobuf caps one at 2 GiB; larger models keep their weights in a "
                             ".onnx.data file beside it)")
    if data is not None and not isinstance(data, Mapping):
        existing_folder(data, "$data")
    meta = validation.read_metadata(onnx_path)
    names = validation.file_tasks(meta)
    source_sha = meta.get("packnet.source_sha256", "")
    notices = []
    net = None
    source_matches = None
    if model is not None:
        net, path = _model(model)
        if source_sha and path is not None:
            source_matches = checkpoint.file_sha256(path) == source_sha
        if source_matches is False:
            notices.append(f"{path} is not the checkpoint {Path(onnx_path).name} was exported from (its sha256 "
                           "differs from the file's packnet.source_sha256): comparing anyway")
    elif (pipeline.SAMPLE_CHECKPOINT.is_file() and source_sha
          and source_sha == checkpoint.file_sha256(pipeline.SAMPLE_CHECKPOINT)):
        net = checkpoint.load(pipeline.SAMPLE_CHECKPOINT)
        notices.append(f"comparing with the bundled sample {pipeline.SAMPLE_CHECKPOINT} it was exported from")
    else:
        notices.append("no $model: checked the graph and that it runs; pass $model to compare with PyTorch")
    wanted = None
    if isinstance(task, int) and not isinstance(task, bool):
        if not 1 <= task <= len(names):
            raise ParameterError("task", f"$task {task} is not a task position of {onnx_path}: it computes "
                                 f"{', '.join(names) or 'no named task'}")
        wanted = [names[task - 1]]
    elif task is not None:
        wanted = [task]
    if data is not None and net is None:
        raise ParameterError("data", "$data needs the checkpoint the file came from: pass $model")
    from .exporter.formats import DEFAULT_MAX_ACCURACY_DROP

    drop = DEFAULT_MAX_ACCURACY_DROP if max_accuracy_drop is None else max_accuracy_drop
    report = ValidationReport.from_dict(validation.validate_file(onnx_path, net, wanted, provider,
                                                                 _data_map(data, wanted or names),
                                                                 max_accuracy_drop=drop))
    report.notices = notices
    report.extra["source_matches"] = source_matches
    return report


# ----------------------------------------------------------------------------- report and import
def report(model_or_path: PackNet | PathLike, *, exports: PathLike | None = None,
           skip_unreadable: bool = False) -> StorageReport:
    """Storage bit-cost of a trained model against separate networks, the paper's accounting,
    the official one-byte mask, the entropy bound and Piggyback; with ``exports``, the real
    size of every file in that folder next to its theory. A file there that is not a readable
    graph of this project raises, or with ``skip_unreadable`` is listed as skipped."""
    from . import storage
    from .files import existing_folder

    if skip_unreadable and exports is None:
        raise ParameterError("skip_unreadable", "$skip_unreadable applies to $exports only")
    exports = None if exports is None else existing_folder(exports, "$exports")
    model, path = _model(model_or_path)
    return StorageReport(storage.build_report(storage.inventory_from_model(model, path), exports, skip_unreadable))


def plan(arch: str, tasks: Sequence[tuple[str, int]] | str, *, prune: Sequence[float] | str | None = None,
         image_size: int | None = None, width: int | None = None, per_task_norm: bool = False,
         exports: PathLike | None = None, skip_unreadable: bool = False) -> StorageReport:
    """The same report before training: owners as the pruning schedule assigns them.

    ``tasks``: ``[(name, classes), ...]`` in training order (or ``"name:classes,..."``);
    ``prune``: the fraction each task frees (default 0.5 for the first, 0.75 after);
    ``exports``: a folder of files to measure against this theory.
    """
    from . import params, storage

    spec = storage.parse_tasks(tasks) if isinstance(tasks, str) else [(str(n), int(c)) for n, c in tasks]
    if prune is None or isinstance(prune, str):
        fractions = storage.parse_prune(prune, len(spec))
    else:
        fractions = storage.parse_prune(",".join(str(float(f)) for f in prune), len(spec))
    kwargs = params.arch_kwargs(arch, width)
    if image_size is not None:
        params.image_size(image_size, "image_size", arch, kwargs)
    if exports is not None:
        from .files import existing_folder

        exports = existing_folder(exports, "$exports")
    inventory = storage.plan_inventory(arch, spec, fractions, image_size, kwargs, per_task_norm)
    return StorageReport(storage.build_report(inventory, exports, skip_unreadable))


def import_checkpoint(path: PathLike, *, source: str = "auto", arch: str | None = None, image_size: int | None = None,
                      task_names: Sequence[str] | None = None, classes: Mapping[str, Sequence[str]] | None = None,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      output: PathLike | None = None, force: bool = False) -> PackNet:
    """Convert a model trained with the official PackNet code or Avalanche into a PackNet.

    The file is read with a restricted unpickler that never runs code from it. With
    ``output`` the result is written there and read back with every check later commands
    run.
    """
    from .importers import import_file, write_checkpoint

    if output is not None:
        _check_new_file(output, force)
    model = import_file(path, source, arch=arch, image_size=image_size,
                        task_names=list(task_names) if task_names is not None else None,
                        classes={k: list(v) for k, v in (classes or {}).items()},
                        mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None)
    if output is not None:  # staged, loaded back, then renamed: a failing import never replaces a file
        write_checkpoint(model, output, force)
    return model
