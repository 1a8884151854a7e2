"""System calls that ``os`` lacks, and failed calls as the tests compare them.

``renameat2`` and ``linkat_fd`` go through ctypes and raise OSError as ``os``
functions do (``check`` turns any libc call's -1 into one).  A failed call is
told by the name of its errno ("ENOENT"), so that the answers of two
filesystems print readably side by side:

* ``errno_name(error)``: the name of an OSError's errno;
* ``attempt(action)``: ``("ok", value)`` or ``("err", errno name)``;
* ``outcome(action)``: the value, or the errno name if it failed;
* ``errno_of(action)``: the errno number if it failed, else None.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from typing import Any

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

Result = tuple[str, Any]  # what ``attempt`` returns

libc = ctypes.CDLL(None, use_errno=True)
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
libc.linkat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]


def check(result: int, *filenames: str | bytes) -> int:
    """A libc call's result; -1 raises OSError with the call's errno."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), *filenames)
    return result


def renameat2(old: str | bytes, new: str | bytes, flags: int) -> None:
    """renameat2(2) relative to the working directory."""
    check(libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags))


def linkat_fd(fd: int, new: str | bytes) -> None:
    """linkat(fd, "", AT_FDCWD, new, AT_EMPTY_PATH): a new name for an open file."""
    check(libc.linkat(fd, b"", AT_FDCWD, os.fsencode(new), AT_EMPTY_PATH))


def errno_name(error: OSError) -> str:
    """"ENOENT" and the like; the error's repr if it carries no errno."""
    return errno.errorcode.get(error.errno, str(error.errno)) if error.errno else repr(error)


def attempt(action: Callable[[], Any]) -> Result:
    """``("ok", what action returned)`` or ``("err", the errno name)``."""
    try:
        return ("ok", action())
    except OSError as error:
        return ("err", errno_name(error))


def outcome(action: Callable[[], Any]) -> Any:
    """What ``action`` returned, or the name of the errno it failed with."""
    try:
        return action()
    except OSError as error:
        return errno_name(error)


def errno_of(action: Callable[[], object]) -> int | None:
    """The errno ``action`` failed with, or None if it succeeded."""
    try:
        action()
    except OSError as error:
        return error.errno
    return None
