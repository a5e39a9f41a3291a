"""Checks of an ImageFolder data folder that must pass before any work starts.

Training reads ``train/`` for hours and ``test/`` only at the end, and an export with
``--data`` validates after it has written its files: a ``test/`` whose classes are not the
training classes, or a split in which no image can be read, must stop the command at once,
with one line naming the classes or the counts, not after the work (or never: a run on zero
readable images "succeeds" with an accuracy of nothing).

Decoded sizes are bounded too. Pillow refuses images above ``Image.MAX_IMAGE_PIXELS``
(89 M pixels by default), but a 1 x 1,000,000 PNG is far below that and still makes the
resize to the network's input allocate gigabytes (the short side is scaled up to the input
size, the long side with it). An image beyond ``MAX_PIXELS`` or ``MAX_ASPECT`` is treated
like an unreadable one: skipped and counted, or refused with ``--strict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

MAX_PIXELS = 40_000_000
"""Largest decoded image accepted (40 M pixels, about 120 MB as RGB bytes)."""
MAX_ASPECT = 20
"""Longest side over shortest side accepted: a wider image resized to the input would be
mostly padding-free stripes of one row, and its allocation grows with the ratio."""


def image_size_problem(size: tuple[int, int]) -> str | None:
    """Why an image of ``size`` (width, height) is refused, or None."""
    width, height = size
    if width < 1 or height < 1:
        return f"{width} x {height} pixels: empty"
    if width * height > MAX_PIXELS:
        return f"{width:,} x {height:,} pixels, more than {MAX_PIXELS:,}"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"{width:,} x {height:,} pixels, an aspect ratio beyond {MAX_ASPECT}:1"
    return None


def readable(path: str | Path) -> bool:
    """Whether ``path`` opens as an image of an accepted size (its header only: cheap)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image_size_problem(image.size) is None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False


def check_some_readable(root: Path, samples: Sequence[tuple[str, int]]) -> None:
    """Refuse a split in which no image can be opened. Stops at the first readable image, so
    a usable folder costs one file header; a broken one is counted in full for the message."""
    if any(readable(path) for path, _ in samples):
        return
    from .errors import PackNetError

    raise PackNetError(f"{root}: none of its {len(samples)} image(s) can be read (all {len(samples)} are "
                       "corrupt, not images, or of a refused size); check the files")


def class_difference(found: Sequence[str], expected: Sequence[str]) -> str:
    """'extra: a, b; missing: c' between two class lists (or the order, when only it differs)."""
    extra = [c for c in found if c not in set(expected)]
    missing = [c for c in expected if c not in set(found)]
    parts = []
    if extra:
        parts.append(f"extra: {_names(extra)}")
    if missing:
        parts.append(f"missing: {_names(missing)}")
    return "; ".join(parts) or "the same names in another order"


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_task_folder(data_dir: str | Path, train_classes: Sequence[str]) -> None:
    """Before training: ``test/``, when present, has exactly the training classes and one
    readable image (the training split's own images are checked when it is loaded)."""
    from .errors import PackNetError

    test = Path(data_dir) / "test"
    if not test.is_dir():
        return
    classes = sorted(p.name for p in test.iterdir() if p.is_dir())
    if classes != list(train_classes):
        raise PackNetError(f"{test} has other classes than {Path(data_dir) / 'train'} "
                           f"({class_difference(classes, train_classes)}); both need the same class folders")


def check_split_classes(root: str | Path, found: Sequence[str], expected: Sequence[str], task: str) -> None:
    """The classes of a split given for evaluation are the task's, in the same order."""
    from .errors import PackNetError

    if list(found) != list(expected):
        raise PackNetError(f"{root} has other classes than task {task!r} ({class_difference(found, expected)}); "
                           "give the task's own data")
