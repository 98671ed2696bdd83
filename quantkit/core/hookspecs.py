"""The hooks a quantkit plugin can implement.

A plugin is a module (or object) with functions decorated by
``quantkit.hookimpl``, announced through the ``quantkit`` entry-point group::

    [project.entry-points.quantkit]
    mybackend = "my_package.plugin"

quantkit's own backends, datasets and subcommands are plugins of exactly this kind, and
load first. A hook that raises, or a ``register`` call that is refused (a name already
taken), fails the whole plugin: what it registered is dropped and the failure reported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .backend import Backend
    from .commands import Command
    from .kernels import Kernel
    from .text import Dataset

hookspec = pluggy.HookspecMarker("quantkit")
hookimpl = pluggy.HookimplMarker("quantkit")


@hookspec
def quantkit_register_backends(register: Callable[[Backend], None]) -> None:
    """Register quantization backends.

    Call ``register(backend)`` once per :class:`quantkit.Backend` instance. The
    backend's ``config_class`` becomes known to ``quantkit.config_from_dict``.
    Import heavy libraries lazily (inside ``quantize``) so that listing
    backends and reading configs works without them.
    """


@hookspec
def quantkit_register_datasets(register: Callable[[Dataset], None]) -> None:
    """Register calibration/evaluation text sources.

    Call ``register(dataset)`` with a :class:`quantkit.Dataset`;
    its name can then be used wherever a calibration dataset is asked for.
    """


@hookspec
def quantkit_register_commands(register: Callable[[Command], None]) -> None:
    """Register ``quantkit`` subcommands.

    Call ``register(command)`` with a :class:`quantkit.Command`; ``quantkit NAME`` then
    runs it. quantkit's own subcommands are registered through this hook too, first: a
    name they took is refused.
    """


@hookspec
def quantkit_register_kernels(register: Callable[[Kernel], None]) -> None:
    """Register matmul kernels of quantized layers.

    Call ``register(kernel)`` with a :class:`quantkit.Kernel` once per kernel. A name may serve
    several layer classes through several kernels, one per class, but not one class twice. A
    layer deriving from :class:`quantkit.KernelLinear` runs the highest-priority
    registered kernel that can serve it (``"dequantize"``, quantkit's reference, when none
    can). Import optional packages inside ``matmul``, and declare them in ``requires``.
    """
