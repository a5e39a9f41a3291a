"""Helpers for the fault tests: run ``packnet`` in a subprocess and wait for files to appear."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from packnet_export import checkpoint

REPO = Path(__file__).resolve().parent.parent
# one thread: the runs are tiny, and two busy cores make a second thread slower, not faster
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def packnet(*args, **kwargs) -> subprocess.Popen:
    """Start ``packnet ARGS`` (the console script's module) in a subprocess, stderr captured."""
    return subprocess.Popen([sys.executable, "-m", "packnet_export.cli.main", *map(str, args)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll ``condition`` until it holds; fail if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended (exit {proc.returncode}) before the condition held:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def finish(proc: subprocess.Popen, timeout: float = 180.0) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def file_state(path: Path) -> tuple[int, int] | None:
    """Identity of the file now at ``path`` (an atomic rename gives a new inode), or None."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every tensor bit-identical, and the same tasks, metrics and training history."""
    ma, mb = checkpoint.load(a), checkpoint.load(b)
    ta, tb = ma.tensors(), mb.tensors()
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ: {different[:5]}"
    assert ma.metadata() == mb.metadata()


@pytest.fixture(scope="module", autouse=True)
def one_thread(tiny_checkpoint):
    """Tiny models run many times faster on one thread than on two busy cores.

    The session's shared fixtures are built first, with the default threads, so that other
    modules comparing against them see the same numbers.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
