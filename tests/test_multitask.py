"""The multitask ONNX graph computes every task of the PackNet model it came from."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import train_tiny

from packnet_export import masks, models
from packnet_export.checkpoint import PackNet, TaskInfo
from packnet_export.errors import PackNetError
from packnet_export.exporter import LAYOUTS, dense, writer
from packnet_export.exporter.multitask import build_multitask_model, multitask_metadata, pack_owner, size_budget
from packnet_export.exporter.template import ExportContext
from packnet_export.exporter.validation import task_index_feed


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(session, x: torch.Tensor, k: int):
    return session.run(None, {"input": x.numpy(), "task_index": task_index_feed(session, k)})


def _dense_session(model: PackNet, k: int, folder) -> ort.InferenceSession:
    """A session on the export helper's dense graph of task k (1-based)."""
    path = folder / f"dense{k}.onnx"
    dense.write(ExportContext(model, opset=17), k, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def per_task_norm_model(tiny_data) -> PackNet:
    return train_tiny(tiny_data, per_task_norm=True)


@pytest.fixture(scope="module", params=["shared-norm", "per-task-norm"])
def any_model(request, tiny_model, per_task_norm_model) -> PackNet:
    return tiny_model if request.param == "shared-norm" else per_task_norm_model


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_task_matches_pytorch(any_model, layout, probe_inputs):
    session = _session(build_multitask_model(any_model, layout=layout))
    widest = max(t.num_classes for t in any_model.tasks)
    for k, info in enumerate(any_model.tasks):
        with torch.no_grad():
            expected = any_model.task_module(k + 1)(probe_inputs).numpy()
        for x, ref in ((probe_inputs, expected), (probe_inputs[:1], expected[:1])):
            logits, num_classes = _run(session, x, k)
            assert logits.shape == (len(x), widest)
            assert num_classes.shape == ((1,) if layout == "portable" else ())  # ncnn has no scalars
            assert int(num_classes.reshape(())) == info.num_classes
            np.testing.assert_allclose(logits[:, : info.num_classes], ref, rtol=1e-5, atol=1e-5)
            padding = float(multitask_metadata(any_model, layout)["packnet.logits_padding"])
            assert (logits[:, info.num_classes:] == padding).all()
            assert (logits.argmax(1) == ref.argmax(1)).all()


def test_per_task_norm_tasks_differ_in_norm(per_task_norm_model, probe_inputs):
    """Guards the test above: per-task batch norm really changes what a task computes."""
    model = per_task_norm_model
    norm_key = next(k for k in model.task_tensors[0] if k.endswith("running_mean"))
    assert not torch.equal(model.task_tensors[0][norm_key], model.task_tensors[1][norm_key])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_dense_graph_of_each_task(any_model, layout, probe_inputs, tmp_path):
    session = _session(build_multitask_model(any_model, layout=layout))
    for k, info in enumerate(any_model.tasks):
        dense = _dense_session(any_model, k + 1, tmp_path)
        (expected,) = dense.run(None, {"input": probe_inputs.numpy()})
        logits, num_classes = _run(session, probe_inputs, k)
        assert int(num_classes.reshape(())) == expected.shape[1]
        np.testing.assert_allclose(logits[:, : info.num_classes], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [3, -1, 1000])
def test_out_of_range_task_index_is_refused(tiny_model, probe_inputs, bad):
    session = _session(build_multitask_model(tiny_model, layout="runtime-mask"))
    with pytest.raises(Exception, match="task_index_must_be_0_to_2"):
        _run(session, probe_inputs, bad)
    branches = _session(build_multitask_model(tiny_model))
    with pytest.raises(Exception, match="task_index_must_be_0_to_2"):
        _run(branches, probe_inputs, bad)


def test_metadata_describes_the_tasks(tiny_model):
    proto = build_multitask_model(tiny_model)
    props = {p.key: p.value for p in proto.metadata_props}
    assert props == multitask_metadata(tiny_model)
    assert json.loads(props["packnet.tasks"]) == ["alpha", "beta", "gamma"]
    assert json.loads(props["packnet.classes"]) == [t.classes for t in tiny_model.tasks]
    assert json.loads(props["packnet.num_classes"]) == [3, 4, 2]
    assert json.loads(props["packnet.input_size"]) == [3, 16, 16]
    assert json.loads(props["packnet.mean"]) == pytest.approx(list(tiny_model.mean))
    assert proto.ir_version == 8  # the lowest that opset 18 needs
    onnx.checker.check_model(proto, full_check=True)


def test_owner_mask_packed_in_pieces_equals_whole_array_packing(monkeypatch):
    monkeypatch.setattr(writer, "PIECE", 6)  # pieces that do not end on a byte
    owner = torch.randint(0, 7, (5, 9), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    flat = owner.flatten().numpy()
    planes = (flat[None, :] >> np.arange(3, dtype=np.uint8)[:, None]) & 1
    np.testing.assert_array_equal(pack_owner(owner, 6), np.packbits(planes, axis=1))


def test_bad_arguments_are_one_line_errors(tiny_model):
    with pytest.raises(PackNetError, match="layout"):
        build_multitask_model(tiny_model, layout="fast")
    with pytest.raises(PackNetError, match="opset 11"):
        build_multitask_model(tiny_model, opset=11)


def _magnitude_masked(num_tasks: int, width: int = 16) -> PackNet:
    """vgg_mini with the paper's schedule of owner masks made by magnitude, no training: each task
    draws random values for the free weights it takes (freed weights are 0, and pruning frees zeros)."""
    model = PackNet.create("vgg_mini", image_size=32, arch_kwargs={"width": width})
    head_w, head_b = models.head_keys("vgg_mini")
    generator = torch.Generator().manual_seed(0)
    for k in range(1, num_tasks + 1):
        owners = masks.assign_free(model.owners, k)
        drawn = {key: torch.where(owners[key] == k, torch.randn(w.shape, generator=generator), w)
                 for key, w in model.shared.items() if key in owners}
        weights, model.owners = masks.prune_task(drawn, owners, k, 0.5 if k == 1 else 0.75)
        model.shared.update(weights)
        classes = 3 + k
        model.task_tensors.append({head_w: torch.randn(classes, 8 * width), head_b: torch.randn(classes)})
        model.tasks.append(TaskInfo(f"t{k}", [str(c) for c in range(classes)], 0.5))
    return model


@pytest.fixture(scope="module")
def six_task_model() -> PackNet:
    return _magnitude_masked(6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_file_size_within_budget(six_task_model, layout):
    model = six_task_model
    budget = size_budget(model)
    assert budget["owner_bits"] == 3  # owner values 0..6
    size = len(build_multitask_model(model, layout=layout).SerializeToString())
    assert size <= 1.05 * budget["total_bytes"], (size, budget)
    # and it is far below one dense graph per task
    dense = sum(o.numel() for o in model.owners.values()) * 4
    assert size < 0.5 * dense * len(model.tasks)
