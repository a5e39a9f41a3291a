"""Exported files on other runtimes than the onnxruntime beside the project.

OpenVINO is the optional extra ``.[edge]`` (``pip install -e '.[edge]'``); these tests skip
where it is absent (CI installs ``.[test]`` only). An older onnxruntime lives in its own
environment (it cannot share one with the project's): set ``PACKNET_OLD_ONNXRUNTIME_PYTHON``
to its Python (``benchmarks/edge_setup.sh`` makes one with onnxruntime 1.23.2). The other
runtimes (TFLite, ncnn, MNN, TVM, the .ort format) are measured by
``benchmarks/edge_runtimes.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from packnet_export import checkpoint
from packnet_export.exporter import pipeline
from packnet_export.exporter.validation import task_index_feed

OLD_ORT = os.environ.get("PACKNET_OLD_ONNXRUNTIME_PYTHON")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory) -> list[Path]:
    """Every task dense and sparse, and the portable multitask graph, of the tiny model."""
    out = tmp_path_factory.mktemp("edge")
    model = checkpoint.load(tiny_checkpoint)
    tasks = list(range(1, len(model.tasks) + 1))
    files = pipeline.export(model, out, tasks, ["dense", "sparse"])
    files += pipeline.export(model, out / "portable", tasks, ["multitask"], layout="portable")
    return [f.path for f in files]


def _cases(path: Path, session) -> list[tuple[int | None, int]]:
    """``(task_index or None, classes)`` for each task the file computes."""
    meta = session.get_modelmeta().custom_metadata_map
    if meta["packnet.format"] == "multitask":
        return list(enumerate(json.loads(meta["packnet.num_classes"])))
    return [(None, int(meta["packnet.num_classes"]))]


def _inputs(session) -> np.ndarray:
    size = json.loads(session.get_modelmeta().custom_metadata_map["packnet.input_size"])
    return np.random.default_rng(0).standard_normal((4, *size), dtype=np.float32)


def test_openvino_f32_matches_onnxruntime(exported):
    ov = pytest.importorskip("openvino", reason="OpenVINO is the optional extra .[edge]")
    core = ov.Core()
    for path in exported:
        reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = _inputs(reference)
        # f32: on CPUs with AMX/AVX512-BF16 OpenVINO computes in bf16 by default
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        logits = next(o for o in compiled.outputs if "logits" in o.get_names())
        for index, classes in _cases(path, reference):
            feeds = {"input": x}
            if index is not None:
                feeds["task_index"] = task_index_feed(reference, index)
            (expected,) = reference.run(["logits"], feeds)
            got = compiled.create_infer_request().infer(feeds)[logits]
            np.testing.assert_allclose(got[:, :classes], expected[:, :classes], rtol=1e-4, atol=1e-4,
                                       err_msg=f"{path.name} task {index}")


OLD_RUN = """
import json, sys, numpy as np, onnxruntime as ort
path, x, index = sys.argv[1], np.load(sys.argv[2]), json.loads(sys.argv[3])
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
feeds = {"input": x}
if index is not None:
    kind = next(i.type for i in s.get_inputs() if i.name == "task_index")
    feeds["task_index"] = np.array(index, dtype=np.float32 if kind == "tensor(float)" else np.int64)
np.save(sys.argv[4], s.run(["logits"], feeds)[0])
print(ort.__version__)
"""


@pytest.mark.skipif(not OLD_ORT, reason="set PACKNET_OLD_ONNXRUNTIME_PYTHON to a Python with an older onnxruntime")
def test_an_older_onnxruntime_loads_and_agrees(exported, tmp_path):
    for path in exported:
        reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = _inputs(reference)
        np.save(tmp_path / "x.npy", x)
        for index, classes in _cases(path, reference):
            done = subprocess.run([OLD_ORT, "-c", OLD_RUN, str(path), str(tmp_path / "x.npy"), json.dumps(index),
                                   str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{path.name}: {done.stderr.strip().splitlines()[-1:]}"
            feeds = {"input": x}
            if index is not None:
                feeds["task_index"] = task_index_feed(reference, index)
            (expected,) = reference.run(["logits"], feeds)
            np.testing.assert_allclose(np.load(tmp_path / "out.npy")[:, :classes], expected[:, :classes],
                                       rtol=1e-5, atol=1e-5, err_msg=f"{path.name} on onnxruntime {done.stdout}")


ONNX2TF = os.environ.get("PACKNET_ONNX2TF_PYTHON")
ONNX2TF_RUN = """
import json, os, shutil, sys, numpy as np
path, work, shape, cases = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
x = np.load(os.path.join(work, "x.npy"))
shutil.copyfile(path, os.path.join(work, "model.onnx"))  # onnx2tf rewrites its input in place
# onnx2tf downloads this file into its working directory when it is absent
np.save(os.path.join(work, "calibration_image_sample_data_20x128x128x3_float32.npy"),
        np.ascontiguousarray(np.resize(x.transpose(0, 2, 3, 1), (20, *x.shape[2:], x.shape[1]))))
os.chdir(work)
import onnx2tf
onnx2tf.convert(input_onnx_file_path="model.onnx", output_folder_path="tf", non_verbose=True, batch_size=1,
                overwrite_input_shape=["input:" + shape])
from ai_edge_litert.interpreter import Interpreter
it = Interpreter(model_path="tf/model_float32.tflite")
it.allocate_tensors()
image = next(d for d in it.get_input_details() if len(d["shape"]) == 4)
task = next((d for d in it.get_input_details() if len(d["shape"]) != 4), None)
logits = next(d for d in it.get_output_details() if len(d["shape"]) == 2)
out = {}
for index, _ in cases:
    rows = []
    for row in x:
        it.set_tensor(image["index"], np.ascontiguousarray(row[None].transpose(0, 2, 3, 1)))  # NHWC
        if task is not None:
            it.set_tensor(task["index"], np.array(index, dtype=task["dtype"]).reshape(task["shape"]))
        it.invoke()
        rows.append(it.get_tensor(logits["index"]).copy())
    out[str(index)] = np.concatenate(rows)
np.savez("logits.npz", **out)
"""


@pytest.fixture(scope="module")
def per_task_norm_portable(tiny_data, tmp_path_factory) -> Path:
    """The portable graph of a model with per-task batch norms (picked per task, not folded)."""
    from conftest import train_tiny

    model = train_tiny(tiny_data, per_task_norm=True)
    out = tmp_path_factory.mktemp("per-task-norm")
    (written,) = pipeline.export(model, out, list(range(1, len(model.tasks) + 1)), ["multitask"], layout="portable")
    return written.path


@pytest.mark.skipif(not ONNX2TF, reason="set PACKNET_ONNX2TF_PYTHON to a Python with onnx2tf and ai_edge_litert")
@pytest.mark.parametrize("norms", ["shared", "per-task"])
def test_onnx2tf_tflite_runs_every_task_of_the_portable_graph(norms, request, tmp_path):
    """The multitask graph on TFLite: onnx2tf (1.29) once dropped every convolution's mask
    (every task ran with all weights), and without -ois mislaid an NCHW tensor before MaxPool."""
    if norms == "shared":
        path = next(p for p in request.getfixturevalue("exported") if p.parent.name == "portable")
    else:
        path = request.getfixturevalue("per_task_norm_portable")
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _inputs(reference)
    np.save(tmp_path / "x.npy", x)
    cases = _cases(path, reference)
    shape = ",".join(map(str, [1, *x.shape[1:]]))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
               PATH=f"{Path(ONNX2TF).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # onnx2tf runs `onnxsim`
    done = subprocess.run([ONNX2TF, "-c", ONNX2TF_RUN, str(path), str(tmp_path), shape, json.dumps(cases)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    got = np.load(tmp_path / "logits.npz")
    for index, classes in cases:
        (expected,) = reference.run(["logits"], {"input": x, "task_index": task_index_feed(reference, index)})
        np.testing.assert_allclose(got[str(index)][:, :classes], expected[:, :classes], rtol=1e-4, atol=1e-4,
                                   err_msg=f"task {index} on TFLite")
