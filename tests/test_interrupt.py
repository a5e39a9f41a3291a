"""Killed or interrupted training: the checkpoint survives, and the run resumes bit-identically.

One run of ``packnet add-task`` updating its checkpoint in place is stopped three times:
SIGKILL (no chance to clean up), Ctrl-C (SIGINT) and SIGTERM, each after an epoch was saved.
Meanwhile the same command runs uninterrupted to another file. The stopped run, finished by
running the same command again, must end with bit-identical tensors and the same metadata.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCH, TINY_CONFIG, TINY_TASKS, make_image_folder, train_tiny
from faults import (
    assert_same_checkpoint,
    file_state,
    finish,
    one_thread,  # noqa: F401
    packnet,
    wait_for,
)
from safetensors import safe_open
from safetensors.torch import save as st_save

from packnet_export import checkpoint
from packnet_export.checkpoint import PackNet
from packnet_export.errors import PackNetError
from packnet_export.training import Observer, TrainConfig, add_task, resume_path_for


def test_killed_and_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    data = make_image_folder(tmp_path / "data", 3, per_class=8, test_per_class=2)
    source = tmp_path / "model.safetensors"
    checkpoint.save(PackNet.create(**TINY_ARCH), source)
    before = source.read_bytes()
    command = ["add-task", source, "--name", "t", "--data", data, "--epochs", "30", "--finetune-epochs", "6",
               "--lr-decay-every", "12", "--batch-size", "8", "--lr", "0.05", "--seed", "7", "--weight-decay",
               "1e-4"]
    reference = tmp_path / "reference.safetensors"
    uninterrupted = packnet(*command, "-o", reference)  # runs alongside, never stopped
    resume = resume_path_for(source)

    def stop_after_an_epoch(sig: signal.Signals) -> str:
        saved = file_state(resume)
        run = packnet(*command)
        wait_for(lambda: file_state(resume) not in (saved, None), run)  # a (newer) epoch was saved
        run.send_signal(sig)
        code, _, err = finish(run)
        assert source.read_bytes() == before, f"{sig.name} changed the checkpoint"
        assert resume.exists()
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert code == 130, err
            assert "run the same command again to resume" in err and str(resume) in err, err
            assert "Traceback" not in err
        return err

    stop_after_an_epoch(signal.SIGKILL)
    assert "resuming from" in stop_after_an_epoch(signal.SIGINT)
    assert "resuming from" in stop_after_an_epoch(signal.SIGTERM)

    code, _, err = finish(packnet(*command))
    assert code == 0, err
    assert "resuming from" in err
    assert not resume.exists()
    code, _, err = finish(uninterrupted)
    assert code == 0, err

    assert_same_checkpoint(source, reference)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert not leftovers, leftovers


# ------------------------------------------------------------ the resume file
class _StopAtEpoch(Observer):
    """Ctrl-C, as training sees it, when epoch ``n`` finishes (epoch ``n - 1`` is saved by then)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def epoch(self, record: dict) -> None:
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def second_task(tiny_data, tmp_path_factory):
    """A one-task model, and task 2's run interrupted with its resume file kept: (model, resume, config)."""
    folder = tmp_path_factory.mktemp("resume")
    model = train_tiny(tiny_data, tasks=TINY_TASKS[:1])
    config = TrainConfig(**{**TINY_CONFIG, "epochs": 3, "finetune_epochs": 2, "seed": 5})
    resume = folder / "model.safetensors.resume"
    with pytest.raises(KeyboardInterrupt):
        add_task(model, "beta", tiny_data["beta"], config, _StopAtEpoch(3), resume, "sha")
    assert resume.exists()
    return model, resume, config


def _resume_parts(resume: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(resume), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k).clone() for k in f.keys()}


def test_second_task_resumes_bit_identically(second_task, tiny_data, tmp_path):
    """In process, task 2 (earlier weights frozen): interrupted and resumed equals uninterrupted."""
    model, resume, config = second_task
    copy = tmp_path / resume.name
    shutil.copy(resume, copy)
    resumed = add_task(model, "beta", tiny_data["beta"], config, None, copy, "sha")
    straight = add_task(model, "beta", tiny_data["beta"], config)
    a, b = resumed.tensors(), straight.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tamper_resume(kind: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    first = "features.0.weight"
    owner = tensors[f"owner/{first}"]
    if kind == "module tensor missing":
        del tensors[f"module/{first}"]
    elif kind == "module tensor wrong shape":
        tensors[f"module/{first}"] = tensors[f"module/{first}"][:1].clone()
    elif kind == "owner mask float":
        tensors[f"owner/{first}"] = owner.float()
    elif kind == "owner reassigns an earlier task's weight":
        owner[owner == 1] = 2
    elif kind == "owner names a later task":
        owner[owner == 2] = 9
    elif kind == "earlier task's weight changed":
        w = tensors[f"module/{first}"]
        w[owner == 1] += 1.0
    elif kind == "best state changes an earlier weight":
        w = tensors[f"best/{first}"]
        w[owner == 1] += 1.0
    elif kind == "frozen batch norm changed":
        tensors["module/features.1.running_mean"] += 1.0
    elif kind == "unknown phase":
        meta["phase"] = "warmup"
    elif kind == "history missing":
        del meta["history"]
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "module tensor missing", "module tensor wrong shape", "owner mask float",
    "owner reassigns an earlier task's weight", "owner names a later task", "earlier task's weight changed",
    "best state changes an earlier weight", "frozen batch norm changed", "unknown phase", "history missing",
])
def test_tampered_resume_file_is_refused(second_task, tiny_data, tmp_path, kind):
    """A resume file that does not fit, or would change what task 1 owns, is an error, not a result."""
    model, resume, config = second_task
    raw, tensors = _resume_parts(resume)
    meta = json.loads(raw["packnet_resume"])
    _tamper_resume(kind, meta, tensors)
    bad = tmp_path / resume.name
    bad.write_bytes(st_save(tensors, metadata={"packnet_resume": json.dumps(meta)}))
    with pytest.raises(PackNetError, match="resume file .* is unusable .*pass restart"):
        add_task(model, "beta", tiny_data["beta"], config, None, bad, "sha")


def test_truncated_resume_file_is_refused(second_task, tiny_data, tmp_path):
    model, resume, config = second_task
    bad = tmp_path / resume.name
    bad.write_bytes(resume.read_bytes()[:1000])
    with pytest.raises(PackNetError, match="resume file .* unreadable"):
        add_task(model, "beta", tiny_data["beta"], config, None, bad, "sha")
