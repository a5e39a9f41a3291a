"""No code from files: a hostile pickle is refused without running, checkpoints are never unpickled.

Every hostile file here carries a ``__reduce__`` that would create a marker file if it ever
ran; each test checks the refusal *and* that the marker never appeared.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from packnet_export.cli.main import app
from typer.testing import CliRunner

from packnet_export import checkpoint
from packnet_export.errors import PackNetError
from packnet_export.weights import load_state_dict

REPO = Path(__file__).resolve().parent.parent


class _Payload:
    """Pickles as a call to ``os.system``: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def hostile(tmp_path) -> tuple[Path, Path, Path]:
    """(torch.save file, raw pickle file, marker): both files hold a tensor and the payload."""
    marker = tmp_path / "PWNED"
    zip_file = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(4, 3, 3, 3), "x": _Payload(marker)}, zip_file)
    raw_file = tmp_path / "evil.pkl"
    raw_file.write_bytes(pickle.dumps({"w": _Payload(marker)}))
    return zip_file, raw_file, marker


def test_payload_really_runs_when_unpickled(hostile):
    """The payload is live: ``pickle.loads`` runs it (so the refusals below mean something)."""
    _, raw_file, marker = hostile
    pickle.loads(raw_file.read_bytes())
    assert marker.exists()


def test_weights_file_with_payload_is_refused(hostile):
    zip_file, raw_file, marker = hostile
    for path in (zip_file, raw_file):
        with pytest.raises(PackNetError, match="cannot read weights"):
            load_state_dict(path)
    assert not marker.exists()


def test_init_weights_refuses_payload(hostile, tmp_path):
    zip_file, _, marker = hostile
    result = CliRunner().invoke(app, ["init", "--arch", "vgg_mini", "--width", "4", "--weights", str(zip_file),
                                      "-o", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 2, result.output
    assert "cannot read weights" in result.output
    assert not marker.exists()
    assert not (tmp_path / "m.safetensors").exists()


def test_pickle_named_as_checkpoint_is_refused(hostile, tmp_path):
    """``checkpoint.load`` reads safetensors only: a pickle under a checkpoint's name is just bad bytes."""
    zip_file, raw_file, marker = hostile
    for source in (zip_file, raw_file):
        disguised = tmp_path / f"{source.stem}.safetensors"
        disguised.write_bytes(source.read_bytes())
        with pytest.raises(PackNetError, match="not a usable PackNet checkpoint"):
            checkpoint.load(disguised)
        result = CliRunner().invoke(app, ["inspect", str(disguised)])
        assert result.exit_code == 2
    assert not marker.exists()


def test_import_refuses_payload(hostile, tmp_path):
    """``packnet import`` reads foreign pickles with a restricted unpickler."""
    zip_file, raw_file, marker = hostile
    for path in (zip_file, raw_file):
        result = CliRunner().invoke(app, ["import", str(path), "-o", str(tmp_path / "imported.safetensors")])
        assert result.exit_code == 2, result.output
    assert not marker.exists()
    assert not (tmp_path / "imported.safetensors").exists()


def test_no_unrestricted_unpickling_in_the_code():
    """Every ``torch.load`` passes ``weights_only=True`` or a restricted ``pickle_module``; no bare pickle loads."""
    offenders = []
    for source in [*REPO.glob("packnet_export/**/*.py"), *REPO.glob("cli/**/*.py")]:
        text = source.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start(): text.find("\n\n", match.start())]
            if "weights_only=True" not in call and "pickle_module=" not in call:
                offenders.append(f"{source.relative_to(REPO)}: torch.load without weights_only=True")
        for bare in re.finditer(r"\b(pickle|dill|cloudpickle|joblib)\.loads?\(", text):
            offenders.append(f"{source.relative_to(REPO)}: {bare.group(0)}")
    assert not offenders, offenders
