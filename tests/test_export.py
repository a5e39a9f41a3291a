"""packnet-export: every format of every task computes what PyTorch computes, and bad input fails cleanly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from packnet_export.cli.main import app
from typer.testing import CliRunner

from packnet_export import checkpoint, masks, models
from packnet_export.checkpoint import PackNet, TaskInfo
from packnet_export.errors import PackNetError
from packnet_export.exporter import FORMATS, pipeline, sparse, writer

runner = CliRunner()


def cpu_session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def logits(session, x: torch.Tensor, task_index: int | None = None) -> np.ndarray:
    feeds = {"input": x.numpy()}
    if task_index is not None:
        feeds["task_index"] = np.array(task_index, dtype=np.int64)
    return session.run(["logits"], feeds)[0]


def masked_model(arch: str = "vgg_mini", arch_kwargs: dict | None = None, image_size: int = 32,
                 classes: tuple[int, ...] = (5, 7, 3), prune: float = 0.75) -> PackNet:
    """Owners assigned by magnitude as the paper's schedule would (50% for task 1, then ``prune``), no training.

    Weights freed by a task are redrawn before the next task takes them, as training would.
    """
    model = PackNet.create(arch, image_size, arch_kwargs or {})
    head_w, head_b = models.head_keys(arch)
    width = models.build(arch, 2, arch_kwargs or {}).state_dict()[head_w].shape[1]
    g = torch.Generator().manual_seed(0)
    for k, c in enumerate(classes, start=1):
        for key, owner in model.owners.items():
            fresh = torch.randn(owner.shape, generator=g) * 0.05
            model.shared[key] = torch.where(owner == masks.FREE, fresh, model.shared[key])
        model.owners = masks.assign_free(model.owners, k)
        weights, model.owners = masks.prune_task({key: model.shared[key] for key in model.owners}, model.owners,
                                                 k, 0.5 if k == 1 else prune)
        model.shared.update(weights)
        model.tasks.append(TaskInfo(f"task{k}", [f"c{j}" for j in range(c)], 0.5 if k == 1 else prune))
        model.task_tensors.append({head_w: torch.randn(c, width, generator=g) * 0.1,
                                   head_b: torch.randn(c, generator=g) * 0.1})
    return model


@pytest.fixture(scope="module")
def exported(tiny_model, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    files = pipeline.export(tiny_model, out, [1, 2, 3], list(FORMATS),
                          source_sha256=checkpoint.file_sha256(tiny_checkpoint))
    return {(f.format, f.task): f for f in files}


@pytest.mark.parametrize("fmt", ["dense", "sparse"])
def test_every_task_matches_pytorch(exported, tiny_model, probe_inputs, fmt):
    for k, info in enumerate(tiny_model.tasks, start=1):
        ours = logits(cpu_session(exported[fmt, info.name].path), probe_inputs)
        with torch.no_grad():
            ref = tiny_model.task_module(k)(probe_inputs).numpy()
        assert ours.shape == (len(probe_inputs), info.num_classes)
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)
        assert (ours.argmax(1) == ref.argmax(1)).all()


def test_multitask_equals_dense_of_each_task(exported, tiny_model, probe_inputs):
    session = cpu_session(exported["multitask", None].path)
    for k, info in enumerate(tiny_model.tasks, start=1):
        padded, count = session.run(["logits", "num_classes"], {"input": probe_inputs.numpy(),
                                                                "task_index": np.array(k - 1, dtype=np.int64)})
        dense = logits(cpu_session(exported["dense", info.name].path), probe_inputs)
        assert count.shape == () and count.dtype == np.int64 and int(count) == info.num_classes  # a true scalar
        np.testing.assert_allclose(padded[:, :info.num_classes], dense, atol=1e-5, rtol=1e-5)


def test_dense_graph_has_dynamic_batch_and_deployment_metadata(exported, tiny_model, tiny_checkpoint):
    path = exported["dense", "beta"].path
    session = cpu_session(path)
    for n in (1, 7):
        assert logits(session, torch.randn(n, 3, 16, 16)).shape == (n, 4)
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["packnet.task"] == "beta" and meta["packnet.format"] == "dense"
    assert json.loads(meta["packnet.classes"]) == tiny_model.tasks[1].classes
    assert json.loads(meta["packnet.input_size"]) == [3, 16, 16]
    assert json.loads(meta["packnet.mean"]) == list(tiny_model.mean)
    assert json.loads(meta["packnet.std"]) == list(tiny_model.std)
    assert meta["packnet.source_sha256"] == checkpoint.file_sha256(tiny_checkpoint)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.ir_version == 8  # the lowest that opset 18 needs: onnxruntime 1.14 and newer load it
    onnx.checker.check_model(proto)


def test_sparse_is_smaller_and_near_its_size_target(exported, tiny_model):
    for info in tiny_model.tasks:
        f = exported["sparse", info.name]
        assert f.bytes < exported["dense", info.name].bytes
        # a 17k-weight model: the graph's ~3 kB of structure and metadata is outside the 5% allowance
        assert f.bytes <= f.size_bound + 4096


def test_sparse_meets_the_size_target_on_a_real_sized_model(tmp_path):
    model = masked_model("vgg_mini", {"width": 16}, image_size=16, classes=(5, 7))
    files = pipeline.export(model, tmp_path, [1, 2], ["dense", "sparse"])
    x = torch.randn(2, 3, 16, 16)
    for f in files:
        k = model.task_number(f.task)
        with torch.no_grad():
            ref = model.task_module(k)(x).numpy()
        np.testing.assert_allclose(logits(cpu_session(f.path), x), ref, atol=1e-4, rtol=1e-4)
        if f.format == "sparse":
            used = sum(int(masks.uses(o, k).sum()) for o in model.owners.values())
            assert f.extra["nonzero_weights"] <= used
            assert f.bytes <= f.size_bound, (f.task, f.bytes, f.size_bound)


def test_all_tasks_run_the_torch_exporter_once(tiny_model, tmp_path, monkeypatch):
    calls = []
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipeline.export(tiny_model, tmp_path, [1, 2, 3], ["dense", "sparse"])
    assert len(calls) == 1
    assert len(list(tmp_path.glob("*.onnx"))) == 6


def test_large_graphs_keep_their_tensors_in_one_relative_sidecar(tiny_model, tmp_path, monkeypatch, probe_inputs):
    monkeypatch.setattr(writer, "EXTERNAL_DATA_BYTES", 0)
    (f,) = pipeline.export(tiny_model, tmp_path, [2], ["dense"])
    assert f.external_data == tmp_path / "beta.dense.onnx.data"
    proto = onnx.load(str(f.path), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"beta.dense.onnx.data"}
    moved = tmp_path / "moved"  # a relative path: the pair still loads after moving the folder
    moved.mkdir()
    for p in (f.path, f.external_data):
        shutil.move(p, moved / p.name)
    with torch.no_grad():
        ref = tiny_model.task_module(2)(probe_inputs).numpy()
    np.testing.assert_allclose(logits(cpu_session(moved / f.path.name), probe_inputs), ref, atol=1e-5)


def test_sparse_decode_roundtrips_weights():
    w = torch.tensor([[0.0, 1.5, 0.0], [-2.0, 0.0, 3.0]])
    bits, values = sparse.encode([w, torch.zeros(5), torch.ones(2)])
    assert bits.shape == (2, 1) and values.tolist() == [0.0, 1.5, -2.0, 3.0, 1.0, 1.0]


def test_streamed_encoding_equals_the_whole_array_encoding(monkeypatch):
    """Export encodes a few elements at a time (pieces of 5 here, so bytes straddle pieces
    and layers); the file must hold exactly the whole-array encoding."""
    monkeypatch.setattr(writer, "PIECE", 5)
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (3, 7), "b": (13,), "c": (2, 2, 3)}
    sources = {}
    for key, shape in shapes.items():
        w = torch.randn(shape, generator=g)
        w.view(-1)[::4] = 0.0  # stored zeros are not stored
        sources[key] = (w, torch.randint(0, 4, shape, generator=g, dtype=torch.uint8))
    chunks = sparse.plan_chunks(shapes, limit=40)
    assert [len(c.layers) for c in chunks] == [2, 1]
    for task in (1, 3):
        for chunk, enc in zip(chunks, sparse.encode_chunks(chunks, sources, task)):
            masked = [masks.masked_weights({k: sources[k][0]}, {k: sources[k][1]}, task)[k]
                      for k in (layer.key for layer in chunk.layers)]
            bits, values = sparse.encode(masked)
            np.testing.assert_array_equal(enc.bits.materialize(), bits)
            np.testing.assert_array_equal(enc.values.materialize(), values)
            assert enc.nonzero == len(values) - 1


# ----------------------------------------------------------------- command line
def _no_temp_files(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_cli_exports_and_validates_all_formats(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--task", "beta", "--format", "all",
                                 "-o", str(out), "--provider", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] is True
    assert sorted(p.name for p in out.iterdir()) == ["beta.dense.onnx", "beta.sparse.onnx", "multitask.onnx"]
    for entry in report["validation"]:
        assert entry["provider"] == "CPUExecutionProvider"
        assert all(t["top1_agreement"] == 1.0 and t["max_abs_diff"] <= t["tolerance"] for t in entry["tasks"])


def test_default_format_is_dense_and_existing_files_need_force(tiny_checkpoint, tmp_path):
    args = ["export", "--checkpoint", str(tiny_checkpoint), "--task", "alpha", "-o", str(tmp_path), "--no-validate"]
    assert runner.invoke(app, args).exit_code == 0
    target = tmp_path / "alpha.dense.onnx"
    before = target.read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.stderr
    assert target.read_bytes() == before
    assert runner.invoke(app, args + ["--force"]).exit_code == 0
    assert _no_temp_files(tmp_path)


def test_unknown_task_lists_tasks_and_suggests(tiny_checkpoint, tmp_path):
    result = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--task", "betta", "-o",
                                 str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "did you mean 'beta'" in result.stderr and "alpha, beta, gamma" in result.stderr
    assert not (tmp_path / "o").exists()


def test_opset_too_old_fails_before_writing(tiny_checkpoint, tmp_path):
    result = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--task", "beta", "--opset", "9",
                                 "-o", str(tmp_path)])
    assert result.exit_code == 2 and "opset 9 is too old" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_nan_weights_are_refused_and_nothing_is_written(tiny_model, tmp_path):
    bad = PackNet(**{**tiny_model.__dict__, "shared": dict(tiny_model.shared)})
    key = next(iter(bad.owners))
    bad.shared[key] = bad.shared[key].clone()
    bad.shared[key].view(-1)[0] = float("nan")
    with pytest.raises(PackNetError, match="NaN or Inf"):
        pipeline.export(bad, tmp_path / "o", [1], ["dense"])
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_output_folder(tiny_checkpoint, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--task", "beta", "-o",
                                     str(locked / "sub")])
        assert result.exit_code == 2 and "cannot create output folder" in result.stderr
        result = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--task", "beta", "-o",
                                     str(locked)])
        assert result.exit_code == 2 and "not writable" in result.stderr
    finally:
        locked.chmod(0o700)


def test_missing_sample_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "SAMPLE_CHECKPOINT", tmp_path / "absent.safetensors")
    result = runner.invoke(app, ["export", "--task", "cars", "-o", str(tmp_path)])
    assert result.exit_code == 2 and "bundled sample" in result.stderr and "--checkpoint" in result.stderr


def test_packnet_export_console_script_is_the_same_command(tiny_checkpoint, tmp_path):
    from packnet_export.cli.export import app as export_app

    result = runner.invoke(export_app, ["--checkpoint", str(tiny_checkpoint), "--task", "gamma", "--format",
                                        "sparse", "-o", str(tmp_path), "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "gamma.sparse.onnx").is_file()
    assert "top-1 agree 100.0%" in result.stderr


def test_the_lean_multitask_layout_is_chosen_from_the_cli_and_validates(tiny_checkpoint, tmp_path):
    r = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--format", "multitask",
                            "--multitask-layout", "runtime-mask", "-o", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    graph = onnx.load(str(tmp_path / "multitask.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in graph.metadata_props}
    assert "runtime-mask" in json.dumps(meta)
    bad = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--format", "multitask",
                              "--multitask-layout", "fast", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and all(word in bad.output for word in ("'fast'", "'branches'", "'runtime-mask'"))
    assert not (tmp_path / "x").exists()


def test_the_docs_list_every_registered_format():
    from packnet_export.exporter import REGISTRY

    root = Path(__file__).resolve().parents[1]
    for page in ("docs/export.md", "README.md"):
        text = (root / page).read_text()
        for fmt in REGISTRY.values():
            assert f"`{fmt.file_name('<task>')}`" in text, (page, fmt.name)


@pytest.mark.parametrize(("opset", "ir"), [(13, 7), (15, 8), (18, 8), (20, 9)])
def test_every_format_is_written_with_the_lowest_ir_version_its_opset_needs(tiny_model, tmp_path, opset, ir):
    layout = "branches" if opset >= 16 else "runtime-mask"  # branches needs opset 16
    files = pipeline.export(tiny_model, tmp_path, [2], ["dense", "sparse", "multitask"], opset=opset, layout=layout)
    for f in files:
        proto = onnx.load(str(f.path), load_external_data=False)
        assert proto.ir_version == ir and proto.opset_import[0].version == opset, f.path
        onnx.checker.check_model(proto)
        cpu_session(f.path)  # loads


def test_ir_version_override_is_written_and_checked_against_the_opset(tiny_checkpoint, tmp_path):
    r = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--task", "beta", "--ir-version", "10",
                            "-o", str(tmp_path / "ok"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ir_version"] == 10
    assert onnx.load(str(tmp_path / "ok" / "beta.dense.onnx")).ir_version == 10
    for bad, message in (("7", "--ir-version 7 is too old for opset 18: it needs IR version 8"),
                         (str(onnx.IR_VERSION + 1), "newer than the installed onnx")):
        r = runner.invoke(app, ["export", "--checkpoint", str(tiny_checkpoint), "--task", "beta", "--ir-version", bad,
                                "-o", str(tmp_path / "bad")])
        assert r.exit_code == 2 and message in r.stderr, r.output
        assert not (tmp_path / "bad").exists()


def test_fixed_choices_are_listed_in_help_and_refused_when_unknown(tmp_path):
    from packnet_export.exporter import FORMAT_CHOICES, LAYOUTS, PROVIDERS

    text = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "300"}).output
    for choices in (FORMAT_CHOICES, LAYOUTS, PROVIDERS):
        assert "|".join(choices) in text, choices
    bad = runner.invoke(app, ["export", "--format", "dens", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "'dens'" in bad.output and not (tmp_path / "x").exists()
