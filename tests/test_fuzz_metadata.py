"""Metadata fuzz generated from the metadata itself: every leaf of a real checkpoint's metadata.

Every string field gets terminal markup, control characters, an empty and a very long value;
every number (and flag) gets 0, negative, NaN, infinities and huge values. The leaves are
read from a trained checkpoint's ``packnet`` metadata (list indices folded, so each field of
the schema is tried once), so a field added to the format is fuzzed without editing this file.

The promise for each case: ``checkpoint.load`` either refuses with one line, or returns a
model that runs, saves and loads again; ``packnet inspect`` (table and ``--json``) exits 0 or
2 with one line, and no control character reaches the terminal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from faults import one_thread  # noqa: F401
from hostile import invoke
from test_fuzz_checkpoint import load_or_refuse, read_parts, write_parts

from packnet_export import checkpoint

STRINGS = ["", "[/]", "[bold]x[/bold", "a\x1b[31mb\nc\x07", "\x00", "x" * 5000]
NUMBERS = [0, -1, math.nan, math.inf, -math.inf, 1e308, 2**70, 0.5]


def leaves(obj, path: tuple = ()):
    """(path, value) of every string, number and flag in ``obj``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from leaves(v, (*path, i))
    else:
        yield path, obj


def schema_leaves(meta: dict) -> list[tuple]:
    """One path per field of the schema: the first occurrence of each path with indices folded."""
    seen, out = set(), []
    for path, value in leaves(meta):
        folded = tuple("*" if isinstance(p, int) else p for p in path)
        if folded not in seen and path[:1] not in (("format",), ("format_version",)):
            seen.add(folded)
            out.append((path, value))
    return out


def replaced(meta: dict, path: tuple, value) -> dict:
    meta = json.loads(json.dumps(meta))
    node = meta
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return meta


def _cases(meta: dict) -> list[tuple[tuple, object]]:
    cases = []
    for path, value in schema_leaves(meta):
        for new in (STRINGS if isinstance(value, str) else NUMBERS):
            cases.append((path, new))
    return cases


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    return read_parts(tiny_checkpoint)


def _case_ids() -> list:
    """Computed from a freshly made checkpoint's metadata: the tiny fixture's schema."""
    from conftest import TINY_ARCH

    from packnet_export.checkpoint import PackNet, TaskInfo

    model = PackNet.create(**TINY_ARCH)
    model.tasks = [TaskInfo("alpha", ["a", "b"], 0.5, {"val_top1": 50.0, "test_top1": 50.0, "test_top5": 100.0,
                                                       "test_images": 3, "train_images": 8, "val_images": 2,
                                                       "skipped_images": 0},
                            {"epochs": 2, "lr": 0.05, "prune": None, "history": [{"phase": "train", "epoch": 1,
                                                                                 "lr": 0.05, "loss": 1.0}]},
                            resize="crop")]
    return _cases(model.metadata())


CASES = _case_ids()


def test_the_generated_cases_cover_the_trained_checkpoints_schema(parts):
    """The case list (made at collection) names every field the real checkpoint has."""
    meta, _ = parts
    folded = lambda path: tuple("*" if isinstance(p, int) else p for p in path)  # noqa: E731
    real = {folded(p) for p, _ in schema_leaves(meta)}
    generated = {folded(p) for p, _ in CASES}
    missing = {p for p in real - generated if "history" not in p and "training" not in p}
    assert not missing, f"fields of a real checkpoint that no case fuzzes: {sorted(missing)}"


@pytest.mark.parametrize("path,value", CASES,
                         ids=[f"{'.'.join(map(str, p))}={str(v)[:12].encode('unicode_escape').decode()}"
                              for p, v in CASES])
def test_fuzzed_metadata_field(parts, tmp_path: Path, path, value):
    meta, tensors = parts
    try:
        replaced(meta, path, None)
    except (KeyError, IndexError, TypeError):
        pytest.skip("the trained checkpoint has no such field")
    target = write_parts(tmp_path / "fuzzed.safetensors", None, tensors, json.dumps(replaced(meta, path, value)))
    message = load_or_refuse(target)
    for argv in (["inspect", str(target)], ["inspect", str(target), "--json"]):
        result = invoke(argv)
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert result.exit_code == (0 if message is None else 2), result.output[-1000:]
        if message is not None:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-1000:]
        for text in (result.stdout, result.stderr):
            assert "\x1b[31m" not in text and "\x07" not in text and "\x00" not in text
    if message is None:  # what loads, saves; and what was saved, loads again, equal
        model = checkpoint.load(target)
        again = tmp_path / "again.safetensors"
        checkpoint.save(model, again)
        assert checkpoint.load(again).metadata() == model.metadata()
