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
