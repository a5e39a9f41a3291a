"""Hostile checkpoints: truncated, bit-flipped or tampered files never crash the reader.

The promise: ``checkpoint.load`` either returns a model every later step can use (each task
runs, ``inspect`` works), or raises ``PackNetError`` with a one-line message; ``packnet
inspect`` prints that line and exits 2. Never another exception, a hang, or memory that grows
with what a header declares instead of what the file holds.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults import memory_per_file, one_thread  # noqa: F401
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packnet_export.cli.main import app
from safetensors import safe_open
from safetensors.torch import save as st_save

from packnet_export import checkpoint, masks
from packnet_export.errors import PackNetError

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------- helpers
def split_file(blob: bytes) -> tuple[dict, bytes]:
    """A safetensors file as (header JSON, data bytes)."""
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join_file(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def read_parts(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A checkpoint as (PackNet metadata, tensors), to be tampered with and written back."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["packnet"]), {k: f.get_tensor(k) for k in f.keys()}


def write_parts(path: Path, meta, tensors: dict[str, torch.Tensor], raw_meta: str | None = None) -> Path:
    text = raw_meta if raw_meta is not None else json.dumps(meta)
    path.write_bytes(st_save({k: v.contiguous() for k, v in tensors.items()}, metadata={"packnet": text}))
    return path


def load_or_refuse(path: Path) -> str | None:
    """Load ``path``; None if it loaded and is usable, else the one-line error message.

    Anything but a ``PackNetError`` escapes and fails the test.
    """
    try:
        model = checkpoint.load(path)
    except PackNetError as exc:
        message = str(exc)
        assert message and "\n" not in message, message
        return message
    # a model that loads must work for every later step
    x = torch.zeros(2, 3, model.image_size, model.image_size)
    for k, info in enumerate(model.tasks, start=1):
        with torch.no_grad():
            assert model.task_module(k)(x).shape == (2, info.num_classes)
    for owner in model.owners.values():
        assert sum(masks.owner_counts(owner, len(model.tasks))) == owner.numel()
    return None


@pytest.fixture(scope="module")
def clean_bytes(tiny_checkpoint) -> bytes:
    return tiny_checkpoint.read_bytes()


@pytest.fixture
def target(tmp_path) -> Path:
    return tmp_path / "hostile.safetensors"


def test_clean_checkpoint_loads(tiny_checkpoint):
    assert load_or_refuse(tiny_checkpoint) is None


# ------------------------------------------------------------- byte-level fuzzing
@FUZZ
@given(cut=st.integers(min_value=0, max_value=10**9))
def test_truncated_file_is_refused(clean_bytes, target, cut):
    target.write_bytes(clean_bytes[: cut % len(clean_bytes)])
    assert load_or_refuse(target) is not None


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=8),
       in_header=st.booleans())
def test_flipped_bytes_are_refused_or_harmless(clean_bytes, target, flips, in_header):
    blob = bytearray(clean_bytes)
    (n,) = struct.unpack("<Q", clean_bytes[:8])
    span = 8 + n if in_header else len(blob)  # the header is small: aim half the flips at it
    for pos, xor in flips:
        blob[pos % span] ^= xor
    target.write_bytes(bytes(blob))
    load_or_refuse(target)


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
          "F8_E4M3", "F8_E5M2", "C64", "Q4", "", "f32"]
SIZES = st.one_of(st.integers(-2, 70), st.sampled_from([2**31, 2**32 + 1, 2**40, 2**62, 2**64 + 3]))


@FUZZ
@given(data=st.data())
def test_tampered_tensor_entries_are_refused_or_harmless(clean_bytes, target, data):
    """Random dtype, shape and data offsets in one tensor's header entry, up to terabytes."""
    header, payload = split_file(clean_bytes)
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[name]
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "all", "delete"]))
    if field in ("dtype", "all"):
        entry["dtype"] = data.draw(st.sampled_from(DTYPES))
    if field in ("shape", "all"):
        entry["shape"] = data.draw(st.lists(SIZES, max_size=5))
    if field in ("data_offsets", "all"):
        entry["data_offsets"] = data.draw(st.lists(SIZES, min_size=2, max_size=2))
    if field == "delete":
        del header[name]
    target.write_bytes(join_file(header, payload))
    load_or_refuse(target)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


def _paths(node, prefix=()):
    """Every (container, key) location in a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


@pytest.fixture(scope="module")
def clean_parts(tiny_checkpoint) -> tuple[dict, dict[str, torch.Tensor]]:
    return read_parts(tiny_checkpoint)


@FUZZ
@given(data=st.data())
def test_tampered_metadata_is_refused_or_harmless(clean_parts, target, data):
    """Any value of the PackNet metadata replaced by random JSON, or removed."""
    meta, tensors = json.loads(json.dumps(clean_parts[0])), clean_parts[1]
    path = data.draw(st.sampled_from(list(_paths(meta))))
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSON_VALUES)
    write_parts(target, meta, tensors)
    load_or_refuse(target)


# --------------------------------------------------------------- named faults
def _tamper(kind: str, meta: dict, tensors: dict[str, torch.Tensor]) -> str | None:
    """Apply the fault ``kind``; returns raw metadata text when the fault is in the text itself."""
    shared_w = "shared/features.0.weight"
    if kind == "metadata not JSON":
        return '{"format": "packnet-export", '
    if kind == "metadata is a list":
        return "[1, 2, 3]"
    if kind == "metadata nested 100k deep":
        return "[" * 100_000 + "]" * 100_000
    if kind.startswith("metadata lacks "):
        del meta[kind.removeprefix("metadata lacks ")]
    elif kind == "task lacks classes":
        del meta["tasks"][0]["classes"]
    elif kind == "newer format version":
        meta["format_version"] = 99
    elif kind == "unknown arch":
        meta["arch"] = "alexnet"
    elif kind == "huge arch width":
        meta["arch_kwargs"] = {"width": 3_000_000}
    elif kind == "bad arch argument":
        meta["arch_kwargs"] = {"depth": 3}
    elif kind == "zero arch width":
        meta["arch_kwargs"] = {"width": 0}
    elif kind == "infinite image size":
        meta["image_size"] = float("inf")
    elif kind == "duplicate task names":
        meta["tasks"][1]["name"] = meta["tasks"][0]["name"]
    elif kind == "more classes than head outputs":
        meta["tasks"][0]["classes"].append("extra")
    elif kind == "owner above task count":
        tensors["owner/features.0.weight"][0, 0, 0, 0] = len(meta["tasks"]) + 1
    elif kind == "owner mask int64":
        tensors["owner/features.0.weight"] = tensors["owner/features.0.weight"].long()
    elif kind == "shared weight float64":
        tensors[shared_w] = tensors[shared_w].double()
    elif kind == "shared weight wrong shape":
        tensors[shared_w] = tensors[shared_w][:1]
    elif kind == "shared weight NaN":
        tensors[shared_w][0, 0, 0, 0] = float("nan")
    elif kind == "missing shared tensor":
        del tensors[shared_w]
    elif kind == "missing owner mask":
        del tensors["owner/features.0.weight"]
    elif kind == "missing head weight":
        del tensors["task/2/fc.weight"]
    elif kind == "missing head bias":
        del tensors["task/2/fc.bias"]
    elif kind == "head bias wrong shape":
        tensors["task/2/fc.bias"] = torch.zeros(7)
    elif kind == "head scalar":
        tensors["task/1/fc.weight"] = torch.tensor(1.0)
    elif kind == "head int8":
        tensors["task/1/fc.weight"] = tensors["task/1/fc.weight"].to(torch.int8)
    elif kind == "extra shared tensor":
        tensors["shared/features.99.weight"] = torch.zeros(2)
    elif kind == "extra tensor of no task":
        tensors["task/9/fc.weight"] = torch.zeros(2, 2)
    elif kind == "extra unknown tensor":
        tensors["payload"] = torch.zeros(2)
    elif kind == "extra task tensor":
        tensors["task/1/features.0.weight"] = torch.zeros(2)
    elif kind == "pretrained head wrong shape":
        tensors["pretrained_head/fc.weight"] = torch.zeros(3)
    else:
        raise AssertionError(kind)
    return None


FAULTS = [
    "metadata not JSON", "metadata is a list", "metadata nested 100k deep", "metadata lacks arch",
    "metadata lacks tasks", "metadata lacks image_size", "metadata lacks mean", "metadata lacks format",
    "metadata lacks format_version", "task lacks classes", "newer format version", "unknown arch",
    "huge arch width", "bad arch argument", "zero arch width", "infinite image size", "duplicate task names",
    "more classes than head outputs", "owner above task count", "owner mask int64", "shared weight float64",
    "shared weight wrong shape", "shared weight NaN", "missing shared tensor", "missing owner mask",
    "missing head weight", "missing head bias", "head bias wrong shape", "head scalar", "head int8",
    "extra shared tensor", "extra tensor of no task", "extra unknown tensor", "extra task tensor",
    "pretrained head wrong shape",
]


@pytest.mark.parametrize("kind", FAULTS)
def test_named_fault_is_refused(tiny_checkpoint, target, kind):
    meta, tensors = read_parts(tiny_checkpoint)
    raw = _tamper(kind, meta, tensors)
    write_parts(target, meta, tensors, raw)
    assert load_or_refuse(target) is not None, f"{kind}: loaded without complaint"


def test_consistent_but_empty_network_is_refused(tmp_path, monkeypatch):
    """A width-0 network whose every tensor matches its (empty) shape.

    ``create`` and ``save`` refuse it (it runs at no input size); a file written by other
    means is refused at load.
    """
    with pytest.raises(PackNetError, match="cannot run"):
        checkpoint.PackNet.create("vgg_mini", 16, {"width": 0})
    with monkeypatch.context() as patched:
        patched.setattr(checkpoint.params, "image_size", lambda value, *args: value)
        model = checkpoint.PackNet.create("vgg_mini", 16, {"width": 0})
    model.tasks = [checkpoint.TaskInfo("a", ["x", "y"], 0.5)]
    model.task_tensors = [{"fc.weight": torch.zeros(2, 0), "fc.bias": torch.zeros(2)}]
    with pytest.raises(PackNetError, match="refusing to write"):
        checkpoint.save(model, tmp_path / "empty.safetensors")
    write_parts(tmp_path / "empty.safetensors", model.metadata(), model.tensors())
    assert load_or_refuse(tmp_path / "empty.safetensors") is not None


def test_not_a_safetensors_file_is_refused(tmp_path):
    for name, blob in [("empty", b""), ("text", b"hello world\n" * 10), ("zeros", bytes(4096)),
                       ("pickle", b"\x80\x04\x95" + bytes(64)), ("huge header length", struct.pack("<Q", 2**63))]:
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(blob)
        assert load_or_refuse(path) is not None, name
    assert load_or_refuse(tmp_path) is not None  # a folder
    assert load_or_refuse(tmp_path / "absent.safetensors") is not None


# ------------------------------------------------------------ the command line
def test_inspect_prints_one_line_and_exits_2(tiny_checkpoint, tmp_path):
    """``packnet inspect`` (the real console script) on a truncated and a tampered file."""
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    meta, tensors = read_parts(tiny_checkpoint)
    tensors["owner/features.0.weight"][0, 0, 0, 0] = 200
    tampered = write_parts(tmp_path / "tampered.safetensors", meta, tensors)
    script = (
        "import sys\n"
        "from packnet_export.cli.main import app\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        app(['inspect', p])\n"
        "    except SystemExit as e:\n"
        "        print('EXIT', e.code, flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(truncated), str(tampered)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["EXIT", "2", "EXIT", "2"], proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("error:") for line in lines), proc.stderr
    assert "truncated.safetensors" in lines[0] and "task 200" in lines[1]
    assert "Traceback" not in proc.stderr


def test_inspect_in_process_on_fuzzed_files(tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    blob = tiny_checkpoint.read_bytes()
    runner = CliRunner()
    for i, cut in enumerate((0, 7, 100, len(blob) // 2, len(blob) - 1)):
        path = tmp_path / f"cut{i}.safetensors"
        path.write_bytes(blob[:cut])
        result = runner.invoke(app, ["inspect", str(path)])
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


# ------------------------------------------------------------------- memory


def test_declared_sizes_do_not_allocate(tiny_checkpoint, tmp_path):
    """Headers that declare terabytes (tensor sizes, header length, network width) cost no memory."""
    blob = tiny_checkpoint.read_bytes()
    header, payload = split_file(blob)
    files = []

    def add(name: str, data: bytes) -> None:
        files.append(tmp_path / name)
        files[-1].write_bytes(data)

    add("header_length.safetensors", struct.pack("<Q", 2**62) + blob[8:])
    add("header_length_50mb.safetensors", struct.pack("<Q", 50 << 20) + blob[8:])
    for key in ("shared/features.0.weight", "owner/features.0.weight"):
        h = json.loads(json.dumps(header))
        start = h[key]["data_offsets"][0]
        h[key]["shape"] = [2**20, 2**20, 1024]  # 1 TiB elements
        h[key]["data_offsets"] = [start, start + 2**40 * 4]
        add(f"tensor_{key.replace('/', '_')}.safetensors", join_file(h, payload))
    meta, tensors = read_parts(tiny_checkpoint)
    meta["arch_kwargs"] = {"width": 600}  # an 8w x 8w x 3 x 3 conv: 1.3 GB of float32 if built for real
    write_parts(tmp_path / "width.safetensors", meta, tensors)
    files.append(tmp_path / "width.safetensors")
    meta["arch"], meta["arch_kwargs"] = "resnet18", {"width_per_group": 2**16}
    write_parts(tmp_path / "resnet_width.safetensors", meta, tensors)
    files.append(tmp_path / "resnet_width.safetensors")

    result = memory_per_file("packnet_export.checkpoint:load", tiny_checkpoint, files, timeout=120)
    for path, (outcome, grown_mb) in result.items():
        assert outcome == "PackNetError", f"{Path(path).name}: {outcome}"
        assert grown_mb < 64, f"{Path(path).name}: peak memory grew by {grown_mb:.0f} MB"
