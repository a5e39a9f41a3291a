"""The wheel: one top-level package, the sample inside it, and the main job run from anywhere.

The wheel is built from a copy of the repository (nothing written into the checkout) and
installed, not editable, into a fresh venv. To keep this fast and offline, that venv gets
the wheel alone (``--no-deps``) and sees the current environment's dependencies (torch,
onnx, ...) through a ``.pth`` file listing its site-packages. Such a path line adds the
folder to ``sys.path`` after the venv's own site-packages and runs none of the ``.pth``
files in it, so the editable install of the checkout is not active there: what runs is the
wheel's code.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs", "exports",
                              ".pytest_cache", ".ruff_cache", ".hypothesis", "results")


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _source_packages() -> set[str]:
    """Every package of the repository, by the dotted name it installs under."""
    found = {"packnet_export.cli", "packnet_export.samples"}
    for init in (REPO / "packnet_export").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(REPO).parts))
    return found


def test_the_wheel_installs_one_package_with_the_sample_and_exports_from_another_folder(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=SKIP)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
         source)
    (wheel,) = (tmp_path / "dist").glob("packnet_export-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
        record = z.read(f"{dist_info}/RECORD").decode().splitlines()
        top_level = z.read(f"{dist_info}/top_level.txt").decode().split()
    assert {line.split(",")[0].split("/")[0] for line in record} == {"packnet_export", dist_info}
    assert top_level == ["packnet_export"]
    packages = {".".join(n.split("/")[:-1]) for n in names if n.endswith("/__init__.py")}
    assert _source_packages() <= packages, _source_packages() - packages
    assert "packnet_export/samples/packnet-6task.safetensors" in names

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    (purelib,) = venv.glob("lib/python*/site-packages")
    (purelib / "current_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", "--no-index",
         wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run(venv / "bin" / "python", "-c", "import packnet_export.cli.export as m; print(m.__file__)",
                 cwd=elsewhere, env=env).stdout.strip()
    assert Path(where).is_relative_to(purelib), where
    result = _run(venv / "bin" / "packnet-export", "--task", "cars", "--provider", "cpu", "--json", cwd=elsewhere,
                  env=env)
    report = json.loads(result.stdout)
    assert Path(report["checkpoint"]).is_relative_to(purelib)  # the sample, found as package data
    assert report["passed"] and (elsewhere / "exports" / "cars.dense.onnx").is_file()
