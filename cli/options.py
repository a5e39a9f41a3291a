"""Options every command shares, the fixed choices, and the one map from parameters to flags.

Nothing here imports torch: ``--help`` of every command is built from this module and the
library's light registries (``exporter.formats``, ``choices``).

The library names a bad argument by its Python parameter (``ParameterError.parameter``,
``$name`` in its message); :func:`flag` turns that name into the option the user typed, so
errors and notices read ``--ir-version 7 is too old ...`` here and ``ir_version 7 is too
old ...`` in Python. A new option whose flag is ``--`` + its parameter with dashes needs no
entry; only the exceptions are listed.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

import typer

from packnet_export import choices
from packnet_export.exporter import formats

FLAGS = {
    "model_or_path": "--checkpoint",
    "model": "--checkpoint",
    "out_dir": "--output",
    "formats": "--format",
    "layout": "--multitask-layout",
    "use_pretrained_head": "--pretrained-head",
    "source": "--from",
}
"""Parameter -> flag where the flag is not ``--`` + the parameter with dashes."""


def flag(parameter: str, overrides: dict[str, str] | None = None) -> str:
    """The command-line flag of a library parameter."""
    if overrides and parameter in overrides:
        return overrides[parameter]
    return FLAGS.get(parameter, "--" + parameter.replace("_", "-"))


def choice(name: str, values: Iterable[str]) -> type[Enum]:
    """A str Enum of ``values``: typer lists them in ``--help``, completes them in shells and
    refuses anything else (exit 2). ``.value`` is the string the library takes."""
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


Format = choice("Format", formats.FORMAT_CHOICES)
Layout = choice("Layout", formats.LAYOUTS)
Provider = choice("Provider", formats.PROVIDERS)
Amp = choice("Amp", choices.AMP_MODES)
Resize = choice("Resize", choices.RESIZE_MODES)
Precision = choice("Precision", formats.PRECISIONS)
ActivationType = choice("ActivationType", formats.ACTIVATION_TYPES)
Split = choice("Split", choices.SPLITS)


def json_option() -> bool:
    return typer.Option(False, "--json", help="Print one JSON object.")


def force_option(what: str = "OUTPUT") -> bool:
    return typer.Option(False, "--force", help=f"Overwrite {what} if it exists.")


def provider_option() -> Provider:
    return typer.Option(formats.PROVIDERS[0], "--provider", help="Where onnxruntime runs the check: auto (CUDA "
                        "when it really runs, else CPU with a notice), cuda (fail when unusable) or cpu.")


def data_option(help_text: str):
    return typer.Option(None, "--data", help=help_text)


ARCH_HELP = ("Architecture: vgg_mini, any torchvision classification model by name (resnet18, mobilenet_v2, "
             "mobilenet_v3_small, efficientnet_b0, convnext_tiny, ...), timm/NAME with timm installed, or a network "
             "registered from Python; `packnet init --list-archs` lists them.")
"""The registry itself (``models.ARCHITECTURES``) needs torch, which ``--help`` must not load."""
