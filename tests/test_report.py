"""``packnet report``: the paper's storage figures, owner counts, file sizes, the JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from packnet_export.cli.main import app
from typer.testing import CliRunner

from packnet_export import masks
from packnet_export import storage as report

PAPER_TASKS = "imagenet:1000,cubs:200,cars:196,flowers:102"
PAPER_PRUNE = "0.5,0.75,0.75,0"


def run(*args: str):
    return CliRunner().invoke(app, ["report", *args])


def run_json(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def paper() -> dict:
    return run_json("--plan", "--arch", "vgg16", "--tasks", PAPER_TASKS, "--prune", PAPER_PRUNE)


def test_plan_reproduces_the_papers_vgg16_figures(paper):
    s = paper["storage"]
    assert s["single_network"]["megabytes"] == pytest.approx(561.6, abs=0.5)
    assert s["packnet_paper"]["megabytes"] == pytest.approx(595.2, abs=0.5)
    assert s["separate"]["megabytes"] == pytest.approx(2172.7, abs=0.5)
    # the last task is not pruned: owners 1..4 and no free weight, so 2 bits per weight
    assert paper["owner_values_present"] == [1, 2, 3, 4]
    assert paper["mask_bits_per_weight"] == 2
    assert paper["free"] == 0
    # 138.36 M parameters with the ImageNet head, as torchvision's VGG-16
    assert paper["prunable_weights"] + paper["norm_bias_params"] + paper["tasks"][0]["head_params"] == 138_357_544
    assert [t["owned_fraction"] for t in paper["tasks"]] == pytest.approx([0.5, 0.125, 0.09375, 0.28125], abs=1e-4)
    # the bounds order as they must: entropy <= paper's fixed-width code <= one byte per weight
    assert (s["single_network"]["bits"] < s["packnet_entropy"]["bits"] <= s["packnet_paper"]["bits"]
            < s["packnet_official"]["bits"] < s["separate"]["bits"])
    assert s["piggyback"]["components"]["mask"] == 3 * paper["prunable_weights"]


@pytest.mark.parametrize(("prune", "bits"), [("0.5,0", 1), ("0.5,0.5", 2), ("0", 0), ("0.5,0.5,0.5,0.5", 3)])
def test_mask_width_counts_the_owner_values_present(prune, bits):
    names = ",".join(f"t{i}:5" for i in range(len(prune.split(","))))
    r = run_json("--plan", "--arch", "vgg_mini", "--width", "4", "--tasks", names, "--prune", prune)
    assert r["mask_bits_per_weight"] == bits
    assert r["storage"]["packnet_paper"]["components"]["mask"] == bits * r["prunable_weights"]


def test_owner_counts_match_the_checkpoint(tiny_checkpoint, tiny_model):
    r = run_json(str(tiny_checkpoint), "--per-layer")
    n_tasks = len(tiny_model.tasks)
    for row, (key, owner) in zip(r["layers"], tiny_model.owners.items()):
        counts = masks.owner_counts(owner, n_tasks)
        assert row["layer"] == key
        assert [row["free"], *row["owned"]] == counts
    total = sum(o.numel() for o in tiny_model.owners.values())
    assert r["prunable_weights"] == total
    used = 0
    for t, info in zip(r["tasks"], tiny_model.tasks):
        owned = sum(int((o == t["task"]).sum()) for o in tiny_model.owners.values())
        used += owned
        assert (t["name"], t["classes"], t["owned"], t["used"]) == (info.name, info.num_classes, owned, used)
    assert r["free"] == total - used
    assert r["free_fraction"] == pytest.approx(tiny_model.free_fraction())
    # the planner replays the schedule: task 1 (random weights, no ties) owns exactly the planned
    # count; later tasks start from freed zeros, ties at their cutoff are freed too, so after every
    # task a layer has at least the planned number of free weights
    plan = report.plan_inventory(tiny_model.arch, [(t.name, t.num_classes) for t in tiny_model.tasks],
                                 [t.prune for t in tiny_model.tasks], tiny_model.image_size,
                                 tiny_model.arch_kwargs)
    for row, layer in zip(r["layers"], plan.layers):
        assert row["owned"][0] == layer.counts[1], row["layer"]
        for k in range(1, n_tasks + 1):
            assert sum(row["owned"][:k]) <= sum(layer.counts[1:k + 1]), (row["layer"], k)
    assert any(row["free"] > layer.counts[0] for row, layer in zip(r["layers"], plan.layers))


def _onnx_file(path: Path, props: dict[str, str], external: bool = False, size: int = 64) -> None:
    """A small valid ONNX graph (y = x + w) with metadata_props, optionally with external data."""
    w = numpy_helper.from_array(np.arange(size, dtype=np.float32), name="w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])], [w])
    model = helper.make_model(graph)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))


def test_export_sizes_match_the_files(tiny_checkpoint, tmp_path):
    exports = tmp_path / "exports"
    exports.mkdir()
    _onnx_file(exports / "alpha.dense.onnx", {})
    _onnx_file(exports / "beta.sparse.onnx", {}, size=16)
    _onnx_file(exports / "renamed.onnx", {"packnet.kind": "dense", "packnet.task": "gamma"})
    # a graph y = x + w is not a multi-task export: packnet.format=multitask would be refused (its inputs
    # disagree), so this stand-in says its kind the way old files did
    _onnx_file(exports / "all.onnx", {"packnet.kind": "multitask"}, external=True, size=4096)
    (exports / "notes.txt").write_text("not an export")
    r = run_json(str(tiny_checkpoint), "--exports", str(exports))
    files = {Path(f["path"]).name: f for f in r["files"]}
    assert files[tiny_checkpoint.name]["kind"] == "checkpoint"
    assert files[tiny_checkpoint.name]["bytes"] == tiny_checkpoint.stat().st_size
    expected = {"alpha.dense.onnx": ("dense", "alpha"), "beta.sparse.onnx": ("sparse", "beta"),
                "renamed.onnx": ("dense", "gamma"), "all.onnx": ("multitask", None),
                "notes.txt": ("other", None)}
    assert set(files) == {tiny_checkpoint.name, *expected}
    for name, (kind, task) in expected.items():
        f = files[name]
        assert (f["kind"], f["task"]) == (kind, task)
        on_disk = sum(Path(p["path"]).stat().st_size for p in f["parts"])
        assert f["bytes"] == on_disk
        assert f["megabytes"] == pytest.approx(on_disk / 1e6)
    parts = [Path(p["path"]).name for p in files["all.onnx"]["parts"]]
    assert parts == ["all.onnx", "all.onnx.data"]
    assert files["all.onnx"]["bytes"] == sum((exports / p).stat().st_size for p in parts)
    assert files["all.onnx"]["bytes"] > 4096 * 4  # the weights live in the sidecar
    assert files["alpha.dense.onnx"]["reference_bytes"] > 0


def test_json_schema(tiny_checkpoint, tmp_path):
    exports = tmp_path / "e"
    exports.mkdir()
    _onnx_file(exports / "alpha.dense.onnx", {})
    r = run_json(str(tiny_checkpoint), "--exports", str(exports))
    top = {"schema": str, "schema_version": int, "source": str, "checkpoint": str, "arch": str,
           "arch_kwargs": dict, "image_size": int, "per_task_norm": bool, "weight_bits": int, "megabyte": int,
           "prunable_weights": int, "norm_bias_params": int, "head_params": int, "free": int,
           "free_fraction": float, "owner_values_present": list, "mask_bits_per_weight": int,
           "owner_entropy_bits_per_weight": float, "num_tasks": int, "tasks": list, "layers": list,
           "storage": dict, "exports_dir": str, "files": list}
    assert set(r) == set(top)
    for key, kind in top.items():
        assert isinstance(r[key], kind), key
    assert (r["schema"], r["schema_version"], r["source"]) == ("packnet-report", 1, "checkpoint")
    task_keys = {"task": int, "name": str, "classes": int, "prune": float, "owned": int, "used": int,
                 "owned_fraction": float, "used_fraction": float, "head_params": int}
    for t in r["tasks"]:
        assert {k: type(v) for k, v in t.items()} == task_keys
    layer_keys = {"layer": str, "shape": list, "weights": int, "free": int, "owned": list, "free_fraction": float}
    for row in r["layers"]:
        assert {k: type(v) for k, v in row.items()} == layer_keys
        assert len(row["owned"]) == r["num_tasks"]
    assert list(r["storage"]) == ["separate", "single_network", "packnet_paper", "packnet_official",
                                  "packnet_entropy", "piggyback"]
    for s in r["storage"].values():
        assert {k: type(v) for k, v in s.items()} == {"label": str, "bits": int, "bytes": int, "megabytes": float,
                                                      "ratio_to_separate": float, "components": dict}
        assert set(s["components"]) == {"weights", "norm_bias", "heads", "mask"}
        assert s["bits"] == sum(s["components"].values())
        assert s["bytes"] == -(-s["bits"] // 8)
    assert r["storage"]["separate"]["ratio_to_separate"] == 1.0
    for f in r["files"]:
        assert set(f) == {"path", "kind", "task", "precision", "parts", "bytes", "megabytes", "reference",
                          "reference_bytes", "ratio_to_separate"}
        assert f["kind"] in ("checkpoint", "dense", "sparse", "multitask", "onnx", "other")


def test_plot_and_markdown_are_written(tiny_checkpoint, tmp_path):
    png, md = tmp_path / "report.png", tmp_path / "report.md"
    result = run(str(tiny_checkpoint), "--per-layer", "--plot", str(png), "--markdown", str(md))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "## Storage" in text and "## Owners per layer" in text and "alpha" in text
    assert "PackNet" in result.stdout and "separate" in result.stdout
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(("args", "message"), [
    (["missing.safetensors"], "does not exist"),
    (["--plan", "--arch", "vgg_mini", "--tasks", "a:3,b"], "NAME:CLASSES"),
    (["--plan", "--arch", "vgg_mini", "--tasks", "a:x"], "not a number of classes"),
    (["--plan", "--arch", "vgg_mini", "--tasks", "a:3,a:4"], "twice"),
    (["--plan", "--arch", "vgg_mini", "--tasks", "a:3,b:4", "--prune", "0.5"], "one per task"),
    (["--plan", "--arch", "vgg_mini", "--tasks", "a:3", "--prune", "1.5"], "outside"),
    (["--plan", "--arch", "vgg17", "--tasks", "a:3"], "did you mean"),
    (["--plan", "--arch", "vgg_mini", "--tasks", "a:3,b:4", "--prune", "0,0"], "only the last task"),
    (["--plan", "--tasks", "a:3"], "needs --arch"),
    ([], "give a checkpoint"),
])
def test_bad_input_exits_2_with_a_message(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_sizes_of_real_exports_match_the_exporter(tiny_model, tiny_checkpoint, tmp_path):
    from packnet_export.exporter import pipeline

    written = pipeline.export(tiny_model, tmp_path / "out", [1, 3], ["dense", "sparse", "multitask"])
    r = run_json(str(tiny_checkpoint), "--exports", str(tmp_path / "out"))
    files = {Path(f["path"]).name: f for f in r["files"]}
    assert set(files) == {tiny_checkpoint.name, *(Path(w.path).name for w in written)}
    for w in written:
        f = files[Path(w.path).name]
        assert (f["kind"], f["task"], f["bytes"]) == (w.format, w.task, w.bytes)
