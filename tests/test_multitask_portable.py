"""The ``portable`` multi-task layout: every task right, built only of operators edge converters handle."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import train_tiny
from packnet_export.cli.main import app
from typer.testing import CliRunner

from packnet_export.errors import PackNetError
from packnet_export.exporter import MAX_OPSET, MIN_OPSET, pipeline
from packnet_export.exporter.multitask import build_multitask_model

CONVERTIBLE = {
    # the network itself
    "Conv", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Gemm", "Add", "Mul", "Constant",
    # the stored weights' decode (initializer-only: converters fold it)
    "Gather", "Cast", "Unsqueeze", "Div", "Mod", "Reshape", "Slice", "Identity", "Greater", "CumSum", "Concat",
    "Pad", "Equal",
    # the task selection: one-hot row, masks, padding
    "Sub", "Abs", "Clip", "MatMul", "Sqrt", "Transpose",
    # convolutions with a masked weight as patches (a constant depthwise Conv) and a MatMul
    "Tile",
}
"""Every operator the layout may use. Not ``If`` (pnnx, onnx2tf, MNN and TVM fail on it), not
``BatchNormalization`` (onnx2tf fails on it after a computed weight), not ``Where`` or
comparisons on ``task_index`` (ncnn has neither)."""


@pytest.fixture(scope="module")
def per_task_norm_model(tiny_data):
    return train_tiny(tiny_data, per_task_norm=True)


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session, x: torch.Tensor, index: float):
    return session.run(None, {"input": x.numpy(), "task_index": np.array(index, dtype=np.float32)})


def _runtime_path(graph: onnx.GraphProto) -> set[str]:
    """Operator types of the nodes that depend on a graph input (what runs on every call)."""
    live = {i.name for i in graph.input}
    ops = set()
    for node in graph.node:
        if any(x in live for x in node.input):
            live.update(node.output)
            ops.add(node.op_type)
    return ops


def test_uses_only_operators_every_converter_knows(tiny_model, per_task_norm_model):
    for model in (tiny_model, per_task_norm_model):
        graph = build_multitask_model(model, layout="portable").graph
        used = {n.op_type for n in graph.node}
        assert used <= CONVERTIBLE, used - CONVERTIBLE
        assert "BatchNormalization" not in used and "If" not in used
        # the per-call path: task selection by arithmetic, no Gather/Cast on task_index
        assert not _runtime_path(graph) & {"Gather", "Cast", "Greater", "CumSum", "Where", "Less", "Equal", "If"}


def test_no_convolution_weight_depends_on_the_task(tiny_model, per_task_norm_model):
    """onnx2tf replaces a computed Conv weight by its producer's first constant input (the
    unmasked weight): masked convolutions are patches (a constant Conv) and a MatMul, or, where
    the output's channels, height and width are equal, one constant Conv per owner."""
    for model in (tiny_model, per_task_norm_model):
        graph = build_multitask_model(model, layout="portable").graph
        live = {"task_index"}
        for node in graph.node:
            if any(x in live for x in node.input):
                live.update(node.output)
        convs = [n for n in graph.node if n.op_type == "Conv"]
        assert convs and not [n.input[1] for n in convs if n.input[1] in live]
        masked = {n.input[1].split("/", 1)[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in live
                  and n.input[1].startswith("masked/")}
        split = {n.input[1].split("/", 1)[1] for n in convs if n.input[1].startswith("owned")}
        assert masked | split == set(model.owners) and not masked & split
        # one constant conv per owner only where onnx2tf cannot tell NCHW from NHWC: [N, 8, 8, 8]
        assert split == {"features.4.weight"}


def test_task_index_and_num_classes_are_float32(tiny_model):
    """ncnn has float tensors only and no scalars: task_index [] and num_classes [1], float32."""
    graph = build_multitask_model(tiny_model, layout="portable").graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)
              if v.name in ("task_index", "num_classes") and v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    assert shapes == {"task_index": [], "num_classes": [1]}


@pytest.mark.parametrize("opset", [MIN_OPSET, 17, MAX_OPSET])
def test_every_opset_matches_pytorch(tiny_model, probe_inputs, opset):
    session = _session(build_multitask_model(tiny_model, opset=opset, layout="portable"))
    for k, info in enumerate(tiny_model.tasks):
        with torch.no_grad():
            expected = tiny_model.task_module(k + 1)(probe_inputs).numpy()
        logits, num_classes = _run(session, probe_inputs, k)
        assert num_classes.tolist() == [info.num_classes]
        np.testing.assert_allclose(logits[:, :info.num_classes], expected, rtol=1e-5, atol=1e-5)
        assert (logits[:, info.num_classes:] == np.finfo(np.float32).min).all()  # -inf is not portable


@pytest.mark.parametrize("bad", [3, -1, 1000, 0.5])
def test_an_index_that_names_no_task_gives_nan_never_a_task(tiny_model, probe_inputs, bad):
    """No error node (a converter evaluating the graph with its own index must not stop), but
    no task's logits either: NaN everywhere and num_classes 0."""
    logits, num_classes = _run(_session(build_multitask_model(tiny_model, layout="portable")), probe_inputs, bad)
    assert np.isnan(logits).all()
    assert num_classes.tolist() == [0]


def test_batch_norm_folded_into_shared_weights(tiny_model):
    """Folding keeps one weight set for all tasks: the file stores each prunable weight once."""
    proto = build_multitask_model(tiny_model, layout="portable")
    names = [t.name for t in proto.graph.initializer]
    for key in tiny_model.owners:
        assert names.count(f"packed/{key}/values") == 1
    assert not any("running_mean" in n or "running_var" in n for n in names)


def test_branches_refuses_opsets_where_onnxruntime_leaves_it_slow(tiny_model, tiny_checkpoint, tmp_path):
    """Below opset 16 onnxruntime optimizes nothing inside If: branches would run 2-5x dense."""
    with pytest.raises(PackNetError, match="needs opset 16"):
        build_multitask_model(tiny_model, opset=15, layout="branches")
    build_multitask_model(tiny_model, opset=15, layout="portable")  # the If-free layouts keep every opset
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--format", "multitask",
                                      "--opset", "14", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "--multitask-layout runtime-mask or portable" in result.stderr
    assert not list(tmp_path.iterdir())


def test_portable_is_fp32_only_refused_before_writing(tiny_model, tmp_path):
    with pytest.raises(PackNetError, match="'portable' is written in fp32 only"):
        pipeline.export(tiny_model, tmp_path, [1], ["multitask"], layout="portable", precision="fp16")
    assert not list(tmp_path.iterdir())
