"""Handing freed heap memory back to the operating system between the steps of a streamed run.

glibc's ``free`` keeps most freed blocks below its mmap threshold in the process's heap, so the
resident memory of a run that allocates and frees a module's worth of tensors many times grows
past what it holds at once. :func:`release_heap` calls glibc's ``malloc_trim(0)``, which returns
the free pages of every arena; elsewhere (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_heap() -> bool:
    """Return the process's free heap memory to the OS (glibc only); True when some was returned."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
