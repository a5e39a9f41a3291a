"""What only a GPU can check: training on CUDA keeps earlier tasks bit-identical in every
precision, and exported graphs validate on onnxruntime's CUDA provider.

Skipped where PyTorch sees no CUDA GPU (CI, this project's usual machine); run on a GPU
machine by ``bash benchmarks/gpu_session.sh DIR`` among the rest.
"""

from __future__ import annotations

import onnxruntime as ort
import pytest
import torch
from conftest import TINY_ARCH, TINY_CONFIG

from packnet_export import checkpoint, masks
from packnet_export.checkpoint import PackNet
from packnet_export.exporter import pipeline, validation
from packnet_export.training import TrainConfig, add_task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("amp, channels_last", [("off", False), ("bf16", True), ("fp16", False), ("fp16", True)])
def test_cuda_training_keeps_earlier_tasks_bit_identical(tiny_data, probe_inputs, amp, channels_last):
    config = TrainConfig(**{**TINY_CONFIG, "device": "cuda", "amp": amp, "channels_last": channels_last,
                            "momentum": 0.9, "weight_decay": 0.01})
    alpha = add_task(PackNet.create(**TINY_ARCH), "alpha", tiny_data["alpha"], config)
    beta = add_task(alpha, "beta", tiny_data["beta"], config)
    for k, owner in alpha.owners.items():
        kept = masks.uses(owner, 1)
        assert torch.equal(beta.shared[k][kept].view(torch.int32), alpha.shared[k][kept].view(torch.int32)), k
        assert beta.shared[k].device.type == "cpu" and beta.shared[k].is_contiguous()
    with torch.no_grad():
        assert torch.equal(alpha.task_module(1)(probe_inputs), beta.task_module(1)(probe_inputs))
    assert all(r["loss"] == r["loss"] for r in beta.tasks[1].training["history"])


def test_exports_validate_on_the_cuda_provider(tiny_model, tiny_checkpoint, tmp_path):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    files = pipeline.export(tiny_model, tmp_path, [1, 2], ["dense", "sparse", "multitask"],
                          source_sha256=checkpoint.file_sha256(tiny_checkpoint))
    for f in files:
        report = validation.validate_file(f.path, tiny_model, provider="cuda")
        assert report["provider"] == "CUDAExecutionProvider", f.path
        assert report["passed"], report
