"""Errors a user can act on.

Every failure caused by the user's input (a path, a name, a file) is a ``PackNetError``:
the command line prints its one-line message and exits with ``exit_code`` (2), never a
traceback.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable


class PackNetError(Exception):
    exit_code = 2

    def render(self, name: Callable[[str], str] | None = None) -> str:  # noqa: ARG002
        """The message, parameters named by ``name`` (see :class:`ParameterError`)."""
        return str(self)


class ParameterError(PackNetError):
    """A bad value of a parameter, named as the caller knows it.

    ``message`` refers to parameters as ``$name`` (Python names: ``$ir_version``).
    ``str(error)`` prints the Python names, for library users; the command line prints
    its flags instead (``--ir-version``) through :meth:`render`, from one mapping.
    ``parameter`` is the parameter at fault, for programs.
    """

    def __init__(self, parameter: str, message: str) -> None:
        self.parameter = parameter
        self.template = message
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] | None = None) -> str:
        return name_parameters(self.template, name)

    def __reduce__(self):  # pickles with its two arguments (the default passes the rendered text only)
        return type(self), (self.parameter, self.template)


_PARAMETER = re.compile(r"\$([a-z][a-z0-9_]*)")


def name_parameters(text: str, name: Callable[[str], str] | None = None) -> str:
    """``text`` with each ``$parameter`` replaced by ``name(parameter)`` (default: the bare name)."""
    return _PARAMETER.sub(lambda m: (name or str)(m.group(1)), text)


class ValidationFailed(PackNetError):
    """An exported graph does not compute what the PyTorch model computes."""

    exit_code = 1


def closest(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix naming the closest choice, or ''."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""
