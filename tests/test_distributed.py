"""Training under torchrun: two CPU processes with the gloo backend.

One ``torch.multiprocessing`` launch trains two tasks with DDP and a resumed run; the parent
checks that both ranks end bit-identical, that the result matches one process with twice
the batch, and that earlier tasks are untouched. One ``torchrun`` launch of the CLI checks
that only rank 0 writes and that the file equals what the library computed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO, TINY_ARCH, TINY_CONFIG
from typer.testing import CliRunner

from packnet_export import checkpoint, distributed
from packnet_export.checkpoint import PackNet
from packnet_export.errors import PackNetError
from packnet_export.training import Observer, TrainConfig, add_task

WORLD = 2
BATCH = 4
# val_fraction 0: the last epoch wins, so a near-tie in validation accuracy cannot pick
# different epochs in the runs compared below.
CONFIG = {**TINY_CONFIG, "batch_size": BATCH, "val_fraction": 0.0, "momentum": 0.9, "weight_decay": 0.01}


class _StopAtFinetune(Observer):
    def phase(self, name, epochs, steps):
        if name == "finetune":
            raise KeyboardInterrupt


def _worker(rank: int, init_file: str, data: dict, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    out_dir = Path(out)
    report: dict = {}
    try:
        alpha = add_task(PackNet.create(**TINY_ARCH), "alpha", data["alpha"], TrainConfig(**CONFIG))
        beta = add_task(alpha, "beta", data["beta"], TrainConfig(**CONFIG), source_sha256="s")
        checkpoint.save(alpha, out_dir / f"alpha.{rank}.safetensors")
        alpha_sync_bn = add_task(PackNet.create(**TINY_ARCH), "alpha", data["alpha"],
                                 TrainConfig(**CONFIG, sync_bn=True))
        checkpoint.save(alpha_sync_bn, out_dir / f"alpha-sync-bn.{rank}.safetensors")
        checkpoint.save(beta, out_dir / f"beta.{rank}.safetensors")
        resume = out_dir / "beta.resume"
        try:
            add_task(alpha, "beta", data["beta"], TrainConfig(**CONFIG), _StopAtFinetune(), resume, "s")
        except KeyboardInterrupt:
            report["interrupted"] = True
        report["resume_written"] = resume.exists()
        resumed = add_task(alpha, "beta", data["beta"], TrainConfig(**CONFIG), None, resume, "s")
        checkpoint.save(resumed, out_dir / f"resumed.{rank}.safetensors")
        try:
            distributed.agree(f"checkpoint-{rank}", "checkpoints")
        except PackNetError as exc:
            report["disagreement"] = str(exc)
    finally:
        (out_dir / f"report.{rank}.json").write_text(json.dumps(report))
        distributed.shutdown()


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    data = {k: str(v) for k, v in tiny_data.items()}
    mp.spawn(_worker, args=(str(out / "init"), data, str(out)), nprocs=WORLD, join=True)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path).tensors()


def _assert_identical(a: PackNet, b: PackNet) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"tensors differ: {differ[:5]}"
    assert a.metadata() == b.metadata()


def test_both_ranks_end_with_identical_masks_weights_and_buffers(ddp_run):
    for name in ("alpha", "beta", "resumed"):
        _assert_identical(checkpoint.load(ddp_run / f"{name}.0.safetensors"),
                          checkpoint.load(ddp_run / f"{name}.1.safetensors"))


def test_frozen_weights_and_earlier_logits_survive_a_ddp_trained_task(ddp_run, probe_inputs):
    alpha = checkpoint.load(ddp_run / "alpha.0.safetensors")
    beta = checkpoint.load(ddp_run / "beta.0.safetensors")
    for k, owner in alpha.owners.items():
        kept = owner == 1
        assert torch.equal(beta.shared[k][kept], alpha.shared[k][kept])
        assert torch.equal(beta.owners[k][kept], owner[kept])
    with torch.no_grad():
        assert torch.equal(alpha.task_module(1)(probe_inputs), beta.task_module(1)(probe_inputs))


def test_a_run_interrupted_under_ddp_resumes_to_the_same_result(ddp_run):
    reports = [json.loads((ddp_run / f"report.{r}.json").read_text()) for r in range(WORLD)]
    assert all(r.get("interrupted") and r.get("resume_written") for r in reports)
    _assert_identical(checkpoint.load(ddp_run / "beta.0.safetensors"),
                      checkpoint.load(ddp_run / "resumed.0.safetensors"))


def test_ranks_that_see_different_files_stop_with_the_same_clear_error(ddp_run):
    reports = [json.loads((ddp_run / f"report.{r}.json").read_text()) for r in range(WORLD)]
    assert all("different checkpoints" in r.get("disagreement", "") for r in reports)


def test_two_processes_with_batch_b_match_one_process_with_batch_2b(ddp_run, tiny_data):
    """Task 2 (batch norm frozen, in eval mode) sees the same images, crops and flips in the
    same global batches (see EpochSampler), so the only difference left is float
    reassociation: DDP averages two partial gradient sums where one process sums once. That
    is ~1e-7 relative per step, hence the tolerances: weights within 1e-6 (they are ~0.3),
    epoch losses within 1e-5 relative, owner masks identical but for magnitude near-ties at
    the pruning threshold (allowed on 0.5% of the weights, observed on none).

    Task 1 trains batch norm, whose batch statistics are per rank (b images, not 2b): like a
    change of batch size, that changes the trajectory, so without --sync-bn task 1 is only
    required to learn (the next test holds it to the same tolerances with --sync-bn).
    """
    config = TrainConfig(**{**CONFIG, "batch_size": WORLD * BATCH})
    ddp_alpha = checkpoint.load(ddp_run / "alpha.0.safetensors")
    ddp_beta = checkpoint.load(ddp_run / "beta.0.safetensors")
    one_beta = add_task(ddp_alpha, "beta", tiny_data["beta"], config)

    ddp_hist, one_hist = ddp_beta.tasks[1].training["history"], one_beta.tasks[1].training["history"]
    assert [r["images"] for r in ddp_hist] == [r["images"] for r in one_hist] == [32] * len(one_hist)
    for a, b in zip(ddp_hist, one_hist):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for k in ddp_beta.owners:
        same_owner = ddp_beta.owners[k] == one_beta.owners[k]
        assert same_owner.float().mean() >= 0.995, k
        assert torch.allclose(ddp_beta.shared[k][same_owner], one_beta.shared[k][same_owner], rtol=0, atol=1e-6), k
    for k, v in ddp_beta.task_tensors[1].items():
        assert torch.allclose(v, one_beta.task_tensors[1][k], rtol=0, atol=1e-6), k

    alpha_hist = ddp_alpha.tasks[0].training["history"]
    assert alpha_hist[-1]["loss"] < alpha_hist[0]["loss"]


def _add_task_args(source: Path, output: Path, data: Path) -> list[str]:
    c = CONFIG
    return ["-m", "packnet_export.cli.main", "add-task", str(source), "--name", "beta", "--data", str(data),
            "-o", str(output), "--epochs", str(c["epochs"]), "--finetune-epochs", str(c["finetune_epochs"]),
            "--lr", str(c["lr"]), "--finetune-lr", str(c["finetune_lr"]), "--batch-size", str(BATCH),
            "--val-fraction", "0", "--momentum", str(c["momentum"]), "--weight-decay", str(c["weight_decay"]),
            "--json"]


_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_torchrun_cli_writes_one_checkpoint_equal_to_the_library_result(ddp_run, tiny_data, tmp_path):
    source = tmp_path / "alpha.safetensors"
    source.write_bytes((ddp_run / "alpha.0.safetensors").read_bytes())
    output = tmp_path / "beta.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           *_add_task_args(source, output, tiny_data["beta"])]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # rank 0 alone prints: stdout is exactly one JSON object
    assert result["task"] == "beta" and result["task_number"] == 2
    assert not Path(str(output) + ".resume").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha.safetensors", "beta.safetensors"]
    _assert_identical(checkpoint.load(output), checkpoint.load(ddp_run / "beta.0.safetensors"))


def test_two_nodes_meeting_at_a_c10d_rendezvous_train_like_two_local_processes(ddp_run, tiny_data, tmp_path):
    """The multi-node form of the README (--nnodes 2, c10d rendezvous), both "nodes" on this
    machine: one agent hosts the rendezvous store, the other joins it over TCP."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = tmp_path / "alpha.safetensors"
    source.write_bytes((ddp_run / "alpha.0.safetensors").read_bytes())
    output = tmp_path / "beta.safetensors"
    nodes = []
    for is_host in ("true", "false"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=packnet-test",
               f"--rdzv-conf=is_host={is_host}", *_add_task_args(source, output, tiny_data["beta"])]
        nodes.append(subprocess.Popen(cmd, cwd=tmp_path, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    printed = [out for out, _ in outputs if out.strip()]
    assert len(printed) == 1, "only global rank 0 prints"
    assert json.loads(printed[0])["task"] == "beta"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha.safetensors", "beta.safetensors"]
    _assert_identical(checkpoint.load(output), checkpoint.load(ddp_run / "beta.0.safetensors"))


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "MASTER_ADDR, MASTER_PORT not set"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"},
     "RANK=2 is outside 0..1"),
])
def test_an_inconsistent_launch_stops_with_one_clear_line(monkeypatch, tmp_path, tiny_data, env, message):
    from packnet_export.cli.main import app

    source = tmp_path / "empty.safetensors"
    checkpoint.save(PackNet.create(**TINY_ARCH), source)

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    result = CliRunner().invoke(app, ["add-task", str(source), "--name", "delta", "--data",
                                      str(tiny_data["alpha"]), "-o", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("amp, channels_last", [("fp16", False), ("bf16", True)])
def test_mixed_precision_and_channels_last_keep_frozen_weights_bit_exact(ddp_run, tiny_data, probe_inputs, amp,
                                                                         channels_last):
    """fp16 runs with a GradScaler (also on the CPU): a step skipped for an inf (its first steps
    at scale 2**16 are) moves nothing, and channels-last weights are restored bit for bit."""
    alpha = checkpoint.load(ddp_run / "alpha.0.safetensors")
    config = TrainConfig(**{**CONFIG, "epochs": 1, "amp": amp, "channels_last": channels_last})
    beta = add_task(alpha, "beta", tiny_data["beta"], config)
    for k, owner in alpha.owners.items():
        kept = owner == 1
        assert torch.equal(beta.shared[k][kept], alpha.shared[k][kept]), k
        assert beta.shared[k].is_contiguous()
    with torch.no_grad():
        assert torch.equal(alpha.task_module(1)(probe_inputs), beta.task_module(1)(probe_inputs))
    history = beta.tasks[1].training["history"]
    assert all(r["loss"] == r["loss"] for r in history)  # finite, not NaN


def test_sync_bn_makes_a_first_task_of_2_processes_x_b_match_1_process_x_2b(ddp_run, tiny_data):
    """With --sync-bn the first task (batch norm trained) normalizes over the global batch, so
    2 processes x batch 4 train like 1 process x batch 8, as later tasks do without it. Observed:
    weights within 1e-6 (they are ~0.3; without --sync-bn they differ by up to 1.7), running
    statistics within 4e-6 relative, epoch losses within 4e-6 relative, owner masks identical.
    Tolerances: 5e-6 absolute + 2e-5 relative for tensors, 2e-5 relative for losses."""
    config = TrainConfig(**{**CONFIG, "batch_size": WORLD * BATCH})
    one = add_task(PackNet.create(**TINY_ARCH), "alpha", tiny_data["alpha"], config)
    ddp = checkpoint.load(ddp_run / "alpha-sync-bn.0.safetensors")
    _assert_identical(ddp, checkpoint.load(ddp_run / "alpha-sync-bn.1.safetensors"))

    ddp_hist, one_hist = ddp.tasks[0].training["history"], one.tasks[0].training["history"]
    assert [r["images"] for r in ddp_hist] == [r["images"] for r in one_hist]
    for a, b in zip(ddp_hist, one_hist):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-5)
    for k in one.owners:
        assert (ddp.owners[k] == one.owners[k]).float().mean() >= 0.995, k
    for k in one.shared:  # prunable weights and the shared batch norm (weights, biases, running statistics)
        assert torch.allclose(ddp.shared[k], one.shared[k], rtol=2e-5, atol=5e-6), k
    for k, v in one.task_tensors[0].items():
        assert torch.allclose(ddp.task_tensors[0][k], v, rtol=2e-5, atol=5e-6), k


def _global_bn_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, channels_last, affine in [("nchw", False, True), ("channels_last", True, True),
                                            ("no_affine", False, False)]:
            torch.manual_seed(0)
            x_all = torch.randn(8, 3, 5, 5) * 3 + 2
            upstream = torch.randn(8, 3, 5, 5)
            bn = torch.nn.BatchNorm2d(3, affine=affine)
            if affine:
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.uniform_(-1, 1)
            distributed.use_global_batch_norm(bn)
            x = x_all[rank * 4:(rank + 1) * 4].clone()
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            y = bn(x)
            (y * upstream[rank * 4:(rank + 1) * 4]).sum().backward()
            results[name] = {"y": y.detach().contiguous(), "dx": x.grad.contiguous(),
                             "running_mean": bn.running_mean, "running_var": bn.running_var,
                             **({"dw": bn.weight.grad, "db": bn.bias.grad} if affine else {})}
        torch.save(results, Path(out) / f"bn.{rank}.pt")
    finally:
        distributed.shutdown()


def test_global_batch_norm_equals_batch_norm_over_the_whole_batch(tmp_path):
    """Two processes with 4 images each compute what one BatchNorm2d computes on all 8: outputs,
    input gradients, running statistics, and (summed over the processes, as DDP sums before
    averaging) the weight and bias gradients; NCHW, channels-last and without affine."""
    mp.spawn(_global_bn_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"bn.{r}.pt") for r in range(WORLD)]
    for name in ranks[0]:
        torch.manual_seed(0)
        x_all = (torch.randn(8, 3, 5, 5) * 3 + 2).requires_grad_(True)
        upstream = torch.randn(8, 3, 5, 5)
        bn = torch.nn.BatchNorm2d(3, affine=name != "no_affine")
        if bn.affine:
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-1, 1)
        y = bn(x_all)
        (y * upstream).sum().backward()
        got = {k: torch.cat([r[name][k] for r in ranks]) for k in ("y", "dx")}
        assert torch.allclose(got["y"], y, atol=1e-5), name
        assert torch.allclose(got["dx"], x_all.grad, atol=1e-5), name
        for r in ranks:
            assert torch.allclose(r[name]["running_mean"], bn.running_mean, atol=1e-6), name
            assert torch.allclose(r[name]["running_var"], bn.running_var, atol=1e-6), name
        if bn.affine:
            assert torch.allclose(sum(r[name]["dw"] for r in ranks), bn.weight.grad, atol=1e-4), name
            assert torch.allclose(sum(r[name]["db"] for r in ranks), bn.bias.grad, atol=1e-4), name
