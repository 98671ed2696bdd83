"""C++ sources compiled at their first use, for CPUs with the instruction sets they name.

A backend declares its source as a :class:`NativeExtension`; ``torch.utils.cpp_extension`` builds it
once per source version (tens of seconds) and caches it on disk. Machines without the CPU features
or the toolchain, or where the build fails (logged once), get ``available() == False`` and the
backend's torch path.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType

from torch.utils import cpp_extension

from .errors import QuantkitError
from .hardware import cpu_features
from .inductor_kernels import CXX

logger = logging.getLogger(__name__)

PROGRAMS = (CXX, "ninja")
"""What ``torch.utils.cpp_extension`` builds with."""


@dataclass(frozen=True)
class NativeExtension:
    """One C++ source compiled into a Python module."""

    name: str
    """The module's name (also its build folder's)."""
    source: Path
    cpu_features: tuple[str, ...]
    """The ``/proc/cpuinfo`` flags the compiled code uses."""
    flags: tuple[str, ...]
    """Compiler flags (the instruction sets of :attr:`cpu_features` among them)."""
    fallback: str
    """What serves where the code does not run, for the log."""

    def module(self) -> ModuleType:
        """The compiled module (built at the first call; a failed build raises :class:`QuantkitError`)."""
        return _build(self)

    def supported(self) -> bool:
        """Whether this machine has :attr:`cpu_features` and the toolchain (:data:`PROGRAMS`),
        without building anything: what a prediction asks."""
        return set(self.cpu_features) <= cpu_features() and all(shutil.which(p) for p in PROGRAMS)

    def available(self) -> bool:
        """Whether this machine runs the code: it is :meth:`supported` and the source builds."""
        return _available(self)


@cache
def _build(extension: NativeExtension) -> ModuleType:
    try:
        return cpp_extension.load(extension.name, [str(extension.source)], extra_cflags=list(extension.flags))
    except (RuntimeError, OSError) as error:
        raise QuantkitError(f"building quantkit's native code {extension.source.name} failed: {error}") from error


@cache
def _available(extension: NativeExtension) -> bool:
    if not extension.supported():
        return False
    try:
        _build(extension)
    except QuantkitError as error:
        logger.warning("%s; %s", error, extension.fallback)
        return False
    return True
