"""packnet validate and the provider choice: the provider really used, CPU fallback, wrong graphs fail."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from packnet_export.cli.main import app
from typer.testing import CliRunner

from packnet_export import checkpoint
from packnet_export.exporter import pipeline, validation
from packnet_export.training import evaluate_task

runner = CliRunner()


@pytest.fixture(scope="module")
def beta_dense(tiny_model, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("val")
    (f,) = pipeline.export(tiny_model, out, [2], ["dense"], source_sha256=checkpoint.file_sha256(tiny_checkpoint))
    return f.path


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine whose onnxruntime has no CUDA provider, whatever this one has."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


def test_auto_falls_back_to_cpu_with_a_notice(beta_dense, no_cuda):
    session = validation.make_session(beta_dense, "auto")
    assert session.provider == "CPUExecutionProvider" == session.session.get_providers()[0]
    assert "CUDA is not usable" in session.notice and "\n" not in session.notice


def test_auto_reports_the_provider_really_used(beta_dense):
    session = validation.make_session(beta_dense, "auto")
    assert session.provider == session.session.get_providers()[0]
    assert (session.notice is None) == (session.provider == "CUDAExecutionProvider")


def test_cuda_without_cuda_exits_1_and_writes_nothing(tiny_checkpoint, tmp_path, no_cuda):
    result = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--task", "beta", "-o",
                                 str(tmp_path), "--provider", "cuda"])
    assert result.exit_code == 1
    assert "--provider cuda: CUDA cannot be used" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_on_auto_prints_the_notice_once(tiny_checkpoint, tmp_path, no_cuda):
    result = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--task", "alpha", "--task", "beta",
                                 "--format", "all", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("CUDA is not usable") == 1
    assert result.stderr.count(" CPU ") == 6  # two dense, two sparse, multitask for both tasks


def test_validate_with_checkpoint_and_images_reports_onnxruntime_accuracy(beta_dense, tiny_model, tiny_checkpoint,
                                                                        tiny_data):
    result = runner.invoke(app, ["validate", str(beta_dense), "--checkpoint", str(tiny_checkpoint), "--data",
                                 str(tiny_data["beta"]), "--provider", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (entry,) = report["tasks"]
    assert report["passed"] and report["provider"] == "CPUExecutionProvider" and report["compared"]
    assert entry["inputs"] == "images" and entry["top1_agreement"] == 1.0 and entry["latency_ms"] > 0
    expected = evaluate_task(tiny_model, "beta", tiny_data["beta"], "test")["top1"]
    assert entry["accuracy"] == pytest.approx(expected, abs=1e-6)


def test_validate_without_checkpoint_checks_the_graph_alone(beta_dense):
    result = runner.invoke(app, ["validate", str(beta_dense), "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    assert "pass --checkpoint to compare" in result.stderr


def test_a_wrong_weight_fails_validation_with_exit_1(beta_dense, tiny_checkpoint, tmp_path):
    proto = onnx.load(str(beta_dense))
    for i, t in enumerate(proto.graph.initializer):
        if t.name == "fc.weight":
            w = numpy_helper.to_array(t).copy()
            w[0] += 1.0
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, t.name))
    bad = tmp_path / "beta.dense.onnx"
    onnx.save(proto, str(bad))
    result = runner.invoke(app, ["validate", str(bad), "--checkpoint", str(tiny_checkpoint), "--provider", "cpu"])
    assert result.exit_code == 1
    assert "FAILED" in result.stderr and "validation failed" in result.stderr


def test_validate_refuses_a_file_that_is_not_onnx(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model")
    result = runner.invoke(app, ["validate", str(junk)])
    assert result.exit_code == 2 and "not a readable ONNX file" in result.stderr


def test_validate_a_task_the_file_does_not_hold(beta_dense, tiny_checkpoint):
    result = runner.invoke(app, ["validate", str(beta_dense), "--checkpoint", str(tiny_checkpoint), "--task", "gamma"])
    assert result.exit_code == 2 and "not 'gamma'" in result.stderr


def test_compare_counts_numerical_ties_as_agreement():
    reference = np.array([[1.0, 1.0 - 1e-7, 0.0], [0.0, 2.0, 1.0]], dtype=np.float32)
    tie = np.array([[1.0 - 2e-7, 1.0, 0.0], [0.0, 2.0, 1.0]], dtype=np.float32)
    assert validation.compare(tie, reference, 1e-3)["passed"]
    wrong = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 2.0]], dtype=np.float32)
    result = validation.compare(wrong, reference, 1e-3)
    assert not result["passed"] and result["top1_agreement"] == 0.5
