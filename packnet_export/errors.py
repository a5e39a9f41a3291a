"""Errors a user can act on.

Every failure caused by the user's input (a path, a name, a file) is a ``PackNetError``:
the command line prints its one-line message and exits with ``exit_code`` (2), never a
traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PackNetError(Exception):
    exit_code = 2


class ValidationFailed(PackNetError):
    """An exported graph does not compute what the PyTorch model computes."""

    exit_code = 1


def closest(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix naming the closest choice, or ''."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""
