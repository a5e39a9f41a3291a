"""Killed or interrupted training: the checkpoint survives, and the run resumes bit-identically.

One run of ``packnet add-task`` updating its checkpoint in place is stopped three times:
SIGKILL (no chance to clean up), Ctrl-C (SIGINT) and SIGTERM, each after an epoch was saved.
Meanwhile the same command runs uninterrupted to another file. The stopped run, finished by
running the same command again, must end with bit-identical tensors and the same metadata.
"""

from __future__ import annotations

import signal

from conftest import TINY_ARCH, make_image_folder
from faults import assert_same_checkpoint, file_state, finish, packnet, wait_for

from packnet_export import checkpoint
from packnet_export.checkpoint import PackNet
from packnet_export.training import resume_path_for


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
