"""Time of PackNet's own per-step work alone: putting back the weights the task does not own
after each optimizer step (``_TaskTrainer._restore_frozen``). Weight decay and momentum are the
optimizer's, as in plain training, so this is all that PackNet adds to a step.

With ``--channels-last`` it also times the same work with masks and references left in the
default (NCHW) layout while the weights are channels-last, which is what the trainer did
before it laid them out like the weights: elementwise kernels over tensors of different
strides are slower.

    python benchmarks/masking_cost.py --arch vgg_mini --image-size 48 --channels-last
    python benchmarks/masking_cost.py --arch resnet18 --width 0 --image-size 64 --channels-last
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from packnet_export import training  # noqa: E402
from packnet_export.checkpoint import PackNet  # noqa: E402
from packnet_export.training import Observer, TrainConfig, _TaskTrainer  # noqa: E402


def per_step_ms(args: argparse.Namespace, device: torch.device, match_layout: bool = True) -> float:
    arch_kwargs = {"width": args.width} if args.width else {}
    laid_out_like = training._laid_out_like
    if not match_layout:
        training._laid_out_like = lambda param, tensor: tensor
    try:
        trainer = _TaskTrainer(PackNet.create(args.arch, args.image_size, arch_kwargs), 1, 10,
                               TrainConfig(channels_last=args.channels_last, weight_decay=5e-4, device=str(device)),
                               Observer())
        trainer.prune(0.5)
    finally:
        training._laid_out_like = laid_out_like
    for p in trainer.module.parameters():
        p.grad = torch.randn_like(p)  # randn_like keeps the parameter's layout

    def step() -> None:
        trainer._restore_frozen()

    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    start = clock()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (clock() - start) / args.steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="vgg_mini")
    ap.add_argument("--width", type=int, default=16, help="vgg_mini width (0: the architecture's default)")
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                   + (torch.cuda.get_device_name() if device.type == "cuda" else "no GPU"),
        "arch": f"{args.arch} at {args.image_size} px" + (f", width {args.width}" if args.width else ""),
        "clock": "wall" if device.type == "cuda" else "process CPU time",
        "ms_per_step": round(per_step_ms(args, device), 3),
    }
    if args.channels_last:
        result["ms_per_step_nchw_masks"] = round(per_step_ms(args, device, match_layout=False), 3)
        result["speedup_of_matching_layout"] = round(result["ms_per_step_nchw_masks"] / result["ms_per_step"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
