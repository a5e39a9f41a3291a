"""The checkpoint file: what a user or another tool can rely on when reading it."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from packnet_export import checkpoint
from packnet_export.errors import PackNetError


def test_the_file_is_plain_safetensors_with_json_metadata(tiny_checkpoint, tiny_model):
    with safe_open(str(tiny_checkpoint), framework="pt") as f:
        meta = json.loads(f.metadata()["packnet"])
        keys = set(f.keys())
    assert meta["format"] == "packnet-export" and meta["format_version"] == checkpoint.FORMAT_VERSION
    assert [t["name"] for t in meta["tasks"]] == ["alpha", "beta", "gamma"]
    assert meta["image_size"] == 16 and len(meta["mean"]) == 3
    assert all(t["metrics"]["test_images"] > 0 for t in meta["tasks"])
    assert {f"owner/{k}" for k in tiny_model.owners} <= keys
    assert {"task/1/fc.weight", "task/3/fc.bias"} <= keys


def test_round_trip_keeps_every_tensor_bit_for_bit(tiny_model, tmp_path):
    path = tmp_path / "a.safetensors"
    checkpoint.save(tiny_model, path)
    loaded = checkpoint.load(path)
    a, b = tiny_model.tensors(), loaded.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rewrite_metadata(src, dst, change):
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["packnet"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(meta, tensors)
    save_file(tensors, str(dst), metadata={"packnet": json.dumps(meta)})


def test_a_newer_format_version_asks_for_an_upgrade(tiny_checkpoint, tmp_path):
    path = tmp_path / "new.safetensors"
    _rewrite_metadata(tiny_checkpoint, path, lambda m, t: m.update(format_version=99))
    with pytest.raises(PackNetError, match="upgrade packnet-export"):
        checkpoint.load(path)


def test_owner_values_above_the_task_count_are_refused(tiny_checkpoint, tmp_path):
    path = tmp_path / "bad.safetensors"

    def corrupt(meta, tensors):
        key = next(k for k in tensors if k.startswith("owner/"))
        tensors[key] = torch.full_like(tensors[key], 7)

    _rewrite_metadata(tiny_checkpoint, path, corrupt)
    with pytest.raises(PackNetError, match="names task 7"):
        checkpoint.load(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "])
def test_foreign_or_broken_files_give_one_clear_error(tmp_path, content):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(PackNetError, match="not a usable PackNet checkpoint"):
        checkpoint.load(path)


def test_a_safetensors_file_of_another_tool_is_recognised(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(PackNetError, match="without PackNet metadata"):
        checkpoint.load(path)


def test_a_failed_save_leaves_the_previous_file_intact(tiny_model, tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    checkpoint.save(tiny_model, path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", fail)
    with pytest.raises(PackNetError, match="No space left"):
        checkpoint.save(tiny_model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "no temporary file may be left behind"
