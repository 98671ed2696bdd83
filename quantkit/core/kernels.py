"""Kernels as declared data: what each serves, and the one check of whether it can serve a layer.

A :class:`Kernel` computes ``x @ W.T`` for one kind of quantized linear from the module's stored
buffers. It declares the layer classes it serves, the hardware it runs on, the activation dtypes,
code widths and group sizes it takes, the shapes it needs and the packages it imports, and a
``priority`` (higher: faster, chosen first). ``prepare(module)`` repacks the stored buffers once into
a state the module keeps outside its state dict; ``matmul(module, state, x2d)`` runs it. Whether a
kernel can serve a layer is decided by :func:`check` alone, from those declarations.

:data:`DEQUANTIZE` (dequantize the weight, then ``F.linear``) serves every layer on every device:
the reference the others are measured against and the fallback when none of them fits.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .capabilities import ALL_HARDWARE, Availability, ShapeLimit
from .errors import QuantkitError
from .hardware import Hardware, cpu_features, hardware_of, present_hardware
from .linears import Target

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class KernelUnavailableError(QuantkitError, ValueError):
    """A kernel was forced on a layer it cannot serve; ``reason`` says why, ``valid`` lists those that can."""

    def __init__(self, kernel: str, layer: str, reason: str, valid: list[str]):
        self.kernel, self.layer, self.reason, self.valid = kernel, layer, reason, valid
        super().__init__(
            f"kernel {kernel!r} cannot serve {layer}: {reason}; kernels that can: {', '.join(valid) or '(none)'}"
        )


@dataclass(frozen=True)
class Kernel:
    """One way to compute a quantized linear, declared as data (see the module docstring).

    Layer attributes the declarations read: ``bits`` (with ``bits``), ``group_size`` (with
    ``group_sizes``), ``in_features``/``out_features`` and those two (with ``shape_limits``, whose
    config fields are read from the module). ``fits`` checks what no declaration covers (a layout
    only the tensors show) and returns ``""`` or the reason it does not fit.
    """

    name: str
    layers: tuple[type[nn.Module], ...]
    """The layer classes served (their subclasses too); empty: every kernel-dispatched layer."""
    devices: frozenset[Hardware]
    prepare: Callable[[nn.Module], Any]
    matmul: Callable[[nn.Module, Any, Tensor], Tensor]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    """Activation dtypes taken (the output has the input's dtype)."""
    compute_dtype: torch.dtype | None = None
    """The dtype activations are cast to for the product (``None``: their own)."""
    activation_bits: int | None = None
    """Bits the activations are quantized to for the product (LLM.int8's 8); ``None``: weight-only."""
    bits: tuple[int, ...] = ()
    """Code widths taken; empty: any."""
    group_sizes: tuple[int, ...] = ()
    """Inputs per group taken; empty: any."""
    shape_limits: tuple[ShapeLimit, ...] = ()
    fits: Callable[[nn.Module], str] | None = None
    requires: tuple[str, ...] = ()
    """Importable module names the kernel needs."""
    programs: tuple[str, ...] = ()
    """Programs it needs on ``PATH`` (the C++ compiler torch.compile's CPU code is built with)."""
    cpu_features: tuple[str, ...] = ()
    """CPU instruction-set extensions it needs, named as ``/proc/cpuinfo`` flags (``avx512_bf16``)."""
    priority: int = 0
    description: str = ""
    differentiable: bool = False
    """Its ``matmul`` carries autograd itself (a library's own autograd function): inputs that need
    a gradient go through it as is, not through the dispatch's weight-only backward."""

    @property
    def label(self) -> str:
        """The name with the layers served: ``int4-cpu (GPTQLinear)``."""
        return f"{self.name} ({', '.join(c.__name__ for c in self.layers) or 'every layer'})"

    def serves(self, module: nn.Module) -> bool:
        return not self.layers or isinstance(module, self.layers)

    def missing_requirements(self) -> list[str]:
        """What this machine lacks of the declared packages, programs and CPU features."""
        present = cpu_features()
        return (
            [f"package {name}" for name in self.requires if importlib.util.find_spec(name) is None]
            + [f"program {name}" for name in self.programs if shutil.which(name) is None]
            + [f"CPU feature {name}" for name in self.cpu_features if name not in present]
        )

    def is_available(self) -> Availability:
        """Whether this machine has the kernel's hardware and packages (layers aside)."""
        reasons = [] if self.devices & present_hardware() else [f"no {' or '.join(sorted(self.devices))} device here"]
        missing = self.missing_requirements()
        if missing:
            reasons.append(f"missing {', '.join(missing)}")
        return Availability(not reasons, "; ".join(reasons))

    def to_dict(self) -> dict:
        order = [h.value for h in Hardware]
        availability = self.is_available()
        return {
            "name": self.name,
            "layers": [c.__name__ for c in self.layers],
            "devices": sorted((h.value for h in self.devices), key=order.index),
            "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
            "compute_dtype": str(self.compute_dtype).removeprefix("torch.") if self.compute_dtype else None,
            "bits": list(self.bits),
            "group_sizes": list(self.group_sizes),
            "shape_limits": [str(limit) for limit in self.shape_limits],
            "requires": list(self.requires),
            "programs": list(self.programs),
            "cpu_features": list(self.cpu_features),
            "priority": self.priority,
            "differentiable": self.differentiable,
            "description": self.description,
            "available": availability.ok,
            "reason": availability.reason,
        }


def check(kernel: Kernel, module: nn.Module, device: torch.device | str, dtype: torch.dtype | None) -> Availability:
    """Whether ``kernel`` can serve ``module`` on ``device`` for activations of ``dtype`` (``None``:
    any of the kernel's), from its declarations; falsy with the first reason it cannot."""
    layer = type(module).__name__
    if not kernel.serves(module):
        return Availability(False, f"it serves {', '.join(c.__name__ for c in kernel.layers)}, not {layer}")
    hardware = hardware_of(device)
    if hardware not in kernel.devices:
        return Availability(False, f"it runs on {', '.join(sorted(kernel.devices))}, not {hardware}")
    missing = kernel.missing_requirements()
    if missing:
        return Availability(False, f"missing {', '.join(missing)}")
    if dtype is not None and dtype not in kernel.dtypes:
        return Availability(False, f"it takes {_names(kernel.dtypes)} activations, not {_names((dtype,))}")
    if kernel.bits and module.bits not in kernel.bits:
        return Availability(False, f"it takes {_listing(kernel.bits)}-bit codes, not {module.bits}-bit")
    if kernel.group_sizes and module.group_size not in kernel.group_sizes:
        return Availability(False, f"it takes groups of {_listing(kernel.group_sizes)} inputs, not {module.group_size}")
    for limit in kernel.shape_limits:
        if not limit.holds(module, module):
            where = limit.describe_layer(Target(layer, module, module))
            return Availability(False, f"{limit.rule} ({limit.reason}): {where}")
    reason = kernel.fits(module) if kernel.fits is not None else ""
    return Availability(not reason, reason)


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return _listing(tuple(str(d).removeprefix("torch.") for d in dtypes))


def _listing(values: tuple) -> str:
    return ", ".join(map(str, values[:-1])) + (" or " if len(values) > 1 else "") + str(values[-1])


def _dequantized_matmul(module: nn.Module, state: None, x: Tensor) -> Tensor:
    return F.linear(x, module.dequantize().to(x.dtype))


DEQUANTIZE = Kernel(
    name="dequantize",
    layers=(),
    devices=ALL_HARDWARE,
    prepare=lambda module: None,
    matmul=_dequantized_matmul,
    description="the reference: dequantize the whole weight on every call, then F.linear (nothing cached)",
)
"""The reference kernel of every layer: always valid, lowest priority."""


def _cached_matmul(module: nn.Module, weight: Tensor, x: Tensor) -> Tensor:
    return F.linear(x, weight.to(x.dtype))


def dequantize_cached_kernel(*layers: type[nn.Module]) -> Kernel:
    """The ``dequantize-cached`` kernel for ``layers``: the weight dequantized once to float32 and kept
    (4 bytes a weight beside the stored codes), then ``F.linear``. Never chosen by itself (its
    priority is below :data:`DEQUANTIZE`'s): the user forces it to trade memory for speed."""
    return Kernel(
        name="dequantize-cached",
        layers=layers,
        devices=ALL_HARDWARE,
        prepare=lambda module: module.dequantize(),
        matmul=_cached_matmul,
        priority=-10,
        description="the float32 weight dequantized once and kept (4 bytes a weight more), then F.linear; forced only",
    )
