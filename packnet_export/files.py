"""Paths checked before anything is opened: special files, symlink loops, names too long.

Opening a FIFO blocks until someone writes to it (a command that "hangs forever"), a device
reads endless zeros or random bytes, and renaming a finished file over ``/dev/null`` (as
root) replaces the device node. So every path a command reads is first ``stat``-ed, which
never opens it, and must be a regular file; every path it writes must name a regular file
or nothing, in a folder that exists, with a name the file system accepts (including the
``.NAME.XXXXXXXX.tmp`` the atomic writer creates first). The errors are one line and name
the parameter, and show a long or strange path shortened and escaped so that the line stays
one line.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
from pathlib import Path

from .errors import PackNetError, ParameterError

SHOWN_PATH_CHARS = 240
"""Longer paths are shortened in messages (the start and the end are kept)."""
TEMP_NAME_EXTRA = len(".") + len(".XXXXXXXX.tmp")
"""What ``checkpoint.atomic_path`` adds to a file's name for its temporary file."""
SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                           "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100_000_000
"""The largest safetensors header read (the safetensors library's own limit)."""


def shown(path: str | os.PathLike) -> str:
    """``path`` as one short printable line: control characters escaped, long paths elided."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = text.decode(errors="backslashreplace")
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    if len(text) > SHOWN_PATH_CHARS:
        keep = SHOWN_PATH_CHARS // 2 - 2
        text = f"{text[:keep]}...{text[-keep:]} ({len(os.fspath(path))} characters)"
    return text


def _error(param: str, message: str) -> PackNetError:
    """``param`` given as ``$name`` is a library parameter: the command line prints its flag."""
    if param.startswith("$"):
        return ParameterError(param[1:], message)
    return PackNetError(message)


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _stat_error(exc: OSError, param: str, path: str | os.PathLike) -> PackNetError:
    where = f"{param} {shown(path)}"
    if exc.errno == errno.ENOENT:
        return _error(param, f"{where} does not exist")
    if exc.errno == errno.ENAMETOOLONG:
        return _error(param, f"{param}: the path is too long for the file system ({shown(path)})")
    if exc.errno == errno.ELOOP:
        return _error(param, f"{where} is a loop of symbolic links")
    if exc.errno == errno.ENOTDIR:
        return _error(param, f"{where}: a part of the path is a file, not a folder")
    if exc.errno == errno.EACCES:
        return _error(param, f"{where}: permission denied")
    return _error(param, f"{where}: {exc.strerror or exc}")


def regular_file(path: str | os.PathLike, param: str) -> Path:
    """``path`` as a ``Path`` if it names an existing regular file (symlinks followed).

    Raises ``PackNetError`` naming ``param`` (``$name``: a library parameter, which the
    command line names by its flag) for a missing file, a folder, a FIFO, a device,
    a socket, a loop of symbolic links or a path too long for the OS. The path is only
    ``stat``-ed, never opened, so a FIFO cannot block the caller.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise _stat_error(exc, param, path) from None
    except ValueError:  # an embedded NUL byte
        raise _error(param, f"{param} {shown(path)} is not a valid path (it holds a NUL character)") from None
    kind = _kind(mode)
    if kind == "a folder":
        raise _error(param, f"{param} {shown(path)} is a folder, not a file")
    if kind is not None:
        raise _error(param, f"{param} {shown(path)} is {kind}, not a regular file")
    return Path(path)


def existing_folder(path: str | os.PathLike, param: str) -> Path:
    """``path`` as a ``Path`` if it names an existing folder (symlinks followed); else one line."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise _stat_error(exc, param, path) from None
    except ValueError:
        raise _error(param, f"{param} {shown(path)} is not a valid path (it holds a NUL character)") from None
    if not stat.S_ISDIR(mode):
        raise _error(param, f"{param} {shown(path)} is {_kind(mode) or 'a file'}, not a folder")
    return Path(path)


def check_safetensors_header(path: Path, fail) -> None:
    """Check a safetensors header against the file's real size before anything is mapped.

    A 10 GB sparse file of zeros, or a header that declares more bytes than the file holds,
    is refused here after reading at most the header: nothing is allocated or mapped by
    what a file *claims*. The file is opened non-blocking and ``fstat``-ed, so a path swapped
    for a FIFO after ``regular_file`` checked it cannot block either. ``fail(what)`` makes
    the caller's error.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise fail(f"unreadable ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise fail("not a regular file")
        size = info.st_size
        head = f.read(8)
        if len(head) < 8:
            raise fail(f"unreadable (only {size} bytes, shorter than a safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > size - 8 or n > MAX_HEADER_BYTES:
            raise fail(f"unreadable (its header claims {n:,} bytes; the file holds {size:,})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise fail("unreadable (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise fail("unreadable (its header is not a JSON object)")
    data_bytes = size - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise fail(f"unreadable (tensor {key!r} has no description)")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            raise fail(f"unreadable (tensor {key!r} has an unknown dtype {str(dtype)[:20]!r})")
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            raise fail(f"unreadable (tensor {key!r} has a malformed shape or data offsets)")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes:
            raise fail(f"unreadable (tensor {key!r} lies outside the file: bytes {begin:,}..{end:,} of {data_bytes:,})")
        if math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype] != end - begin:
            raise fail(f"unreadable (tensor {key!r} declares shape {shape} {dtype} but holds {end - begin:,} bytes)")


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def output_file(path: str | os.PathLike, param: str) -> Path:
    """``path`` as a ``Path`` if a file can be written there by an atomic rename.

    The folder must exist and be a folder; the name (and the temporary name written first)
    must fit the file system; what is there now must be a regular file or nothing, so a
    finished file is never renamed over a device, a FIFO or a folder.
    """
    path = Path(path)
    try:
        os.fspath(path).encode()
    except UnicodeEncodeError:
        raise _error(param, f"{param} {shown(path)} is not a valid path") from None
    if "\0" in os.fspath(path):
        raise _error(param, f"{param} {shown(path)} is not a valid path (it holds a NUL character)")
    folder = path.parent if str(path.parent) else Path(".")
    if not path.name or path.name in (".", ".."):
        raise _error(param, f"{param} {shown(path)} names a folder, not a file")
    try:
        folder_mode = os.stat(folder).st_mode
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise _error(param, f"cannot write {shown(path)}: folder {shown(folder)} does not exist") from None
        raise _stat_error(exc, param, path) from None
    if not stat.S_ISDIR(folder_mode):
        raise _error(param, f"cannot write {shown(path)}: folder {shown(folder)} does not exist (it is a file)")
    limit = _name_max(folder)
    if len(os.fsencode(path.name)) + TEMP_NAME_EXTRA > limit:
        raise _error(param, f"{param}: the file name is too long for the file system ({len(os.fsencode(path.name))} "
                           f"bytes; at most {limit - TEMP_NAME_EXTRA} here): {shown(path)}")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise _stat_error(exc, param, path) from None
    kind = _kind(mode)
    if kind is not None:
        raise _error(param, f"{param} {shown(path)} is {kind}; refusing to replace it with a file")
    return path


def output_folder(path: str | os.PathLike, param: str) -> Path:
    """``path`` as a ``Path`` if it is a folder, or can be created as one (its parents too)."""
    path = Path(path)
    if "\0" in os.fspath(path):
        raise _error(param, f"{param} {shown(path)} is not a valid path (it holds a NUL character)")
    probe = path
    while True:
        try:
            mode = os.stat(probe).st_mode
        except FileNotFoundError:
            if probe.parent == probe:
                return path
            probe = probe.parent
            continue
        except OSError as exc:
            raise _stat_error(exc, param, path) from None
        if not stat.S_ISDIR(mode):
            what = _kind(mode) or "a file"
            raise _error(param, f"{param} {shown(path)}: {shown(probe)} is {what}, not a folder")
        break
    limit = _name_max(probe)
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise _error(param, f"{param}: a folder name is too long for the file system "
                               f"({len(os.fsencode(part))} bytes; at most {limit}): {shown(path)}")
    return path
