"""Storage bit-cost of a PackNet model against the alternatives, in theory and on disk.

Everything is computed from an :class:`Inventory`: the owner counts of every prunable layer
plus the sizes of the norm/bias tensors and of each task's head. An inventory comes either
from a trained model (:func:`inventory_from_model`) or from a plan (:func:`plan_inventory`),
which replays the pruning schedule on owner *counts* (the same rounding as
``masks.prune_task``). A trained model frees at least as many: ties at the cutoff and exact
zeros are freed too, so its counts equal the plan's where no weight ties.

:func:`build_report` turns an inventory (and optionally a folder of exported files) into one
JSON-ready ``dict`` whose schema is documented in ``docs/report.md`` and versioned by
``SCHEMA_VERSION``; :func:`render_markdown` and :func:`plot_report` only read that dict.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import masks, models
from .errors import PackNetError, ParameterError
from .exporter.formats import FORMATS, REGISTRY

SCHEMA_NAME = "packnet-report"
SCHEMA_VERSION = 1
WEIGHT_BITS = 32
"""Width of a stored backbone weight in every theoretical count (fp32, as the paper)."""
MEGABYTE = 10**6

APPROACH_LABELS = {
    "separate": "separate networks (one full backbone per task)",
    "single_network": "one backbone with every head, no mask (lower bound)",
    "packnet_paper": "PackNet as the paper counts it (ceil(log2 values) bits/weight mask)",
    "packnet_official": "PackNet as the official code stores it (1 byte/weight mask)",
    "packnet_entropy": "PackNet with an entropy-coded mask (order-0 bound)",
    "piggyback": "Piggyback (fixed backbone, 1 bit/weight/added task)",
}


# --------------------------------------------------------------------------- inventory
@dataclass
class LayerCount:
    name: str
    shape: list[int]
    counts: list[int]
    """[free, owned by task 1, ..., owned by task T]."""

    @property
    def weights(self) -> int:
        return sum(self.counts)


@dataclass
class TaskSpec:
    name: str
    classes: int
    prune: float
    head_params: int
    head_bits: int


@dataclass
class Inventory:
    """What the storage arithmetic needs, and nothing else (no weight values)."""

    arch: str
    arch_kwargs: dict
    image_size: int
    per_task_norm: bool
    tasks: list[TaskSpec]
    layers: list[LayerCount]
    norm_bias_params: int
    norm_bias_bits: int
    """One copy of the biases and batch-norm tensors, at their stored widths."""
    source: str = "checkpoint"
    checkpoint: str | None = None
    checkpoint_bytes: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def prunable(self) -> int:
        return sum(layer.weights for layer in self.layers)

    def totals(self) -> list[int]:
        return owner_totals(self.layers, len(self.tasks))


def owner_layers(model) -> list[LayerCount]:
    """Owner counts of every prunable layer of a trained model (what ``inspect`` and the report show)."""
    n = len(model.tasks)
    return [LayerCount(k, list(o.shape), masks.owner_counts(o, n)) for k, o in model.owners.items()]


def owner_totals(layers: list[LayerCount], num_tasks: int) -> list[int]:
    """[free, owned by task 1, ..., owned by task T] over ``layers``."""
    out = [0] * (num_tasks + 1)
    for layer in layers:
        out = [a + b for a, b in zip(out, layer.counts)]
    return out


def _bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def inventory_from_model(model, path: str | os.PathLike | None = None) -> Inventory:
    """The inventory of a trained :class:`~packnet_export.checkpoint.PackNet` (its real owners)."""
    layers = owner_layers(model)
    head_w, head_b = models.head_keys(model.arch)
    tasks = []
    for info, tensors in zip(model.tasks, model.task_tensors):
        head = [tensors[k] for k in (head_w, head_b) if k in tensors]
        tasks.append(TaskSpec(info.name, info.num_classes, info.prune, sum(t.numel() for t in head),
                              sum(_bits(t) for t in head)))
    norm = [model.shared[k] for k in model.norm_bias_keys()]
    return Inventory(
        arch=model.arch, arch_kwargs=dict(model.arch_kwargs), image_size=model.image_size,
        per_task_norm=model.per_task_norm, tasks=tasks, layers=layers,
        norm_bias_params=sum(t.numel() for t in norm), norm_bias_bits=sum(_bits(t) for t in norm),
        source="checkpoint", checkpoint=None if path is None else str(path),
        checkpoint_bytes=None if path is None else os.path.getsize(path),
    )


def parse_tasks(spec: str) -> list[tuple[str, int]]:
    """``"imagenet:1000,cubs:200"`` -> ``[("imagenet", 1000), ("cubs", 200)]``; one-line errors."""
    example = "e.g. $tasks imagenet:1000,cubs:200,cars:196"
    items = [s.strip() for s in spec.split(",")]
    if not spec.strip() or any(not s for s in items):
        raise ParameterError("tasks", f"$tasks {spec!r} has an empty entry; write NAME:CLASSES,NAME:CLASSES "
                             f"({example})")
    tasks: list[tuple[str, int]] = []
    for item in items:
        name, sep, classes = item.partition(":")
        name, classes = name.strip(), classes.strip()
        if not sep or not name:
            raise ParameterError("tasks", f"$tasks entry {item!r} is not NAME:CLASSES ({example})")
        try:
            count = int(classes)
        except ValueError:
            raise ParameterError("tasks", f"$tasks entry {item!r}: {classes!r} is not a number of classes "
                                 f"({example})") from None
        if count < 1:
            raise ParameterError("tasks", f"$tasks entry {item!r}: a task needs at least 1 class")
        if name in dict(tasks):
            raise ParameterError("tasks", f"$tasks names {name!r} twice; task names must be unique")
        tasks.append((name, count))
    if len(tasks) > masks.MAX_TASKS:
        raise ParameterError("tasks", f"$tasks lists {len(tasks)} tasks; an owner mask holds at most {masks.MAX_TASKS}")
    return tasks


def parse_prune(spec: str | None, n_tasks: int) -> list[float]:
    """``"0.5,0.75,0"`` -> fractions, one per task; None gives training's defaults (0.5, then 0.75)."""
    from .training import DEFAULT_FIRST_PRUNE, DEFAULT_LATER_PRUNE

    if spec is None:
        return [DEFAULT_FIRST_PRUNE if i == 0 else DEFAULT_LATER_PRUNE for i in range(n_tasks)]
    items = [s.strip() for s in spec.split(",")]
    try:
        fractions = [float(s) for s in items]
    except ValueError:
        raise ParameterError("prune", f"$prune {spec!r} is not a comma-separated list of fractions, e.g. 0.5,0.75,0"
                             ) from None
    if len(fractions) != n_tasks:
        raise ParameterError("prune", f"$prune gives {len(fractions)} fraction(s) for {n_tasks} task(s); give one per "
                             "task")
    for f in fractions:
        if not 0.0 <= f < 1.0:
            raise ParameterError("prune", f"$prune fraction {f:g} is outside [0, 1)")
    return fractions


def plan_counts(weights: int, prune: list[float]) -> list[int]:
    """Owner counts of one layer of ``weights`` weights after the schedule ``prune``.

    Each task takes every free weight, then frees ``round(fraction * owned)`` of them, the
    rounding of :func:`packnet_export.masks.prune_task` (which frees ties at the cutoff too).
    """
    counts = [0] * (len(prune) + 1)
    free = weights
    for task, fraction in enumerate(prune, start=1):
        freed = int(round(fraction * free))
        counts[task] = free - freed
        free = freed
    counts[0] = free
    return counts


def plan_inventory(arch: str, tasks: list[tuple[str, int]], prune: list[float], image_size: int | None = None,
                   arch_kwargs: dict | None = None, per_task_norm: bool = False) -> Inventory:
    """The inventory a model would have after training ``tasks`` with ``prune``; no data, no training."""
    spec = models.get_arch(arch)
    if len(prune) != len(tasks):
        raise PackNetError(f"{len(prune)} prune fraction(s) for {len(tasks)} task(s); give one per task")
    image_size = image_size or spec.default_image_size
    if not 8 <= image_size <= 4096:
        raise ParameterError("image_size", f"$image_size {image_size} is outside 8..4096")
    try:
        # shapes only: no memory, no initialisation cost
        module = models.build_meta(arch, tasks[0][1] if tasks else 10, arch_kwargs)
    except TypeError as exc:
        raise PackNetError(f"invalid arguments {arch_kwargs} for {arch}: {exc}") from None
    prunable, norm_bias, head = models.split_state_keys(module, arch)
    state = module.state_dict()
    head_w = state[models.head_keys(arch)[0]]
    in_features, has_bias = head_w[0].numel(), len(head) == 2  # a 1x1 conv head (squeezenet): in x 1 x 1
    sizes = [state[k].numel() for k in prunable]
    for i in range(1, len(prune)):  # as training refuses: a task needs free weights to train
        if sum(plan_counts(n, prune[:i])[0] for n in sizes) == 0:
            raise ParameterError("prune", f"task {i + 1} ({tasks[i][0]}) would find no free weights: task {i} "
                                 f"({tasks[i - 1][0]}) frees none ($prune {prune[i - 1]:g}); only the last task "
                                 "may use $prune 0")
    layers = [LayerCount(k, list(state[k].shape), plan_counts(n, prune)) for k, n in zip(prunable, sizes)]
    specs = []
    for (name, classes), fraction in zip(tasks, prune):
        params = classes * in_features + (classes if has_bias else 0)
        specs.append(TaskSpec(name, classes, fraction, params, params * head_w.element_size() * 8))
    return Inventory(
        arch=arch, arch_kwargs=dict(arch_kwargs or {}), image_size=image_size, per_task_norm=per_task_norm,
        tasks=specs, layers=layers, norm_bias_params=sum(state[k].numel() for k in norm_bias),
        norm_bias_bits=sum(_bits(state[k]) for k in norm_bias), source="plan",
    )


# ----------------------------------------------------------------------------- theory
def _entropy_bits(counts: list[int]) -> float:
    n = sum(counts)
    return -sum(c * math.log2(c / n) for c in counts if c) if n else 0.0


def _approach(bits: int, components: dict[str, int], separate_bits: int, label: str) -> dict:
    n_bytes = -(-bits // 8)
    return {
        "label": label,
        "bits": bits,
        "bytes": n_bytes,
        "megabytes": n_bytes / MEGABYTE,
        "ratio_to_separate": bits / separate_bits if separate_bits else None,
        "components": components,
    }


def storage(inv: Inventory) -> dict[str, dict]:
    """Bits of every storage approach; see ``docs/report.md`` for what each one counts."""
    t = len(inv.tasks)
    n = inv.prunable
    weights = n * WEIGHT_BITS
    heads = sum(s.head_bits for s in inv.tasks)
    norm_copies = t if inv.per_task_norm else min(t, 1)
    norm_shared = norm_copies * inv.norm_bias_bits
    present = sorted({v for layer in inv.layers for v, c in enumerate(layer.counts) if c})
    bits_per_owner = math.ceil(math.log2(len(present))) if len(present) > 1 else 0
    entropy = math.ceil(sum(_entropy_bits(layer.counts) for layer in inv.layers) - 1e-9)

    def one(mask: int) -> dict[str, int]:
        return {"weights": weights, "norm_bias": norm_shared, "heads": heads, "mask": mask}

    separate = {"weights": t * weights, "norm_bias": t * inv.norm_bias_bits, "heads": heads, "mask": 0}
    parts = {
        "separate": separate,
        "single_network": one(0),
        "packnet_paper": one(n * bits_per_owner),
        "packnet_official": one(n * 8),
        "packnet_entropy": one(entropy),
        "piggyback": one(max(t - 1, 0) * n),
    }
    separate_bits = sum(separate.values())
    return {k: _approach(sum(c.values()), c, separate_bits, APPROACH_LABELS[k]) for k, c in parts.items()}


# ----------------------------------------------------------------------------- exports
EXPORT_KINDS = FORMATS


def _classify(name: str, props: dict[str, str], task_names: list[str]) -> tuple[str, str | None]:
    """(kind, task) of an exported ONNX file: from its metadata_props, else from its name."""
    kind = props.get("packnet.format") or props.get("packnet.kind") or props.get("packnet.variant")
    task = props.get("packnet.task") or props.get("packnet.task_name")
    if kind not in EXPORT_KINDS:
        kind = None
        for key, value in props.items():
            if key.startswith("packnet") and value in EXPORT_KINDS:
                kind = value
                break
    stem = name[: -len(".onnx")]
    if kind is None:
        for fmt in REGISTRY.values():  # <task>.<format>.onnx, <format>.onnx
            if stem.endswith(f".{fmt.name}") or (not fmt.per_task and stem == fmt.name):
                kind = fmt.name
                task = task or (stem[: -len(fmt.name) - 1] if fmt.per_task else None)
                break
    if kind is None and stem in task_names:
        kind, task = "dense", task or stem
    if kind in REGISTRY and not REGISTRY[kind].per_task:
        task = None
    return kind or "onnx", task


PRECISION_BITS = {"fp32": 32, "fp16": 16, "int8": 8}
"""Bits per backbone weight of each export precision (the theory's ``WEIGHT_BITS`` for fp32)."""


def kind_label(entry: dict) -> str:
    """A file's kind for tables: ``dense``, or ``dense int8`` for another precision than fp32."""
    precision = entry.get("precision") or "fp32"
    return entry["kind"] if precision == "fp32" else f"{entry['kind']} {precision}"


def _precision(name: str, props: dict[str, str]) -> tuple[str, str]:
    """(precision, file name without it) of an exported file: ``packnet.precision``, else the
    name's ``.<precision>.onnx`` suffix (``cars.dense.int8.onnx``), else fp32."""
    for precision in PRECISION_BITS:
        if name.endswith(f".{precision}.onnx"):
            return props.get("packnet.precision", precision), name[: -len(f".{precision}.onnx")] + ".onnx"
    return props.get("packnet.precision", "fp32"), name


def _size_target(props: dict[str, str]) -> dict:
    """``stored_bytes``: the sum of the parts a multitask int8 file says it stores
    (``packnet.size_target``: nonzero weights x 1 B + packed owner mask + heads + scales),
    when it says so in well-formed JSON."""
    try:
        target = json.loads(props.get("packnet.size_target", "null"))
        total = target["total_bytes"] if isinstance(target, dict) else None
    except (ValueError, KeyError, TypeError):
        return {}
    return {"stored_bytes": total} if type(total) is int and total > 0 else {}


def scan_exports(folder: str | os.PathLike, task_names: list[str], skip_unreadable: bool = False) -> list[dict]:
    """Every ONNX file in ``folder`` with its sidecar data, classified, and any other file.

    Each ``.onnx`` goes through ``onnx_files.check_file`` first (regular file, a real graph,
    external data inside the folder, metadata agreeing with the graph). One that fails stops
    the report (exit 2) unless ``skip_unreadable``: then it is listed with ``kind: skipped``
    and the reason, and counted nowhere.
    """
    from .onnx_files import check_file

    folder = Path(folder)
    if not folder.is_dir():
        raise ParameterError("exports", f"$exports {folder} is not a folder")
    names = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in names if p.is_file()]
    claimed: set[Path] = set()
    entries = []
    for path in (p for p in names if p.suffix == ".onnx"):
        try:
            checked = check_file(path)
        except PackNetError as exc:
            if not skip_unreadable:
                raise ParameterError("skip_unreadable", f"{exc} (pass $skip_unreadable to report the other "
                                     "files)") from None
            claimed.add(path.resolve())
            entries.append({"path": str(path), "kind": "skipped", "task": None, "precision": None,
                            "reason": str(exc), "parts": []})
            continue
        precision, plain_name = _precision(path.name, checked.metadata)
        kind, task = _classify(plain_name, checked.metadata, task_names)
        parts = [path, *(p for p in checked.sidecars if p != path.resolve())]
        # sidecars written next to the graph, e.g. NAME.onnx.data or NAME.onnx.json
        parts += [p for p in files if p.name.startswith(path.name + ".") and p.resolve() not in
                  {q.resolve() for q in parts}]
        claimed.update(p.resolve() for p in parts)
        entries.append({"path": str(path), "kind": kind, "task": task, "precision": precision,
                        "parts": [{"path": str(p), "bytes": p.stat().st_size} for p in parts],
                        **_size_target(checked.metadata)})
    for path in files:
        if path.resolve() not in claimed and path.suffix != ".onnx":
            entries.append({"path": str(path), "kind": "other", "task": None, "precision": None,
                            "parts": [{"path": str(path), "bytes": path.stat().st_size}]})
    for e in entries:
        e["bytes"] = sum(p["bytes"] for p in e["parts"])
    return entries


def _task_theory_bits(inv: Inventory, task: int, used: int) -> dict[str, int]:
    """Bits of task ``task`` alone: as a dense network and as its non-zero weights only."""
    spec = inv.tasks[task - 1]
    rest = inv.norm_bias_bits + spec.head_bits
    return {"dense": inv.prunable * WEIGHT_BITS + rest, "sparse": used * WEIGHT_BITS + rest}


# ----------------------------------------------------------------------------- report
def build_report(inv: Inventory, exports: str | os.PathLike | None = None, skip_unreadable: bool = False) -> dict:
    """The whole report as one JSON-ready dict (schema: ``docs/report.md``)."""
    t = len(inv.tasks)
    n = inv.prunable
    totals = inv.totals()
    present = [v for v, c in enumerate(totals) if c]
    tasks = []
    used = 0
    for i, spec in enumerate(inv.tasks, start=1):
        used += totals[i]
        tasks.append({
            "task": i, "name": spec.name, "classes": spec.classes, "prune": spec.prune,
            "owned": totals[i], "used": used,
            "owned_fraction": totals[i] / n if n else 0.0, "used_fraction": used / n if n else 0.0,
            "head_params": spec.head_params,
        })
    layers = [{
        "layer": layer.name, "shape": layer.shape, "weights": layer.weights, "free": layer.counts[0],
        "owned": layer.counts[1:], "free_fraction": layer.counts[0] / layer.weights if layer.weights else 0.0,
    } for layer in inv.layers]
    theory = storage(inv)
    separate_bits = theory["separate"]["bits"]
    files = []
    if inv.checkpoint is not None:
        files.append({"path": inv.checkpoint, "kind": "checkpoint", "task": None, "precision": "fp32",
                      "parts": [{"path": inv.checkpoint, "bytes": inv.checkpoint_bytes}],
                      "bytes": inv.checkpoint_bytes})
    if exports is not None:
        files += scan_exports(exports, [s.name for s in inv.tasks], skip_unreadable)
    names = [s.name for s in inv.tasks]
    for f in files:
        ref_name, ref_bits = None, None
        if f["kind"] == "checkpoint":  # full fp32 backbone and a uint8 owner mask, as the official code
            ref_name, ref_bits = "packnet_official", theory["packnet_official"]["bits"]
        elif f["kind"] == "multitask":  # one graph for all tasks: a packed owner mask
            ref_name, ref_bits = "packnet_paper", theory["packnet_paper"]["bits"]
        elif f["kind"] in ("dense", "sparse") and f["task"] in names:
            k = names.index(f["task"]) + 1
            ref_name = f"task {f['task']} {f['kind']}"
            ref_bits = _task_theory_bits(inv, k, tasks[k - 1]["used"])[f["kind"]]
        bits = PRECISION_BITS.get(f.get("precision", "fp32"), WEIGHT_BITS)
        if f["kind"] == "multitask" and f.get("stored_bytes"):  # int8: nonzero x 1 B + mask + heads + scales
            ref_name, ref_bits = "multitask int8 stored", 8 * f.pop("stored_bytes")
        elif ref_bits is not None and f["kind"] != "checkpoint" and bits != WEIGHT_BITS:
            # the same storage with the backbone's weights at the file's precision
            stored = n if f["kind"] in ("dense", "multitask") else tasks[names.index(f["task"])]["used"]
            ref_name, ref_bits = f"{ref_name} {f['precision']}", ref_bits - (WEIGHT_BITS - bits) * stored
        f["megabytes"] = f["bytes"] / MEGABYTE
        f["reference"] = ref_name
        f["reference_bytes"] = None if ref_bits is None else -(-ref_bits // 8)
        f["ratio_to_separate"] = f["bytes"] * 8 / separate_bits if separate_bits else None
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "source": inv.source,
        "checkpoint": inv.checkpoint,
        "arch": inv.arch,
        "arch_kwargs": inv.arch_kwargs,
        "image_size": inv.image_size,
        "per_task_norm": inv.per_task_norm,
        "weight_bits": WEIGHT_BITS,
        "megabyte": MEGABYTE,
        "prunable_weights": n,
        "norm_bias_params": inv.norm_bias_params,
        "head_params": sum(s.head_params for s in inv.tasks),
        "free": totals[0],
        "free_fraction": totals[0] / n if n else 0.0,
        "owner_values_present": present,
        "mask_bits_per_weight": math.ceil(math.log2(len(present))) if len(present) > 1 else 0,
        "owner_entropy_bits_per_weight": theory["packnet_entropy"]["components"]["mask"] / n if n else 0.0,
        "tasks": tasks,
        "layers": layers,
        "storage": theory,
        "exports_dir": None if exports is None else str(exports),
        "files": files,
        "num_tasks": t,
    }


# ----------------------------------------------------------------------------- renderings
def _mb(n_bytes: int | float) -> str:
    return f"{n_bytes / MEGABYTE:,.3f}"


def render_markdown(report: dict, per_layer: bool = False) -> str:
    """The report as GitHub-flavoured Markdown tables."""
    n = report["prunable_weights"]
    src = report["checkpoint"] or f"plan ({report['arch']})"
    lines = [
        f"# PackNet storage report: {src}",
        "",
        f"{report['arch']} {report['arch_kwargs'] or ''} at {report['image_size']} px; {n:,} prunable weights, "
        f"{report['norm_bias_params']:,} norm/bias parameters "
        f"({'per task' if report['per_task_norm'] else 'shared'}), {report['num_tasks']} task(s). "
        f"MB = 10^6 bytes; weights counted at {report['weight_bits']} bits.",
        "",
        "## Tasks",
        "",
        "| # | task | classes | pruned | owned | used (cumulative) | head params |",
        "|--:|:-----|--:|--:|--:|--:|--:|",
    ]
    for t in report["tasks"]:
        lines.append(f"| {t['task']} | {t['name']} | {t['classes']} | {t['prune']:.0%} | "
                     f"{t['owned']:,} ({t['owned_fraction']:.1%}) | {t['used']:,} ({t['used_fraction']:.1%}) | "
                     f"{t['head_params']:,} |")
    lines += ["", f"Free capacity for future tasks: {report['free']:,} weights ({report['free_fraction']:.1%}).", ""]
    if per_layer:
        names = [t["name"] for t in report["tasks"]]
        lines += ["## Owners per layer", "", "| layer | weights | free | " + " | ".join(names) + " |",
                  "|:--|--:|--:|" + "--:|" * len(names)]
        for row in report["layers"]:
            lines.append(f"| {row['layer']} | {row['weights']:,} | {row['free']:,} | "
                         + " | ".join(f"{v:,}" for v in row["owned"]) + " |")
        lines.append("")
    lines += [
        "## Storage",
        "",
        f"Owner values present: {report['owner_values_present']} -> {report['mask_bits_per_weight']} bit(s) "
        f"per weight; entropy {report['owner_entropy_bits_per_weight']:.3f} bits per weight.",
        "",
        "| approach | bits | bytes | MB | vs separate |",
        "|:--|--:|--:|--:|--:|",
    ]
    for s in report["storage"].values():
        ratio = "-" if s["ratio_to_separate"] is None else f"{s['ratio_to_separate']:.3f}"
        lines.append(f"| {s['label']} | {s['bits']:,} | {s['bytes']:,} | {_mb(s['bytes'])} | {ratio} |")
    if report["files"]:
        lines += ["", "## Files on disk", "", "| file | kind | task | bytes | MB | theory MB | vs separate |",
                  "|:--|:--|:--|--:|--:|--:|--:|"]
        for f in report["files"]:
            ref = "-" if f["reference_bytes"] is None else _mb(f["reference_bytes"])
            ratio = "-" if f["ratio_to_separate"] is None else f"{f['ratio_to_separate']:.3f}"
            lines.append(f"| {Path(f['path']).name} | {kind_label(f)} | {f['task'] or '-'} | {f['bytes']:,} | "
                         f"{_mb(f['bytes'])} | {ref} | {ratio} |")
    return "\n".join(lines) + "\n"


SHORT_LABELS = {
    "separate": "separate networks",
    "single_network": "one backbone, all heads",
    "packnet_paper": "PackNet (paper)",
    "packnet_official": "PackNet (1 byte mask)",
    "packnet_entropy": "PackNet (entropy bound)",
    "piggyback": "Piggyback",
}


def plot_report(report: dict, path: str | os.PathLike) -> None:
    """A PNG: storage per approach (and exported files), and per layer the share of each task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_path

    bars = [(SHORT_LABELS[k], s["bytes"]) for k, s in report["storage"].items()]
    groups: dict[str, int] = {}
    for f in (f for f in report["files"] if f["kind"] != "skipped"):
        label = f"on disk: {f['kind']}" if f["kind"] in ("checkpoint", "multitask") else f"on disk: {f['kind']} (all)"
        groups[label] = groups.get(label, 0) + f["bytes"]
    bars += list(groups.items())
    layers = report["layers"]
    names = [t["name"] for t in report["tasks"]]
    layer_h = max(2.5, 0.28 * len(layers) + 1.2)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 0.42 * len(bars) + 1.5 + layer_h),
                                   gridspec_kw={"height_ratios": [0.42 * len(bars) + 0.6, layer_h]})
    separate = report["storage"]["separate"]["bytes"]
    y = range(len(bars))
    colours = ["#4c72b0" if i < len(report["storage"]) else "#55a868" for i in y]
    colours[0] = "#555555"
    biggest = max(b for _, b in bars)
    unit, scale = ("MB", MEGABYTE) if biggest >= MEGABYTE else ("kB", 1000)
    ax1.barh(list(y), [b / scale for _, b in bars], color=colours)
    ax1.set_yticks(list(y), [label for label, _ in bars])
    ax1.invert_yaxis()
    ax1.set_xlabel(f"{unit} ({'10^6' if unit == 'MB' else '10^3'} bytes)")
    ax1.set_title(f"Storage of {report['num_tasks']} task(s) on {report['arch']}")
    top = biggest / scale
    for i, (_, b) in enumerate(bars):
        ratio = f"  ({b / separate:.2f}x)" if separate else ""
        ax1.text(b / scale + top * 0.01, i, f"{b / scale:,.2f} {unit}{ratio}", va="center", fontsize=8)
    ax1.set_xlim(0, top * 1.3)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    left = [0.0] * len(layers)
    ypos = list(range(len(layers)))
    for i, name in enumerate(names):
        share = [row["owned"][i] / row["weights"] if row["weights"] else 0.0 for row in layers]
        ax2.barh(ypos, share, left=left, color=cmap(i % cmap.N), label=name)
        left = [a + b for a, b in zip(left, share)]
    ax2.barh(ypos, [row["free_fraction"] for row in layers], left=left, color="#e0e0e0", label="free",
             edgecolor="#bdbdbd", linewidth=0.5)
    ax2.set_yticks(ypos, [row["layer"] for row in layers], fontsize=7 if len(layers) > 30 else 8)
    ax2.set_ylim(len(layers) - 0.5, -0.5)  # first layer on top, no empty margin
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("share of the layer's weights")
    ax2.set_title("Owner of each layer's weights")
    ax2.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
