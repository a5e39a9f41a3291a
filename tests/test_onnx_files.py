"""ONNX files given to ``packnet validate`` and ``packnet report --exports``: one checker
(``packnet_export/onnx_files.py``) refuses hostile external data, metadata that disagrees
with the graph, and files that are not graphs, before onnx or onnxruntime open anything.

Cases are generated per family from two real exports of the tiny model (a dense task and
the multi-task graph): external-data locations, offsets and lengths; each metadata key with
malformed values; files that are not ONNX graphs. Each case runs through the checker in
process and through ``validate`` (exit 2, never 1); ``report --exports`` runs once on a
folder holding every case of every family (exit 2, or each file listed as skipped with its
reason under ``--skip-unreadable``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
from faults import one_thread  # noqa: F401
from onnx import TensorProto, helper, numpy_helper
from packnet_export.cli.main import app
from typer.testing import CliRunner

from packnet_export import checkpoint
from packnet_export.errors import PackNetError
from packnet_export.exporter import pipeline
from packnet_export.onnx_files import check_file


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("good")
    files = pipeline.export(checkpoint.load(tiny_checkpoint), folder, [1], ["dense", "multitask"],
                            source_sha256=checkpoint.file_sha256(tiny_checkpoint))
    return {f.format: Path(f.path) for f in files}


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(result, code: int = 2) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.stderr
    return lines[0]


# ------------------------------------------------------------------ family: external data
def with_external(source: Path, folder: Path, location: str, data: bytes | None = None, offset: str = "0",
                  length: str | None = None, extra: dict[str, str] | None = None, name: str = "m.onnx") -> Path:
    """``source`` with its first initializer's bytes moved out to ``location`` (written when ``data``)."""
    proto = onnx.load(str(source))
    tensor = proto.graph.initializer[0]
    raw = numpy_helper.to_array(tensor).tobytes()
    if data is not None:
        (folder / "w.bin").write_bytes(raw if data == b"same" else data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": offset, "length": str(len(raw)) if length is None else length,
               **(extra or {})}
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    target = folder / name
    target.write_bytes(proto.SerializeToString())
    return target


def _loop(folder: Path) -> str:
    if not (folder / "loop_a").is_symlink():
        os.symlink(folder / "loop_b", folder / "loop_a")
        os.symlink(folder / "loop_a", folder / "loop_b")
    return "loop_a"


def _fifo(folder: Path) -> str:
    if not (folder / "pipe.bin").exists():
        os.mkfifo(folder / "pipe.bin")
    return "pipe.bin"


def _subfolder(folder: Path) -> str:
    (folder / "sub").mkdir(exist_ok=True)
    return "sub"


LOCATIONS = {
    "backslash": "sub\\w.bin", "url": "http://example.com/w.bin", "file url": "file:///etc/passwd",
    "drive": "C:w.bin", "home": "~/w.bin", "nul": "w\x00.bin", "5000 chars": "w" * 5000, "dot": ".", "empty": "",
    "parent": "../w.bin", "absolute": "/etc/passwd", "missing": "absent.bin", "itself": "m.onnx",
    "symlink loop": _loop, "fifo": _fifo, "folder": _subfolder, "dot slash": "./",
}
OFFSETS = {"negative offset": {"offset": "-1"}, "text offset": {"offset": "abc"}, "float offset": {"offset": "1e3"},
           "huge offset": {"offset": str(2**62)}, "huge length": {"length": str(2**62)},
           "short length": {"length": "4"}, "negative length": {"length": "-8"},
           "offset past the data": {"offset": "8"}}
EXTRA_KEYS = {"basepath": {"basepath": "/etc"}, "unknown key": {"compress": "zlib"}}
EXTERNAL = [*LOCATIONS, *OFFSETS, *EXTRA_KEYS]


def make_external_case(case: str, dense: Path, folder: Path, name: str = "m.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if case in LOCATIONS:
        location = LOCATIONS[case]
        location = location(folder) if callable(location) else name if location == "m.onnx" else location
        return with_external(dense, folder, location, b"same", name=name)
    if case in OFFSETS:
        return with_external(dense, folder, "w.bin", b"same", name=name, **OFFSETS[case])
    return with_external(dense, folder, "w.bin", b"same", extra=EXTRA_KEYS[case], name=name)


@pytest.mark.parametrize("case", EXTERNAL)
def test_external_data_fault_is_refused_by_validate(exports, tiny_checkpoint, tmp_path, case):
    model = make_external_case(case, exports["dense"], tmp_path / "m")
    with pytest.raises(PackNetError) as caught:
        check_file(model)
    assert "\n" not in str(caught.value)
    one_line(run("validate", model, "--checkpoint", tiny_checkpoint, "--provider", "cpu"))


def test_external_data_beside_the_model_is_accepted(exports, tiny_checkpoint, tmp_path):
    model = with_external(exports["dense"], tmp_path, "w.bin", b"same")
    assert check_file(model).sidecars == [(tmp_path / "w.bin").resolve()]
    result = run("validate", model, "--checkpoint", tiny_checkpoint, "--provider", "cpu")
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------ family: metadata
def with_metadata(source: Path, target: Path, **changes: str | None) -> Path:
    proto = onnx.load(str(source))
    meta = {p.key: p.value for p in proto.metadata_props}
    for key, value in changes.items():
        key = "packnet." + key
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(proto.SerializeToString())
    return target


SIZES = ["abc", "[]", "[3,32,32.5]", "[3,32,-1]", "null", "{}", "[3,0,0]", "[3,100000,100000]", "[3,8,8]",
         "[1,16,16]", "true", "[3,16]", "[3,16,16,16]", "[3,true,16]", '"16"', "[" * 100_000]
METADATA = {
    **{("dense", f"input_size={v[:20]}"): {"input_size": v} for v in SIZES},
    ("dense", "input_size missing"): {"input_size": None},
    ("dense", "format=multitask"): {"format": "multitask"}, ("dense", "format=bogus"): {"format": "bogus"},
    ("dense", "format=''"): {"format": ""},
    **{("dense", f"num_classes={v}"): {"num_classes": v} for v in ("0", "-1", "1e8", '"3"', "100000000", "5", "x")},
    ("dense", "task missing"): {"task": None}, ("dense", "task empty"): {"task": ""},
    ("dense", "sha256 xyz"): {"source_sha256": "xyz"}, ("dense", "sha256 upper"): {"source_sha256": "A" * 64},
    ("dense", "no format, input_size"): {"format": None},
    **{("multitask", f"tasks={v}"): {"tasks": v} for v in ("abc", "[1,2]", '["nope"]', "{}", "null", '["a","a","b"]',
                                                           '[""]', "[]")},
    **{("multitask", f"num_classes={v}"): {"num_classes": v} for v in ("[-1,3]", "[1e8,3]", "[100000000,3]", "3",
                                                                       "[3]", "[3,4,5,6]", "null")},
    ("multitask", "format=dense"): {"format": "dense", "task": "alpha", "num_classes": "3"},
    ("multitask", "tasks missing"): {"tasks": None},
}


@pytest.mark.parametrize("source,case", list(METADATA), ids=[f"{s}:{c}" for s, c in METADATA])
def test_metadata_fault_is_refused(exports, tiny_checkpoint, tmp_path, source, case):
    model = with_metadata(exports[source], tmp_path / "m" / f"{source}.onnx", **METADATA[source, case])
    with pytest.raises(PackNetError) as caught:
        check_file(model)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 500
    if case.startswith(("input_size", "format")):
        one_line(run("validate", model, "--checkpoint", tiny_checkpoint, "--provider", "cpu"))


def test_validate_says_when_the_checkpoint_is_not_the_source(exports, tiny_checkpoint, tmp_path):
    other = tmp_path / "other.safetensors"
    model = checkpoint.load(tiny_checkpoint)
    model.extra["note"] = "re-saved"  # same weights, another file
    checkpoint.save(model, other)
    result = run("validate", exports["dense"], "--checkpoint", other, "--provider", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["source_matches"] is False
    assert any("not the checkpoint" in n for n in report["notices"])
    same = json.loads(run("validate", exports["dense"], "--checkpoint", tiny_checkpoint, "--provider", "cpu",
                          "--json").stdout)
    assert same["source_matches"] is True


# ------------------------------------------------------------------ family: not ONNX graphs
def _graph_without_nodes(path: Path) -> None:
    graph = helper.make_graph([], "g", [], [])
    path.write_bytes(helper.make_model(graph).SerializeToString())


def _short_initializer(path: Path, source: Path) -> None:
    proto = onnx.load(str(source))
    proto.graph.initializer[0].raw_data = proto.graph.initializer[0].raw_data[:-4]
    path.write_bytes(proto.SerializeToString())


NOT_GRAPHS = {
    "empty": lambda p, s: p.write_bytes(b""),
    "doubled": lambda p, s: p.write_bytes(s.read_bytes() * 2),
    "garbage": lambda p, s: p.write_bytes(b"\xff\xfe not protobuf at all \x00" * 10),
    "text": lambda p, s: p.write_text("hello"),
    "truncated": lambda p, s: p.write_bytes(s.read_bytes()[:100]),
    "folder": lambda p, s: p.mkdir(),
    "fifo": lambda p, s: os.mkfifo(p),
    "/dev/zero": lambda p, s: os.symlink("/dev/zero", p),
    "dangling link": lambda p, s: os.symlink(p.parent / "absent", p),
    "no nodes": lambda p, s: _graph_without_nodes(p),
    "short raw data": _short_initializer,
}


@pytest.mark.parametrize("case", list(NOT_GRAPHS))
def test_file_that_is_not_a_graph_is_refused(exports, tmp_path, case):
    path = tmp_path / "m.onnx"
    NOT_GRAPHS[case](path, exports["dense"])
    with pytest.raises(PackNetError) as caught:
        check_file(path)
    assert "\n" not in str(caught.value)


def test_report_refuses_or_skips_every_unreadable_file(exports, tiny_checkpoint, tmp_path):
    """One folder with a good export and every bad file of every family: exit 2 naming the
    first; with --skip-unreadable, each bad file listed as skipped with its reason, the good
    one counted."""
    folder = tmp_path / "exports"
    folder.mkdir()
    good = folder / exports["dense"].name
    good.write_bytes(exports["dense"].read_bytes())
    bad = []
    for i, case in enumerate(NOT_GRAPHS):
        path = folder / f"bad{i}.onnx"
        NOT_GRAPHS[case](path, exports["dense"])
        bad.append(path)
    for i, (source, case) in enumerate(METADATA):
        bad.append(with_metadata(exports[source], folder / f"meta{i}.onnx", **METADATA[source, case]))
    for i, case in enumerate(EXTERNAL):
        bad.append(make_external_case(case, exports["dense"], folder, f"external{i}.onnx"))
    line = one_line(run("report", tiny_checkpoint, "--exports", folder))
    assert "--skip-unreadable" in line
    result = run("report", tiny_checkpoint, "--exports", folder, "--skip-unreadable", "--json")
    assert result.exit_code == 0, result.output
    files = {Path(f["path"]).name: f for f in json.loads(result.stdout)["files"]}
    assert files[good.name]["kind"] == "dense" and files[good.name]["bytes"] == good.stat().st_size
    for path in bad:
        assert files[path.name]["kind"] == "skipped" and files[path.name]["bytes"] == 0, path.name
        assert str(path) in files[path.name]["reason"]
    text = run("report", tiny_checkpoint, "--exports", folder, "--skip-unreadable")
    assert text.exit_code == 0 and text.stderr.count("skipped: ") == len(bad)
