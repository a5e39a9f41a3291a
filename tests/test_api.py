"""The public Python API: the documented example runs, tasks by name or position, errors that
name parameters (never command-line flags), results as dataclasses."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import packnet_export as pn
from packnet_export.checkpoint import file_sha256

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"


def test_the_documented_example_runs(capsys):
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    exec(compile(code, str(DOC), "exec"), {"__name__": "python_api_example"})
    printed = capsys.readouterr().out
    assert "task 2 cars" in printed and "multitask.onnx multitask" in printed and "FAILED" not in printed
    assert "opset -> opset 9 is too old" in printed


def test_tasks_by_name_or_position_and_every_file_validated(tiny_checkpoint, tmp_path):
    files = pn.export(tiny_checkpoint, tmp_path, tasks=["beta", 3], formats=["dense", "multitask"], provider="cpu")
    assert [(f.format, f.task) for f in files] == [("dense", "beta"), ("dense", "gamma"), ("multitask", None)]
    assert files.passed and all(f.validation.provider == "CPUExecutionProvider" for f in files)
    assert files.checkpoint == tiny_checkpoint and files.source_sha256 == file_sha256(tiny_checkpoint)
    assert [t.task for t in files[-1].validation.tasks] == ["beta", "gamma"]
    report = pn.validate(files[0].path, tiny_checkpoint, task="beta", provider="cpu")
    assert report.passed and report.compared and report.tasks[0].top1_agreement == 1.0


@pytest.mark.parametrize(("call", "parameter", "start"), [
    (lambda ckpt, out: pn.export(ckpt, out, tasks=["beta"], ir_version=7), "ir_version", "ir_version 7 is too old"),
    (lambda ckpt, out: pn.export(ckpt, out, tasks=[9]), "tasks", "tasks 9 is not a task position"),
    (lambda ckpt, out: pn.export(ckpt, out, formats="dens"), "formats", "unknown format 'dens' in formats"),
    (lambda ckpt, out: pn.export(ckpt, out, tasks=["beta"], provider="gpu"), "provider", "unknown provider"),
    (lambda ckpt, out: pn.export(ckpt, out, tasks=[], formats="dense"), "tasks", "choose a task with tasks"),
    (lambda ckpt, out: pn.evaluate(ckpt, "beta", out, split="val"), "split", "split must be test or train"),
    (lambda ckpt, out: pn.create("resnet18", width=8), "width", "width applies to vgg_mini only"),
    (lambda ckpt, out: pn.save(pn.load(ckpt), ckpt), "force", "/"),
    (lambda ckpt, out: pn.export(ckpt, out, tasks=["beta"], precision="int8"), "calibration",
     "precision int8 needs calibration images: pass calibration DIR"),
    (lambda ckpt, out: pn.export(ckpt, out, formats="multitask", layout="runtime-mask", precision="int8"), "layout",
     "layout runtime-mask has no int8 form"),
    (lambda ckpt, out: pn.export(ckpt, out, formats="multitask", layout="portable", precision="fp16"), "precision",
     "the multitask layout 'portable' is written in fp32 only"),
    (lambda ckpt, out: pn.export(ckpt, out, formats="multitask", layout="branches", opset=14), "opset",
     "the multitask layout 'branches' needs opset 16"),
    (lambda ckpt, out: pn.plan("vgg_mini", "a:2,b:2,c:2", prune="0.5,0,0.5"), "prune",
     "task 3 (c) would find no free weights"),
])
def test_errors_name_the_parameter_not_a_flag(tiny_checkpoint, tmp_path, call, parameter, start):
    with pytest.raises(pn.ParameterError) as caught:
        call(tiny_checkpoint, tmp_path / "out")
    assert caught.value.parameter == parameter
    assert str(caught.value).startswith(start) and "--" not in str(caught.value), str(caught.value)
    assert not (tmp_path / "out").exists()


def test_add_task_guards_and_training_errors_name_parameters(tiny_checkpoint, tiny_data, tmp_path):
    ckpt = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"")
    cases = [
        (dict(output=taken), "output", f"{taken} exists; pass force to overwrite it, or choose another output"),
        (dict(config=pn.TrainConfig(amp="fp16")), "amp", "amp fp16 is for CUDA GPUs"),
    ]
    with pytest.raises(pn.ParameterError) as caught:  # TrainConfig checks its own fields (params.py)
        pn.TrainConfig(prune=1.5, epochs=0, finetune_epochs=0)
    assert caught.value.parameter == "prune" and str(caught.value).startswith("prune must be a finite number in [0, 1)")
    before = ckpt.read_bytes()
    for kwargs, parameter, start in cases:
        with pytest.raises(pn.ParameterError) as caught:
            pn.add_task(ckpt, "delta", tiny_data["beta"], **kwargs)
        assert caught.value.parameter == parameter and str(caught.value).startswith(start), str(caught.value)
        assert "--" not in str(caught.value)
    with pytest.raises(pn.PackNetError, match="cannot write .*folder .* does not exist"):
        pn.add_task(ckpt, "delta", tiny_data["beta"], output=tmp_path / "no" / "x.safetensors")
    assert ckpt.read_bytes() == before


def test_the_api_is_keyword_only_past_its_subjects():
    with pytest.raises(TypeError):
        pn.export("model.safetensors", "out", ["cars"])  # tasks must be named
    with pytest.raises(TypeError):
        pn.evaluate("model.safetensors", "cars", "data", "test")


def test_inspect_returns_what_the_command_prints_as_json(tiny_checkpoint):
    """``pn.inspect`` is the one call behind ``packnet inspect``: the same numbers, as dataclasses."""
    import json

    from hostile import invoke

    found = pn.inspect(tiny_checkpoint)
    result = invoke(["inspect", str(tiny_checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == found.to_dict()
    assert [t.name for t in found.tasks] == ["alpha", "beta", "gamma"]
    assert found.free + sum(t.owned for t in found.tasks) == found.prunable_weights
    assert [t.used for t in found.tasks] == [sum(t.owned for t in found.tasks[:i + 1]) for i in range(3)]
    for layer in found.layers:
        assert layer.free + sum(layer.owned.values()) == layer.weights
    assert pn.inspect(pn.load(tiny_checkpoint)).tasks == found.tasks  # a model in memory as well as a file
