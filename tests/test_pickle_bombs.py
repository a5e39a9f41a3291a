"""Pickle bombs given to ``packnet import``: refused with one line, in bounded time and memory.

The cases are generated per family (declared lengths x opcodes and sizes, allocating
constructors x sizes, nesting kinds x depths, hash bombs x the places a key is hashed x
depths, forged storages, forged containers). Each case runs in process (refused, one
line, quickly); all of them also run in one subprocess under an address-space limit that
reports the peak memory each case added.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from faults import memory_per_file
from legacy_pickle import Storage, Tensor, legacy_save, tensor_of

from packnet_export.errors import PackNetError
from packnet_export.importers import import_file
from packnet_export.importers.safe_pickle import MAX_DEPTH

P4 = b"\x80\x04"
STOP = b"."


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n) if n < 2**31 else b"\x8a\x08" + struct.pack("<q", n)


# ------------------------------------------------------------------ family: declared lengths
LENGTH_OPCODES = {"BINSTRING": (b"T", "<i"), "BINBYTES": (b"B", "<I"), "BINUNICODE": (b"X", "<I"),
                  "BINBYTES8": (b"\x8e", "<Q"), "BINUNICODE8": (b"\x8d", "<Q"), "FRAME": (b"\x95", "<Q"),
                  "LONG4": (b"\x8b", "<i")}
SIZES = {"2GiB": 2**31 - 1, "3e9": 3 * 10**9, "1e12": 10**12, "2^62": 2**62}


def declared_lengths() -> dict[str, bytes]:
    cases = {}
    for name, (code, fmt) in LENGTH_OPCODES.items():
        for label, size in SIZES.items():
            try:
                length = struct.pack(fmt, size)
            except struct.error:
                continue  # the opcode cannot declare that much
            cases[f"{name}-{label}"] = P4 + code + length + b"x" * 64
    return cases


# ------------------------------------------------------------------ family: allocating constructors
def constructors() -> dict[str, bytes]:
    cases = {}
    for label, n in (("3e9", 3 * 10**9), ("1e12", 10**12)):
        cases[f"bytearray-{label}"] = P4 + _global("builtins", "bytearray") + _int(n) + b"\x85R" + STOP
        cases[f"FloatTensor-{label}"] = P4 + _global("torch", "FloatTensor") + _int(n) + b"\x85R" + STOP
        cases[f"cuda-ByteTensor-{label}"] = P4 + _global("torch.cuda", "ByteTensor") + _int(n) + b"\x85R" + STOP
    cases["codecs-zlib"] = P4 + _global("_codecs", "encode") + b"X\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R."
    cases["OrderedDict-not-pairs"] = P4 + _global("collections", "OrderedDict") + b"](K\x01K\x02K\x03e\x85R."
    return cases


# ------------------------------------------------------------------ family: nesting
def _nested_modules(depth: int) -> bytes:
    """``Sequential`` inside ``Sequential``, ``depth`` times, built innermost first through the memo."""
    seq = _global("torch.nn.modules.container", "Sequential")
    od = _global("collections", "OrderedDict")
    out = bytearray(P4)
    for level in range(depth):
        out += seq + b")\x81}U\x08_modules" + od + b")R"
        if level:
            out += b"U\x010j" + struct.pack("<I", level - 1) + b"s"
        out += b"sb" + b"r" + struct.pack("<I", level) + b"0"
    out += b"j" + struct.pack("<I", depth - 1) + STOP
    return bytes(out)


def nesting() -> dict[str, bytes]:
    kinds = {
        "TUPLE1": lambda d: P4 + b"K\x01" + b"\x85" * d + STOP,
        "MARK-TUPLE": lambda d: P4 + b"(" * d + b"K\x01" + b"t" * d + STOP,
        "list-APPEND": lambda d: P4 + b"]" * d + b"a" * (d - 1) + STOP,
        "dict-SETITEM": lambda d: P4 + b"}" + b"K\x01}" * (d - 1) + b"s" * (d - 1) + STOP,
    }
    cases = {f"{kind}-{depth}": build(depth) for kind, build in kinds.items() for depth in (MAX_DEPTH + 5, 5_000,
                                                                                            500_000)}
    cases.update({f"Sequential-{d}": _nested_modules(d) for d in (MAX_DEPTH + 5, 5_000)})
    return cases


# ------------------------------------------------------------------ family: hash bombs
def _dag(depth: int) -> bytes:
    """A tuple (a, a) whose a is (b, b) ... ``depth`` times: 2**depth leaves in a few bytes."""
    return b"K\x01" + b"2\x86" * depth


def hash_bombs() -> dict[str, bytes]:
    uses = {
        "SETITEM-key": lambda t: b"}" + t + b"K\x01s",
        "SETITEMS-key": lambda t: b"}(" + t + b"K\x01u",
        "DICT-key": lambda t: b"(" + t + b"K\x01d",
        "FROZENSET": lambda t: b"(" + t + b"\x91",
        "ADDITEMS": lambda t: b"\x8f(" + t + b"\x90",
        "builtins.frozenset": lambda t: _global("builtins", "frozenset") + b"(" + t + b"l\x85R",
        "builtins.set": lambda t: _global("builtins", "set") + b"(" + t + b"l\x85R",
        "OrderedDict-pairs": lambda t: _global("collections", "OrderedDict") + b"](" + t + b"K\x01la\x85R",
    }
    return {f"{use}-{d}": P4 + build(_dag(d)) + STOP for use, build in uses.items() for d in (24, 40, 64)}


# ------------------------------------------------------------------ family: storages and tensors
def _checkpoint_with(tensor) -> bytes:
    return legacy_save({"model": None, "previous_masks": {1: tensor}, "dataset2idx": {"a": 1}})


def storages() -> dict[str, bytes]:
    cases = {}
    for label, numel in (("3e9", 3 * 10**9 // 4), ("1e12", 10**12)):
        storage = Storage("FloatStorage", b"\x00" * 16, 4, declared=numel)
        cases[f"declared-numel-{label}"] = _checkpoint_with(Tensor(storage, 0, (4,), (1,)))
    one = Storage("FloatStorage", b"\x00" * 4, 4)
    cases["stride0-1e8-classes"] = _checkpoint_with(Tensor(one, 0, (10**8, 1), (0, 0)))
    cases["overlapping-1e4x1e4"] = _checkpoint_with(Tensor(Storage("FloatStorage", b"\x00" * 400, 4), 0,
                                                           (10**4, 10**4), (1, 1)))
    shared = tensor_of(torch.zeros(2**18))  # 1 MiB, viewed 300 times: 300 MiB once materialized
    many = {i: Tensor(shared.storage, 0, (2**18,), (1,)) for i in range(300)}
    cases["one-storage-300-views"] = legacy_save({"model": None, "previous_masks": many, "dataset2idx": {"a": 1}})
    for label, numel in (("1e3", 1000), ("3e9", 3 * 10**9 // 4)):  # set_ would grow the storage to fit
        cases[f"tensor-beyond-storage-{label}"] = _checkpoint_with(
            Tensor(Storage("FloatStorage", b"\x00" * 16, 4), 0, (numel,), (1,)))
    return cases


# ------------------------------------------------------------------ family: containers
def _zip_with_declared_size(declared: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buffer)
    blob = bytearray(buffer.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(blob))) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    local = info.header_offset  # local header: uncompressed size at +22; central entry: at +24
    blob[local + 22: local + 26] = struct.pack("<I", declared)
    position = blob.find(b"PK\x01\x02")
    while position != -1:
        name_length = struct.unpack("<H", blob[position + 28: position + 30])[0]
        if blob[position + 46: position + 46 + name_length].endswith(b"data.pkl"):
            blob[position + 24: position + 28] = struct.pack("<I", declared)
        position = blob.find(b"PK\x01\x02", position + 4)
    return bytes(blob)


def containers() -> dict[str, bytes]:
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w") as tar:
        member = tarfile.TarInfo("storages")
        member.size = 4
        tar.addfile(member, io.BytesIO(b"\x80\x02K\x00"))
    return {"zip-record-2GiB": _zip_with_declared_size(2**31), "zip-record-100x": _zip_with_declared_size(10**7),
            "tar-format": tar_buffer.getvalue()}


FAMILIES = {"declared lengths": declared_lengths, "allocating constructors": constructors, "nesting": nesting,
            "hash bombs": hash_bombs, "storages and tensors": storages, "containers": containers}
CASES = [(family, name) for family, build in FAMILIES.items() for name in build()]


@pytest.fixture(scope="module")
def bomb_files(tmp_path_factory) -> dict[tuple[str, str], Path]:
    folder = tmp_path_factory.mktemp("bombs")
    files = {}
    for family, build in FAMILIES.items():
        for name, blob in build().items():
            path = folder / f"{family.replace(' ', '_')}-{name}.pt"
            path.write_bytes(blob)
            files[family, name] = path
    return files


@pytest.mark.parametrize("family,name", CASES, ids=[f"{f}:{n}" for f, n in CASES])
def test_bomb_is_refused_quickly(bomb_files, family, name):
    start = time.perf_counter()
    with pytest.raises(PackNetError) as caught:
        import_file(bomb_files[family, name])
    assert time.perf_counter() - start < 10, "took too long"
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    if family == "nesting" and name.split("-")[-1] != str(MAX_DEPTH + 5) or family == "hash bombs" and \
            not name.endswith("-24"):
        assert "deep" in message or "nested items" in message, message




def test_bombs_stay_within_memory(bomb_files):
    """Peak memory grows by less than 64 MB per file (the files are at most a few MB), in one
    subprocess for every family (a second interpreter per family costs more than the cases)."""
    paths = [str(p) for p in bomb_files.values()]
    for path, (outcome, grown_mb) in memory_per_file("packnet_export.importers:import_file", paths[0], paths).items():
        size_mb = os.path.getsize(path) / 2**20
        assert outcome == "PackNetError", f"{Path(path).name}: {outcome}"
        assert grown_mb < 64 + 4 * size_mb, f"{Path(path).name}: peak memory grew by {grown_mb:.0f} MB"
