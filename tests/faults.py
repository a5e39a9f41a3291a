"""Helpers for the fault tests: run ``packnet`` in a subprocess and wait for files to appear."""

from __future__ import annotations

import json
import os
import signal
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
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_interruptible, **kwargs)


def _interruptible() -> None:
    """Ctrl-C reaches the child even when the suite runs as a background job (``pytest &``):
    a non-interactive shell starts those with SIGINT ignored, exec keeps it ignored, and
    Python then installs no KeyboardInterrupt handler, so an interrupt test would see a run
    that finishes instead of stopping."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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


MEMORY_PROBE = r"""
import importlib, json, resource, sys
from packnet_export.errors import PackNetError
module, name = sys.argv[1].split(":")
read = getattr(importlib.import_module(module), name)
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
try:  # warm up: imports and first allocations are not counted against the files
    read(sys.argv[2])
except PackNetError:
    pass
# a safety net: a reader that allocates what a header declares fails here instead of swapping
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), hard))
out = {}
for path in sys.argv[3:]:
    before = peak_mb()
    try:
        read(path)
        outcome = "read"
    except PackNetError:
        outcome = "PackNetError"
    except BaseException as exc:
        outcome = type(exc).__name__ + ": " + str(exc)[:200]
    out[path] = [outcome, peak_mb() - before]
print(json.dumps(out))
"""


def memory_per_file(reader: str, warm_up: Path, paths: list[Path], timeout: float = 300) -> dict[str, list]:
    """``{path: [outcome, peak MB grown]}`` of ``reader`` ("module:function") on each file.

    One subprocess for all files (a second interpreter per file costs more than the cases),
    under an address-space limit of 3 GB above its start, so a reader that allocates what a
    crafted header declares fails with MemoryError instead of swapping the machine.
    """
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, reader, str(warm_up), *map(str, paths)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)
