"""ImageFolder data: ``DIR/train/<class>/<image>`` and ``DIR/test/<class>/<image>``.

Images that fail to decode are skipped and counted (the count travels with each batch, so
it survives DataLoader worker processes), or stop the run when ``strict`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

from . import data_checks
from .choices import RESIZE_MODES
from .errors import PackNetError, ParameterError
from .files import existing_folder

IMAGE_EXTENSIONS = datasets.folder.IMG_EXTENSIONS


class CorruptImage(ParameterError):
    """An image that does not decode, met with ``strict`` set (``$strict`` names the option)."""

    def __init__(self, message: str) -> None:
        super().__init__("strict", message)

    def __reduce__(self):  # rebuilt from its one argument (ParameterError.__reduce__ passes two)
        return type(self), (self.template,)


def _resize(image_size: int, resize: str) -> list:
    """``crop``: the shorter side to 8/7 of the input size (the crop comes next); ``squash``: the
    whole image to a square, aspect ratio ignored, as the official code feeds pre-cropped data
    sets (``train_loader_cropped``: ``Scale((224, 224))``, no crop), so no part of the object is cut."""
    if resize not in RESIZE_MODES:
        raise PackNetError(f"resize must be one of {', '.join(RESIZE_MODES)}, not {resize!r}")
    if resize == "squash":
        return [transforms.Resize((image_size, image_size))]
    return [transforms.Resize(round(image_size * 8 / 7))]


def train_transform(image_size: int, mean, std, resize: str = "crop") -> transforms.Compose:
    """``crop``: resize to 8/7 of the input size, random crop and flip, the usual fine-grained
    recipe; ``squash``: resize the whole image to the input size and flip (no crop)."""
    crop = [transforms.RandomCrop(image_size)] if resize == "crop" else []
    return transforms.Compose([
        *_resize(image_size, resize),
        *crop,
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def eval_transform(image_size: int, mean, std, resize: str = "crop") -> transforms.Compose:
    """``crop``: resize to 8/7 and take the centre; ``squash``: resize the whole image."""
    crop = [transforms.CenterCrop(image_size)] if resize == "crop" else []
    return transforms.Compose([
        *_resize(image_size, resize),
        *crop,
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


class ImageFolderSplit(Dataset):
    """One split of an ImageFolder tree; a bad image yields ``None`` instead of an exception."""

    def __init__(self, root: Path, transform, strict: bool = False) -> None:
        self.root = root
        self.transform = transform
        self.strict = strict
        try:
            folder = datasets.ImageFolder(str(root), allow_empty=False)
        except FileNotFoundError as exc:
            text = str(exc)
            if "Couldn't find any class folder" in text:
                raise PackNetError(f"{root} has no class folders; expected {root}/<class>/<image>") from None
            if "Found no valid file" in text:
                raise PackNetError(
                    f"{root}: {text.split('Supported extensions')[0].strip().rstrip('.')}; "
                    "put images in every class folder or remove the empty ones"
                ) from None
            raise PackNetError(f"{root}: {text}") from None
        self.classes: list[str] = folder.classes
        self.samples: list[tuple[str, int]] = folder.samples
        self.targets = [t for _, t in self.samples]
        data_checks.check_some_readable(root, self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                image = Image.open(f)
                problem = data_checks.image_size_problem(image.size)  # from the header, before decoding
                if problem is None:
                    image = image.convert("RGB")
        except Image.DecompressionBombError as exc:
            problem = f"image {path} is too large to decode ({str(exc).split(',')[0]})"
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            problem = f"cannot decode image {path} ({exc.__class__.__name__})"
        else:
            if problem is not None:
                problem = f"image {path} is {problem}"
        if problem is not None:
            if self.strict:
                raise CorruptImage(f"{problem}; remove it, or drop $strict to skip bad images")
            return None, target
        return self.transform(image), target


def collate_skipping(batch):
    """Stack the good samples; report how many were skipped as the third element."""
    good = [(x, y) for x, y in batch if x is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    xs, ys = zip(*good)
    return torch.stack(xs), torch.tensor(ys), skipped


def write_synthetic_image_folder(root: str | Path, classes: int, per_class: int = 8, test_per_class: int = 3,
                                 size: int = 20, seed: int = 0, noise: float = 25.0, suffix: str = ".png") -> Path:
    """An ImageFolder tree of coloured noise, one colour per class, so a tiny network can learn it.

    For smoke tests, benchmarks and trying the commands without a real data set.
    """
    import numpy as np

    root = Path(root)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 255, size=(classes, 3))  # one per class, shared by train/ and test/
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes if n else 0):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(colours[c] + rng.normal(0, noise, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i:03d}{suffix}")
    return root


def split_dir(data_dir: str | Path, split: str) -> Path:
    root = existing_folder(data_dir, "data folder")  # a FIFO, a symlink loop or a path too long: one line
    sub = root / split
    if not sub.is_dir():
        raise PackNetError(f"{root} has no {split}/ folder; expected {root}/{split}/<class>/<image>")
    return sub


@dataclass
class TaskData:
    classes: list[str]
    train: Dataset
    val: Dataset | None
    train_eval: Dataset
    """The training images with the evaluation transform (no augmentation)."""


def load_task_data(
    data_dir: str | Path,
    image_size: int,
    mean,
    std,
    val_fraction: float = 0.1,
    seed: int = 0,
    strict: bool = False,
    resize: str = "crop",
) -> TaskData:
    """Training images split into train and validation (for model selection), deterministically."""
    root = split_dir(data_dir, "train")
    aug = ImageFolderSplit(root, train_transform(image_size, mean, std, resize), strict)
    data_checks.check_task_folder(data_dir, aug.classes)  # test/ is read at the end: check it now
    if (Path(data_dir) / "test").is_dir():
        ImageFolderSplit(Path(data_dir) / "test", None)  # refuses a test/ without one readable image
    plain = ImageFolderSplit(root, eval_transform(image_size, mean, std, resize), strict)
    n = len(aug)
    n_val = int(round(val_fraction * n)) if val_fraction > 0 else 0
    if n_val and n - n_val < 1:
        raise ParameterError("val_fraction", f"{root} has too few images ({n}) for a validation split; use "
                             "$val_fraction 0")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    return TaskData(
        classes=aug.classes,
        train=Subset(aug, train_idx) if n_val else aug,
        val=Subset(plain, val_idx) if n_val else None,
        train_eval=Subset(plain, train_idx) if n_val else plain,
    )


def load_split(data_dir: str | Path, split: str, image_size: int, mean, std, strict: bool = False,
               resize: str = "crop") -> ImageFolderSplit:
    return ImageFolderSplit(split_dir(data_dir, split), eval_transform(image_size, mean, std, resize), strict)


def loader(dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int = 0,
           generator: torch.Generator | None = None, pin_memory: bool = False) -> DataLoader:
    """Batches of (images, labels, unreadable-image count); training uses ``distributed.train_loader``."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      collate_fn=collate_skipping, generator=generator, pin_memory=pin_memory)
