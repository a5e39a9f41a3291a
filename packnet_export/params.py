"""Every parameter of every command, checked in one place before any work starts.

The library's entry points (``TrainConfig``, ``PackNet.create``, ``evaluate_task``, the
checkpoint's metadata check) call these functions, so the Python API and the command line
refuse the same values with the same words. A refusal is a ``ParamError``: one line that
names the parameter and its valid range. The command line swaps the library's name for the
option's flag (``lr`` -> ``--lr``, see ``cli.common``), so a user reads the flag they typed.

Why each bound: NaN and infinities poison every weight they touch (a checkpoint that later
refuses to load); negative rates and momenta make PyTorch's optimizer raise; a zero decay
interval divides by zero; a seed beyond 2**63 overflows PyTorch's generator; an input
smaller than the network's pooling chain reduces to nothing; a device PyTorch cannot use
fails deep inside training, after the data were read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from numbers import Integral, Real

from .errors import PackNetError, ParameterError

MAX_IMAGE_SIZE = 4096
"""The same bound as ``models.MAX_IMAGE_SIZE`` (not imported: that module imports torch)."""
MIN_IMAGE_SIZE = 8
"""No architecture here is meaningful below this, whatever its pooling allows."""
MAX_SEED = 2**63 - 1
MAX_NAME_BYTES = 200
"""Task names become file names (``<task>.sparse.onnx.data`` and a temporary name must fit 255 bytes)."""


class ParamError(ParameterError):
    """A parameter outside its valid range; ``param`` is the library's name for it.

    ``template`` names the parameter as ``{param}``; a Python name becomes ``$name`` (so
    the command line prints its flag, ``errors.ParameterError``), any other label (``task
    1's name``, from a checkpoint's metadata) stays as written.
    """

    def __init__(self, param: str, template: str) -> None:
        self.param = param
        shown = f"${param}" if re.fullmatch(r"[a-z][a-z0-9_]*", param) else param
        super().__init__(param, template.replace("{param}", shown))


def shown_value(value: object) -> str:
    """A value as it appears in a one-line message: repr, escaped, at most ~60 characters."""
    text = repr(value)
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= 60 else f"{text[:40]}...{text[-12:]} ({len(text)} characters)"


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "finite"


def real(value: object, param: str, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False) -> float:
    """A finite number within the bounds (open or closed)."""
    requirement = f"a finite number {_range_text(low, high, low_open, high_open)}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ParamError(param, f"{{param}} must be {requirement}; got {shown_value(value)}")
    try:
        x = float(value)
    except OverflowError:  # an int beyond float's range
        x = math.inf
    if (not math.isfinite(x) or (low is not None and (x < low or (low_open and x == low)))
            or (high is not None and (x > high or (high_open and x == high)))):
        raise ParamError(param, f"{{param}} must be {requirement}; got {shown_value(value)}")
    return x


def integer(value: object, param: str, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a bool, not a float) within [low, high]."""
    if low is not None and high is not None:
        requirement = f"an integer from {low:,} to {high:,}"
    elif low is not None:
        requirement = f"an integer >= {low:,}"
    else:
        requirement = "an integer"
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ParamError(param, f"{{param}} must be {requirement}; got {shown_value(value)}")
    n = int(value)
    if (low is not None and n < low) or (high is not None and n > high):
        raise ParamError(param, f"{{param}} must be {requirement}; got {shown_value(value)}")
    return n


def fraction(value: object, param: str, allow_none: bool = False) -> float | None:
    """A fraction in [0, 1): 1 would leave nothing (prune everything, hold out every image)."""
    if value is None and allow_none:
        return None
    return real(value, param, 0.0, 1.0, high_open=True)


def choice(value: object, param: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        from .errors import closest

        hint = closest(value, choices) if isinstance(value, str) and len(value) < 100 else ""
        listed = f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else choices[0]
        raise ParamError(param, f"{{param}} must be {listed}; got {shown_value(value)}{hint}")
    return value  # type: ignore[return-value]


def seed(value: object, param: str = "seed") -> int:
    return integer(value, param, 0, MAX_SEED)


def name(value: object, param: str) -> str:
    """A task name: printable, not empty, usable as a file name on every system."""
    if not isinstance(value, str) or not value.strip():
        raise ParamError(param, f"{{param}} must be a non-empty name; got {shown_value(value)}")
    if not value.isprintable():
        raise ParamError(param, f"{{param}} must not hold control characters; got {shown_value(value)}")
    if value != value.strip() or value in (".", "..") or any(c in value for c in '/\\'):
        raise ParamError(param, "{param} must be usable as a file name (no / or \\, no leading or trailing "
                                f"spaces, not . or ..); got {shown_value(value)}")
    if len(value.encode()) > MAX_NAME_BYTES:
        raise ParamError(param, f"{{param}} must be at most {MAX_NAME_BYTES} bytes long; got "
                                f"{len(value.encode())} bytes")
    return value


DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d{1,4})?|mps")


def device(value: object, param: str = "device") -> str:
    """A device string the installed PyTorch can really use here.

    ``cpu`` always; ``cuda`` and ``cuda:N`` only when PyTorch sees that GPU; ``mps`` only on a
    Mac that has it. ``meta`` (shapes only), ``''`` and anything else are refused.
    """
    import torch  # here, not at the top: the command line imports this module before it needs torch

    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    forms = "cpu, cuda or cuda:N" + (", mps" if mps else "")
    if not isinstance(value, str) or not DEVICE_PATTERN.fullmatch(value):
        raise ParamError(param, f"{{param}} must be {forms}; got {shown_value(value)}")
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ParamError(param, f"{{param}} {value} was asked for, but PyTorch sees no CUDA GPU here; "
                                    "use {param} cpu")
        index = int(value.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise ParamError(param, f"{{param}} {value}: this machine has {count} CUDA GPU(s), cuda:0 to "
                                    f"cuda:{count - 1}")
    if value == "mps" and not mps:
        raise ParamError(param, f"{{param}} must be {forms}; MPS is not available here")
    return value


# ------------------------------------------------------------------ input size
def image_size(value: object, param: str, arch: str, arch_kwargs: dict | None = None) -> int:
    """An input size the architecture runs on, from its minimum to ``MAX_IMAGE_SIZE`` pixels.

    The minimum is derived from the network itself (``models.min_image_size``), so a newly
    registered architecture needs no entry here.
    """
    from . import models

    size = integer(value, param, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    if not models.runs_at(arch, size, arch_kwargs):
        try:
            smallest = models.min_image_size(arch, arch_kwargs)
        except PackNetError:
            smallest = MAX_IMAGE_SIZE + 1
        if smallest <= MAX_IMAGE_SIZE and size < smallest:
            raise ParamError(param, f"{{param}} must be at least {max(smallest, MIN_IMAGE_SIZE)} for {arch} "
                                    f"(smaller inputs vanish in its pooling), at most {MAX_IMAGE_SIZE}; got {size}")
        raise ParamError(param, f"{{param}} {size} is an input size {arch} cannot run at")
    return size


def normalization(values: object, param: str, std: bool = False) -> tuple[float, float, float]:
    """Three finite per-channel values; a std also > 1e-6 (a zero std divides by zero)."""
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ParamError(param, f"{{param}} must be three numbers (R, G, B); got {shown_value(values)}")
    if std:
        return tuple(real(v, param, 1e-6, 1e6) for v in values)  # type: ignore[return-value]
    return tuple(real(v, param, -1e6, 1e6) for v in values)  # type: ignore[return-value]


MAX_WIDTH = 512
"""vgg_mini's base width; 512 is already ~400 M weights (the paper's VGG-16 has 138 M)."""


def arch_kwargs(arch: str, width: object = None) -> dict:
    """The architecture's arguments from the options that set them (``--width`` of vgg_mini)."""
    from . import models

    models.get_arch(arch)  # registered, a plugin's, timm's or torchvision's; else "did you mean"
    if width is None:
        return {}
    if arch != "vgg_mini":
        raise ParamError("width", "{param} applies to vgg_mini only")
    return {"width": integer(width, "width", 1, MAX_WIDTH)}


def eval_options(split: object, batch_size: object, device_name: object, workers: object) -> None:
    """``evaluate_task``'s options (``packnet eval``)."""
    from .training import MAX_BATCH_SIZE, MAX_WORKERS

    choice(split, "split", ("test", "train"))
    integer(batch_size, "batch_size", 1, MAX_BATCH_SIZE)
    device(device_name, "device")
    integer(workers, "workers", 0, MAX_WORKERS)
