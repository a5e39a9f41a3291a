"""Why ``--recompute-bn-stats``: torchvision's mobilenet_v3_small (batch-norm momentum 0.01) trained briefly.

Trains it from scratch on 3,000 cifar10 images of the shared data at 32 px (SGD, lr 0.05,
momentum 0.9, batch 64, 4 epochs) and prints test top-1 (1,000 images) after each epoch with
the running statistics as trained, then after ``training.recompute_bn_stats`` replaced them
by their average over the training images.

    python benchmarks/bn_stats.py [DATA_ROOT]   # default ../shared/data/finegrained-mini

Measured (2-core Xeon VM, torch 2.14.1, 2026-12-01, 48 s): 10.5, 10.0, 10.0, 10.0 % as
trained (chance: 10 classes), 32.3 % recomputed.
"""

from __future__ import annotations

import sys
import time

import torch
import torchvision
from torch.nn import functional
from torchvision import transforms

from packnet_export.training import recompute_bn_stats


def main(data_root: str) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    root = f"{data_root}/cifar10"
    tf = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor(),
                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    train = torchvision.datasets.ImageFolder(f"{root}/train", tf)
    test = torchvision.datasets.ImageFolder(f"{root}/test", tf)
    train = torch.utils.data.Subset(train, torch.randperm(len(train))[:3000].tolist())
    test = torch.utils.data.Subset(test, torch.randperm(len(test))[:1000].tolist())
    batches = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=4e-5)

    def top1() -> float:
        model.eval()
        right = seen = 0
        with torch.no_grad():
            for x, y in torch.utils.data.DataLoader(test, batch_size=256):
                right += (model(x).argmax(1) == y).sum().item()
                seen += len(y)
        return 100 * right / seen

    start = time.time()
    for epoch in range(4):
        model.train()
        for x, y in batches:
            opt.zero_grad()
            loss = functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        print(f"epoch {epoch}: loss {loss.item():.3f}, test top-1 {top1():.1f}% ({time.time() - start:.0f} s)",
              flush=True)
    # the library's loader yields (images, labels, unreadable count)
    recompute_bn_stats(model, [(x, y) for x, y in train], 64)
    print(f"statistics recomputed: test top-1 {top1():.1f}%")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/finegrained-mini")
