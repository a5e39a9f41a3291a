"""Start-up: every --help answers without torch, torchvision or onnxruntime; inspect and report
run without torchvision. Each command runs in a fresh interpreter that reports what it loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from packnet_export.exporter.pipeline import SAMPLE_CHECKPOINT

HEAVY = ("torch", "torchvision", "onnxruntime")
SUBCOMMANDS = ("init", "add-task", "eval", "inspect", "report", "import", "export", "validate")
PROBE = f"""
import json, sys
module, argv = sys.argv[1], sys.argv[2:]
sys.argv = [module, *argv]
import importlib
app = importlib.import_module(module).app
try:
    app(argv, standalone_mode=False)
except SystemExit:
    pass
print("\\nLOADED " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
"""


def loaded(module: str, *argv: str) -> set[str]:
    """Top-level heavy packages imported by running ``module``'s app with ``argv``."""
    result = subprocess.run([sys.executable, "-c", PROBE, module, *argv], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    line = result.stdout.rsplit("LOADED ", 1)[1]
    return {m.split(".")[0] for m in json.loads(line)}


@pytest.mark.parametrize("argv", [["--help"], *[[c, "--help"] for c in SUBCOMMANDS]], ids=" ".join)
def test_packnet_help_loads_no_heavy_package(argv):
    assert loaded("packnet_export.cli.main", *argv) == set()


def test_packnet_export_help_loads_no_heavy_package():
    assert loaded("packnet_export.cli.export", "--help") == set()


@pytest.mark.parametrize("command", ["inspect", "report"])
def test_inspect_and_report_need_no_torchvision(command):
    assert "torchvision" not in loaded("packnet_export.cli.main", command, str(SAMPLE_CHECKPOINT), "--json")
