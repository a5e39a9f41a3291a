"""The one torch trace of an export: the architecture's graph, its tensors supplied per task.

The torch exporter runs once per export, whatever the number of tasks and formats: it
traces a *template* of the architecture whose parameters become graph inputs named by their
state-dict keys. Every file is then that graph plus one task's tensors, streamed into the
file one tensor at a time. Tasks differ only in their tensors (and their head's class
count), so ``--all-tasks`` on a six-task model costs one trace instead of six, and an export
never holds more than the model and one tensor's copy in memory.

The template is exported with ``dynamo=False`` and ``training=PRESERVE`` on a module in eval
mode: batch norm stays a separate node (onnxruntime fuses it at load) so that every
initializer keeps its state-dict name; the dynamo exporter either folds batch norm into the
convolutions (renaming the weights) or, unoptimized, leaves a graph that ran 2x slower here.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from .. import masks, models
from ..checkpoint import PackNet
from .formats import DEFAULT_LAYOUT, DEFAULT_OPSET, DEFAULT_PRECISION, check_opset
from .writer import Streamed, flat_pieces, metadata, set_ir_version


@dataclass
class ExportContext:
    """What every format's ``write(context, task, path)`` needs: the model, the options, and
    the trace, made on first use and shared by every file of the export."""

    model: PackNet
    opset: int = DEFAULT_OPSET
    source_sha256: str | None = None
    layout: str = DEFAULT_LAYOUT
    """The multi-task graph's layout (see ``formats.LAYOUTS``)."""
    ir_version: int | None = None
    """None: the lowest the opset needs (``writer.ir_version_for``)."""
    precision: str = DEFAULT_PRECISION
    """fp32, fp16 or int8 (see ``formats.PRECISIONS``); other than fp32 is written by ``precision``."""
    calibration: dict = field(default_factory=dict)
    """int8: task (1-based) -> ``calibration.CalibrationSet``."""
    fp16_io: bool = False
    """fp16: float16 inputs and outputs as well (else float32, cast inside the graph)."""
    activation_type: str = "uint8"
    """int8: the quantized activations' type (``formats.ACTIVATION_TYPES``)."""
    quantized: dict = field(default_factory=dict, repr=False)
    """int8: the last task's quantized dense graph (task -> graph), made once for its dense and sparse files."""
    _template: Template | None = field(default=None, repr=False)

    @property
    def template(self) -> Template:
        if self._template is None:
            self._template = graph_template(self.model, self.opset)
        return self._template


@dataclass
class Template:
    """The architecture's graph without tensors, and the state-dict keys it reads, in graph order."""

    model: onnx.ModelProto
    keys: list[str]


def graph_template(model: PackNet, opset: int = DEFAULT_OPSET) -> Template:
    """The architecture's graph with no initializers: every tensor is named by its state-dict key.

    Input ``input`` float32 [N, 3, H, W] (N dynamic), output ``logits`` float32 [N, classes].
    """
    check_opset(opset)
    module = template_module(model)
    state = {k: torch.empty(t.shape, dtype=t.dtype) for k, t in module.state_dict().items()}
    size = model.image_size
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _StateAsInputs(module, list(state)), (torch.zeros(1, 3, size, size), *state.values()), f,
            dynamo=False, export_params=False, input_names=["input", *state], output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=opset,
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
        )
    del module
    template = onnx.load_from_string(f.getvalue())
    del f
    graph = template.graph
    used = {x for node in graph.node for x in node.input}
    params = [i for i in graph.input if i.name in state and i.name in used]
    names = {p.name for p in params}
    lost = [k for k, t in state.items() if t.is_floating_point() and k not in names
            and not k.endswith("num_batches_tracked")]
    if not params or "input" not in used:
        raise RuntimeError(f"the torch exporter renamed parameters ({(lost or sorted(names))[:3]}); "
                           "cannot map task tensors onto its graph")
    keep = [i for i in graph.input if i.name == "input"]
    del graph.input[:]
    graph.input.extend(keep)
    del graph.value_info[:]
    _compact(graph, keep={"input", "logits", *names})
    template.producer_name = "packnet-export"
    template.metadata_props.clear()
    return Template(template, [p.name for p in params])


def template_module(model: PackNet) -> torch.nn.Module:
    """The architecture as an eval module on the meta device: it holds no memory at all."""
    classes = model.tasks[0].num_classes if model.tasks else 2
    return models.build_meta(model.arch, classes, model.arch_kwargs).eval()


class _StateAsInputs(torch.nn.Module):
    """Runs ``module`` with its state dict given as forward arguments.

    The torch exporter then sees the tensors as graph inputs named by their keys, never as
    parameters: its ONNX shape-inference pass copies every parameter (a transient 411 MB
    for vgg16's fc6 weight), and it merges parameters of equal values into one. The
    arguments are uninitialized tensors: pages never written are never resident, so the
    trace holds no second copy of the model. ``module`` lives on the meta device and is not
    registered as a submodule, so the exporter finds no parameter at all.
    """

    def __init__(self, module: torch.nn.Module, keys: list[str]) -> None:
        super().__init__()
        self._inner = [module]
        self.keys = keys

    def forward(self, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        # torch.func.functional_call refuses to run under the tracer: swap the tensors in by hand
        module = self._inner[0]
        for key, tensor in zip(self.keys, tensors):
            owner, _, name = key.rpartition(".")
            sub = module.get_submodule(owner)
            sub._parameters.pop(name, None)
            sub._buffers[name] = tensor
        return module(x)


def _compact(graph: onnx.GraphProto, keep: set[str]) -> None:
    """Drop node names and doc strings, shorten intermediate value names: on a small model
    they would otherwise weigh more than the sparse format's 5% allowance."""
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return short.setdefault(name, f"v{len(short)}")

    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        defaults = [a for a in node.attribute if _is_default(node.op_type, a)]
        for a in defaults:
            node.attribute.remove(a)
    graph.doc_string = ""


def _is_default(op: str, attr: onnx.AttributeProto) -> bool:
    """Attributes equal to their default (or, like batch norm's momentum, unused at inference)."""
    if op == "BatchNormalization":
        return attr.name == "momentum" or (attr.name == "training_mode" and attr.i == 0)
    if op in ("Conv", "MaxPool", "AveragePool"):
        if attr.name in ("dilations", "strides"):
            return all(v == 1 for v in attr.ints)
        if attr.name == "pads":
            return all(v == 0 for v in attr.ints)
        return attr.name == "group" and attr.i == 1
    return False


def rename_values(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]


def task_skeleton(template: Template, model: PackNet, task: int, fmt: str,
                  source_sha256: str | None, ir_version: int | None = None) -> onnx.ModelProto:
    """A copy of the template for one task: its class count on the output, its metadata."""
    out = onnx.ModelProto()
    out.CopyFrom(template.model)
    dims = out.graph.output[0].type.tensor_type.shape.dim
    dims[1].Clear()
    dims[1].dim_value = model.tasks[task - 1].num_classes
    out.doc_string = f"PackNet task {model.tasks[task - 1].name!r} ({fmt})"
    for key, value in metadata(model, fmt, source_sha256, task).items():
        out.metadata_props.add(key=key, value=value)
    set_ir_version(out, ir_version)
    return out


# ----------------------------------------------------------------- a task's tensors
def masked_weight(weight: torch.Tensor, owner: torch.Tensor, task: int) -> Streamed:
    """``weight`` as task ``task`` computes with it (zero where the owner is 0 or a later
    task), produced piece by piece."""

    def pieces():
        for w, o in flat_pieces(weight, owner):
            yield torch.where(masks.uses(o, task), w, torch.zeros((), dtype=w.dtype)).numpy()

    return Streamed(tuple(weight.shape), np.dtype(np.float32), pieces)


def task_tensor(model: PackNet, task: int) -> Callable[[str], torch.Tensor | Streamed]:
    """``key -> tensor`` as task ``task`` (1-based) computes with it; prunable weights are
    :class:`Streamed`, masked a piece at a time when they are written."""
    own = model.task_tensors[task - 1]

    def get(key: str) -> torch.Tensor | Streamed:
        if key in own:
            return own[key]
        if key in model.owners:
            return masked_weight(model.shared[key], model.owners[key], task)
        return model.shared[key]

    return get


def tensor_bytes(model: PackNet, keys: Iterable[str], task: int) -> int:
    own = model.task_tensors[task - 1]
    return sum((own[k] if k in own else model.shared[k]).numel() * 4 for k in keys)
