"""The PackNet checkpoint: one safetensors file, no pickle.

Tensors (see ``docs/checkpoint-format.md``)::

    shared/<key>            backbone tensors: prunable weights, and norm/bias tensors
    owner/<key>             uint8 owner mask of each prunable weight (0 free, k task k)
    task/<k>/<key>          task k's head, and its own norm/bias tensors when they are per task
    pretrained_head/<key>   the ImageNet head of pretrained weights, until a first task uses it

The safetensors header's ``__metadata__`` holds one entry, ``packnet``: a JSON document with
the format version, architecture, input size and normalization, and the tasks in order.
Files are written to a temporary name in the same folder, flushed, then renamed over the
target, so a crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from . import masks, models, params
from .choices import RESIZE_MODES
from .errors import PackNetError, closest
from .files import check_safetensors_header, output_file, regular_file, shown

FORMAT_NAME = "packnet-export"
FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STALE_TEMP_SECONDS = 3600
"""A temporary file of ``atomic_path`` untouched this long was left by a killed writer."""


@dataclass
class TaskInfo:
    name: str
    classes: list[str]
    prune: float
    """Fraction of the task's weights asked to be freed for later tasks (``--prune``); ties at the
    cutoff and exact zeros are freed too, so the owner masks can show more."""
    metrics: dict = field(default_factory=dict)
    """Accuracies measured when the task was finished (val, test), and the image counts."""
    training: dict = field(default_factory=dict)
    """The hyper-parameters the task was trained with."""
    resize: str | None = None
    """``crop`` or ``squash`` (``RESIZE_MODES``): how the task's images are resized, in training,
    evaluation and deployment alike. None: a task stored before the field existed, which was
    trained with ``crop``, the only mode there was (``resize_mode``)."""

    @property
    def resize_mode(self) -> str:
        return self.resize or "crop"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class PackNet:
    """A multi-task PackNet model in memory: shared weights, owner masks, per-task parts."""

    arch: str
    arch_kwargs: dict
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    per_task_norm: bool = False
    """False (the paper): biases and batch norm are trained with task 1, then frozen.
    True (CPG-style): every task learns and stores its own."""
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    owners: dict[str, torch.Tensor] = field(default_factory=dict)
    tasks: list[TaskInfo] = field(default_factory=list)
    task_tensors: list[dict[str, torch.Tensor]] = field(default_factory=list)
    pretrained_head: dict[str, torch.Tensor] = field(default_factory=dict)
    pretrained_classes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    """Free-form provenance (e.g. where an imported model came from)."""

    # ----------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        arch: str,
        image_size: int | None = None,
        arch_kwargs: dict | None = None,
        per_task_norm: bool = False,
        pretrained: dict[str, torch.Tensor] | None = None,
        pretrained_classes: list[str] | None = None,
        seed: int = 0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> PackNet:
        """A fresh model: every prunable weight free, no task yet."""
        spec = models.get_arch(arch)
        arch_kwargs = dict(arch_kwargs or {})
        if arch_kwargs:
            models.check_arch_kwargs(arch, arch_kwargs)
        image_size = params.image_size(image_size or spec.default_image_size, "image_size", arch, arch_kwargs)
        mean = params.normalization(mean, "mean")
        std = params.normalization(std, "std", std=True)
        torch.manual_seed(params.seed(seed))
        head = models.head_keys(arch)
        num_classes = 10
        if pretrained is not None and head[0] in pretrained and pretrained[head[0]].dim() >= 2:
            num_classes = pretrained[head[0]].shape[0]
        module = models.build(arch, num_classes, arch_kwargs)
        pretrained_head: dict[str, torch.Tensor] = {}
        if pretrained is not None:
            try:
                module.load_state_dict(pretrained)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()
                raise PackNetError(
                    f"the weights do not fit {arch}: {first[1].strip() if len(first) > 1 else first[0]}"
                ) from None
            pretrained_head = {k: module.state_dict()[k].clone() for k in head}
        state = module.state_dict()
        prunable, _, _ = models.split_state_keys(module, arch)
        shared = {k: v.detach().clone() for k, v in state.items() if k not in head}
        owners = {k: torch.zeros(shared[k].shape, dtype=torch.uint8) for k in prunable}
        return cls(
            arch=arch,
            arch_kwargs=arch_kwargs,
            image_size=image_size,
            mean=tuple(mean),
            std=tuple(std),
            per_task_norm=per_task_norm,
            shared=shared,
            owners=owners,
            pretrained_head=pretrained_head,
            pretrained_classes=list(pretrained_classes or []),
        )

    # ------------------------------------------------------------------ queries
    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task_number(self, name: str) -> int:
        """1-based number of the task called ``name``; a helpful error if there is none."""
        for i, t in enumerate(self.tasks, start=1):
            if t.name == name:
                return i
        shown_name = params.shown_value(name)
        if not self.tasks:
            raise PackNetError(f"no task {shown_name}: the checkpoint has no tasks yet; "
                               "add one with `packnet add-task`")
        hint = closest(name, self.task_names) if len(name) < 100 else ""
        raise PackNetError(f"no task {shown_name}{hint}; the checkpoint has: {', '.join(self.task_names)}")

    def norm_bias_keys(self) -> list[str]:
        return [k for k in self.shared if k not in self.owners]

    def task_state_dict(self, task: int) -> dict[str, torch.Tensor]:
        """The complete state dict task ``task`` (1-based) runs with.

        Prunable weights are masked to the task's view (owner in 1..task); norm/bias come
        from the task's own copy when it has one, else the shared one; the head is the
        task's. The stored tensors are never modified.
        """
        if not 1 <= task <= len(self.tasks):
            raise IndexError(task)
        state = dict(self.shared)
        state.update(masks.masked_weights(self.shared, self.owners, task))
        state.update(self.task_tensors[task - 1])
        return state

    def task_module(self, task: int | str) -> torch.nn.Module:
        """A standalone ``nn.Module`` (eval mode) computing task ``task``'s logits."""
        k = self.task_number(task) if isinstance(task, str) else task
        module = models.build(self.arch, self.tasks[k - 1].num_classes, self.arch_kwargs)
        module.load_state_dict(self.task_state_dict(k))
        return module.eval()

    def free_fraction(self) -> float:
        total = sum(o.numel() for o in self.owners.values())
        free = sum(int((o == masks.FREE).sum()) for o in self.owners.values())
        return free / total if total else 0.0

    def metadata(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "per_task_norm": self.per_task_norm,
            # a task stored before ``resize`` existed keeps its metadata as it was
            "tasks": [{k: v for k, v in asdict(t).items() if not (k == "resize" and v is None)} for t in self.tasks],
            "pretrained_classes": self.pretrained_classes,
            "extra": self.extra,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for k, v in self.shared.items():
            out[f"shared/{k}"] = v
        for k, v in self.owners.items():
            out[f"owner/{k}"] = v
        for i, tensors in enumerate(self.task_tensors, start=1):
            for k, v in tensors.items():
                out[f"task/{i}/{k}"] = v
        for k, v in self.pretrained_head.items():
            out[f"pretrained_head/{k}"] = v
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: str = "wb", param: str = "output") -> Iterator:
    """Open a temporary file beside ``path``; rename it over ``path`` only on success.

    ``files.output_file`` checks the destination first (``param`` names it in errors): the
    folder exists, the name fits, and nothing but a regular file is ever replaced.
    """
    path = output_file(path, param)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise PackNetError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, mode) as handle:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(handle.fileno(), 0o666 & ~umask)  # mkstemp's 0600 would hide the file from others
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _remove_stale_temps(folder, path.name)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PackNetError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_stale_temps(folder: Path, name: str) -> None:
    """Delete temporary files of ``name`` that a killed writer left (too old to belong to a live one)."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for old in folder.glob(f".{glob.escape(name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                old.unlink()


def check_model(model: PackNet) -> None:
    """Raise ``PackNetError(what is wrong)`` if ``load`` would refuse ``model`` once saved."""
    _check_consistent(model, PackNetError)


def save(model: PackNet, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically, after the checks ``load`` runs.

    A file this writes always loads: a model that ``load`` would refuse (NaN weights from a
    diverged run, a name or a value out of range) is refused here, and nothing is written.
    """
    _check_consistent(model, lambda what: PackNetError(f"refusing to write {shown(path)}: {what}"))
    blob = st_save(model.tensors(), metadata={"packnet": json.dumps(model.metadata())})
    with atomic_path(path) as handle:
        handle.write(blob)


# ---------------------------------------------------------------------- reading
def _fail(path, what: str) -> PackNetError:
    return PackNetError(f"{shown(path)} is not a usable PackNet checkpoint: {what}")


def load(path: str | os.PathLike) -> PackNet:
    """Read and check a checkpoint; any defect is a one-line ``PackNetError``.

    The path is ``stat``-ed first (``files.regular_file``: never a FIFO, a device or a
    folder), then the header is checked against the real file size (``check_safetensors_header``),
    and only then is the file mapped and its tensors copied.
    """
    path = regular_file(path, "checkpoint")
    check_safetensors_header(path, lambda what: _fail(path, what))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get("packnet")
            if meta_raw is None:
                raise _fail(path, "it is a safetensors file without PackNet metadata")
            meta = _parse_metadata(path, meta_raw)
            # copies, not views of the memory-mapped file: a file rewritten in place later must not
            # change the loaded model (or kill the process with SIGBUS when it shrinks)
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except PackNetError:
        raise
    except MemoryError:
        raise _fail(path, "not enough memory to read it (is a memory limit set, e.g. ulimit -v?)") from None
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise _fail(path, f"unreadable ({msg[:200]})") from None
    return _from_parts(path, meta, tensors)


def _parse_metadata(path, raw: str) -> dict:
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise _fail(path, "its metadata is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise _fail(path, "its metadata is not PackNet metadata")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise _fail(path, "format_version is missing")
    if version > FORMAT_VERSION:
        raise PackNetError(
            f"{path} has format version {version}, newer than this packnet-export reads "
            f"({FORMAT_VERSION}); upgrade packnet-export"
        )
    return meta


def _from_parts(path, meta: dict, tensors: dict[str, torch.Tensor]) -> PackNet:
    try:
        arch = meta["arch"]
        try:
            models.get_arch(arch)
        except PackNetError:
            kwargs = meta.get("arch_kwargs")
            raise _fail(path, models.unregistered_message(str(arch), kwargs if isinstance(kwargs, dict) else {})
                        ) from None
        for key in ("image_size", "tasks", "mean", "std"):
            if key not in meta:
                raise KeyError(key)
        if type(meta["image_size"]) is not int or not isinstance(meta["tasks"], list):
            raise _fail(path, "image_size is not an integer" if type(meta["image_size"]) is not int
                        else "tasks is not a list")
        for key, kind in (("per_task_norm", bool), ("arch_kwargs", dict), ("extra", dict),
                          ("pretrained_classes", list)):
            if meta.get(key) is not None and not isinstance(meta[key], kind):
                raise _fail(path, f"{key} is not a {kind.__name__}")
        tasks = [
            TaskInfo(
                name=str(t["name"]),
                classes=[str(c) for c in t["classes"]],
                prune=float(t["prune"]),
                metrics=dict(t.get("metrics", {})),
                training=dict(t.get("training", {})),
                resize=_resize_mode(path, t),
            )
            for t in meta["tasks"]
        ]
        model = PackNet(
            arch=arch,
            arch_kwargs=dict(meta.get("arch_kwargs") or {}),
            image_size=int(meta["image_size"]),
            mean=tuple(float(x) for x in meta["mean"]),
            std=tuple(float(x) for x in meta["std"]),
            per_task_norm=bool(meta.get("per_task_norm", False)),
            tasks=tasks,
            pretrained_classes=[str(c) for c in meta.get("pretrained_classes", [])],
            extra=dict(meta.get("extra") or {}),
        )
    except PackNetError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise _fail(path, f"metadata lacks or mangles {exc}") from None
    if len(tasks) > masks.MAX_TASKS:
        raise _fail(path, f"{len(tasks)} tasks, more than an owner mask can hold")
    model.task_tensors = [{} for _ in tasks]
    for key, tensor in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "shared":
            model.shared[rest] = tensor
        elif kind == "owner":
            model.owners[rest] = tensor
        elif kind == "task":
            number, _, name = rest.partition("/")
            if not number.isdigit() or not 1 <= int(number) <= len(tasks):
                raise _fail(path, f"tensor {key!r} belongs to no task")
            model.task_tensors[int(number) - 1][name] = tensor
        elif kind == "pretrained_head":
            model.pretrained_head[rest] = tensor
        else:
            raise _fail(path, f"unexpected tensor {key!r}")
    _check_consistent(model, lambda what: _fail(path, what))
    return model


def _resize_mode(path, task: dict) -> str | None:
    resize = task.get("resize")
    if resize is not None and resize not in RESIZE_MODES:
        raise _fail(path, f"task {str(task.get('name'))[:50]!r} has resize {str(resize)[:50]!r}, "
                          f"not one of {', '.join(RESIZE_MODES)}")
    return resize


METRIC_RANGES = {"top1": (0.0, 100.0), "top5": (0.0, 100.0), "images": (0, 2**63 - 1)}
"""Metrics by name ending: accuracies in percent, image counts."""
MAX_CLASS_NAME_CHARS = 1000


def check_metadata(model: PackNet) -> None:
    """Raise ``PackNetError`` for metadata out of range; ``load`` and ``save`` both run it.

    Sharing one check means no command writes a file that the project then refuses. The
    bounds are those of ``params`` (the same as the command line's), plus what the
    checkpoint alone records: per task a valid name, at least one class (a one-output head is
    a legal network; zero outputs is not), class names unique and not empty, and metrics
    that are finite numbers in their range (``inspect`` formats them as numbers).
    """
    params.normalization(model.mean, "mean")
    params.normalization(model.std, "std", std=True)
    params.image_size(model.image_size, "image_size", model.arch, model.arch_kwargs)
    if not isinstance(model.per_task_norm, bool):
        raise PackNetError(f"per_task_norm must be true or false; got {params.shown_value(model.per_task_norm)}")
    for i, t in enumerate(model.tasks, start=1):
        params.name(t.name, f"task {i}'s name")
        where = f"task {i} ({t.name})"
        if not t.classes:
            raise PackNetError(f"{where} has no classes")
        for c in t.classes:
            if not isinstance(c, str) or not c or len(c) > MAX_CLASS_NAME_CHARS:
                raise PackNetError(f"{where} has a class name that is empty, not text or over "
                                   f"{MAX_CLASS_NAME_CHARS} characters: {params.shown_value(c)}")
        if len(set(t.classes)) != len(t.classes):
            twice = next(c for c in t.classes if t.classes.count(c) > 1)
            raise PackNetError(f"{where} names class {params.shown_value(twice)} twice")
        params.fraction(t.prune, f"{where}'s prune")
        if not isinstance(t.metrics, dict) or not isinstance(t.training, dict):
            raise PackNetError(f"{where}'s metrics or training record is not a JSON object")
        for key, value in t.metrics.items():
            bounds = next((b for end, b in METRIC_RANGES.items() if str(key).endswith(end)), (None, None))
            params.real(value, f"{where}'s metrics.{key}", *bounds)
    if not all(isinstance(c, str) for c in model.pretrained_classes):
        raise PackNetError("pretrained_classes must be a list of names")


def _check_consistent(model: PackNet, fail: Callable[[str], PackNetError]) -> None:
    """Everything a later step relies on, checked at load time and before every save.

    ``fail`` words the error (``X is not a usable PackNet checkpoint: ...`` when loading,
    ``refusing to write X: ...`` when saving).
    """
    try:
        # shapes only: a tampered width must not allocate what it declares
        reference = models.build_meta(model.arch, 10, model.arch_kwargs)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
        raise fail(f"architecture arguments {model.arch_kwargs} are invalid ({first})") from None
    try:
        check_metadata(model)
    except PackNetError as exc:
        raise fail(str(exc)) from None
    prunable, norm_bias, head = models.split_state_keys(reference, model.arch)
    expected = {k: v for k, v in reference.state_dict().items() if k not in head}
    missing = sorted(set(expected) - set(model.shared))
    extra = sorted(set(model.shared) - set(expected))
    if missing or extra:
        raise fail(f"backbone tensors {'missing ' + missing[0] if missing else 'unexpected ' + extra[0]}")
    for k, ref in expected.items():
        t = model.shared[k]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise fail(f"{k} has shape {tuple(t.shape)} {t.dtype}, expected {tuple(ref.shape)} {ref.dtype}")
    if set(model.owners) != set(prunable):
        raise fail("owner masks do not match the prunable weights")
    # keep the network's own order (safetensors sorts names), so reports read top to bottom
    model.shared = {k: model.shared[k] for k in expected}
    model.owners = {k: model.owners[k] for k in prunable}
    n = len(model.tasks)
    for k, o in model.owners.items():
        if o.dtype != torch.uint8 or o.shape != model.shared[k].shape:
            raise fail(f"owner mask of {k} has the wrong shape or type")
        if o.numel() == 0:
            raise fail(f"{k} is empty")
        if n < masks.MAX_TASKS and int(o.max()) > n:
            raise fail(f"owner mask of {k} names task {int(o.max())} but there are {n} tasks")
    head_w, head_b = models.head_keys(model.arch)
    allowed = set(norm_bias) | {head_w, head_b}
    ref_state = reference.state_dict()
    for i, (info, tensors) in enumerate(zip(model.tasks, model.task_tensors), start=1):
        if head_w not in tensors or head_b not in tensors:
            raise fail(f"task {i} ({info.name}) has no head")
        if tensors[head_w].dim() != ref_state[head_w].dim() or tensors[head_b].shape != tensors[head_w].shape[:1]:
            raise fail(f"task {i} ({info.name}) head has the wrong shape")
        if tensors[head_w].shape[0] != info.num_classes:
            raise fail(f"task {i} ({info.name}) head has {tensors[head_w].shape[0]} outputs for "
                              f"{info.num_classes} classes")
        for k, t in tensors.items():
            if k not in allowed:
                raise fail(f"task {i} has unexpected tensor {k!r}")
            if (k in expected and t.shape != expected[k].shape) or t.dtype != ref_state[k].dtype:
                raise fail(f"task {i} tensor {k} has the wrong shape or type")
        if tensors[head_w].shape[1:] != ref_state[head_w].shape[1:]:
            raise fail(f"task {i} head has the wrong input width")
    ph = model.pretrained_head
    if ph and (set(ph) != {head_w, head_b} or ph[head_b].shape != ph[head_w].shape[:1]
               or ph[head_w].shape[1:] != ref_state[head_w].shape[1:] or ph[head_w].dtype != ref_state[head_w].dtype):
        raise fail("its pretrained head has the wrong tensors or shapes")
    everything = [(k, t) for k, t in model.shared.items()]
    everything += [(f"task {i}: {k}", t) for i, ts in enumerate(model.task_tensors, 1) for k, t in ts.items()]
    everything += [(f"pretrained head: {k}", t) for k, t in model.pretrained_head.items()]
    for k, t in everything:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise fail(f"{k} holds NaN or Inf values")
        if k.endswith("running_var") and bool((t < 0).any()):
            raise fail(f"{k} holds a negative variance")
    names = model.task_names
    if len(set(names)) != len(names):
        raise fail("two tasks share a name")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
