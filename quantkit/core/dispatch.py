"""The one forward of quantized linears: the registered kernel chosen for the layer, once.

A layer deriving from :class:`KernelLinear` implements ``dequantize()`` (its float32 ``(out, in)``
weight) and keeps its stored buffers; its forward selects a kernel the first time it sees a device
and activation dtype (the highest-priority one :func:`~quantkit.core.kernels.check` accepts, or
the one :func:`set_kernel` forced), prepares it once and runs it. The prepared state lives in a
plain attribute, never in the state dict; moving the module or loading a state dict into it
drops it. A quantized linear of a third-party class that must stay that class (hqq's
``HQQLinear``, which PEFT wraps) runs the same way once :func:`route_through_kernels` has given
it the same attributes and forward.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .kernels import Kernel, KernelUnavailableError, check
from .registry import get_registry


@dataclass(frozen=True)
class _Choice:
    device: torch.device
    dtype: torch.dtype
    kernel: Kernel
    state: Any


class KernelLinear(nn.Module):
    """Base of the quantized linears whose forward runs through a registered kernel.

    Subclasses set ``in_features``, ``out_features`` and ``bias`` (a buffer or ``None``) and
    implement :meth:`dequantize`; kernels may read more (``bits``, ``group_size``, ...).
    """

    in_features: int
    out_features: int

    def __init__(self) -> None:
        super().__init__()
        self.kernel_request: str | None = None
        """The kernel :func:`set_kernel` forced (``None``: the fastest valid one)."""
        self._choice: _Choice | None = None
        self.register_load_state_dict_post_hook(_reset_after_load)

    def dequantize(self) -> Tensor:
        """The float32 weight ``(out, in)`` the stored buffers encode."""
        raise NotImplementedError(f"{type(self).__name__} does not implement dequantize")

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    @property
    def kernel_name(self) -> str | None:
        """The name of the kernel the last forward ran (``None`` before the first)."""
        return _kernel_name(self)

    def reset_kernel(self) -> None:
        """Forget the chosen kernel and its prepared state (the next forward chooses again)."""
        self._choice = None

    def _apply(self, fn: Callable, recurse: bool = True) -> KernelLinear:
        self.reset_kernel()  # .to(), .cuda(), .half(): the state was prepared from the old buffers
        return super()._apply(fn, recurse)

    def kernel_for(self, device: torch.device, dtype: torch.dtype) -> tuple[Kernel, Any]:
        """The kernel serving inputs on ``device`` of ``dtype`` and its prepared state, chosen and
        prepared the first time."""
        return _kernel_for(self, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return kernel_forward(self, x)


def kernel_forward(module: nn.Module, x: Tensor) -> Tensor:
    """The forward of every kernel-dispatched layer: the chosen kernel's product, plus the bias.
    Only an input that needs a gradient goes through the autograd function: its ~10 us a call on
    the CPU are a third of a decode step's product on a 576x576 int4 layer."""
    kernel, state = _kernel_for(module, x.device, x.dtype)
    rows = x.reshape(-1, module.in_features)
    if x.requires_grad and torch.is_grad_enabled() and not kernel.differentiable:
        out = _WeightOnlyMatmul.apply(rows, module, kernel, state)
    else:
        out = kernel.matmul(module, state, rows.contiguous())
    out = out.reshape(*x.shape[:-1], module.out_features)
    return out if module.bias is None else out + module.bias.to(out.dtype)


class ModuleMethod:
    """``function`` bound to ``module`` through a weak reference, for a module's ``__dict__`` (its
    forward, say): unlike ``partial(function, module)`` it makes no reference cycle, so the module
    is freed as soon as its last reference goes (each quantized module of a streamed run) rather
    than at the cyclic collector's next pass. A deep copy of the module binds the copy."""

    __slots__ = ("function", "module")

    def __init__(self, function: Callable[..., Any], module: nn.Module):
        self.function = function
        self.module = weakref.ref(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.module(), *args, **kwargs)

    def __deepcopy__(self, memo: dict) -> ModuleMethod:
        return ModuleMethod(self.function, copy.deepcopy(self.module(), memo))


def route_through_kernels(module: nn.Module) -> nn.Module:
    """Make ``module``, a quantized linear of a class that is not a :class:`KernelLinear`, run
    through the registered kernels serving it: the attributes a :class:`KernelLinear` keeps
    (``in_features``, ``out_features``, ``bias`` and ``dequantize()`` it must have) and
    :func:`kernel_forward` as its forward. The choice and its prepared state are kept per device
    and dtype; a module whose tensors are replaced later must drop them with
    ``set_kernel(module, None)``."""
    module.kernel_request = None
    module._choice = None
    module.forward = ModuleMethod(kernel_forward, module)
    return module


class _NamedClass(type):
    """Metaclass of :func:`third_party_class`'s stand-ins: instance and subclass checks by name."""

    qualified_name: str

    def __instancecheck__(cls, instance: object) -> bool:
        return cls.__subclasscheck__(type(instance))

    def __subclasscheck__(cls, candidate: type) -> bool:
        return candidate is cls or any(
            f"{c.__module__}.{c.__qualname__}" == cls.qualified_name for c in candidate.__mro__
        )


def third_party_class(qualified_name: str, name: str, doc: str) -> type:
    """A class named ``name`` standing for the third-party layer class ``qualified_name``
    (``"hqq.core.quantize.HQQLinear"``) and its subclasses, without importing its package:
    ``isinstance(module, stand_in)`` holds for them, so kernels can declare it as a layer class."""
    return _NamedClass(name, (), {"qualified_name": qualified_name, "__doc__": doc})


def _dispatched(module: nn.Module) -> bool:
    return isinstance(module, KernelLinear) or "kernel_request" in vars(module)


def chosen_kernel(module: nn.Module) -> Kernel | None:
    """The kernel the last forward of the kernel-dispatched ``module`` ran (``None`` before one)."""
    return None if module._choice is None else module._choice.kernel


def _kernel_name(module: nn.Module) -> str | None:
    kernel = chosen_kernel(module)
    return None if kernel is None else kernel.name


def _device_of(module: nn.Module) -> torch.device:
    return module.device if isinstance(module, KernelLinear) else next(module.parameters()).device


def _kernel_for(module: nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[Kernel, Any]:
    choice = module._choice
    if choice is None or choice.device != device or choice.dtype != dtype:
        kernel = select_kernel(module, device, dtype)
        same = choice is not None and choice.kernel is kernel and choice.device == device
        state = choice.state if same else kernel.prepare(module)
        choice = module._choice = _Choice(device, dtype, kernel, state)
    return choice.kernel, choice.state


def _reset_after_load(module: KernelLinear, incompatible_keys: Any) -> None:
    module.reset_kernel()


class _WeightOnlyMatmul(torch.autograd.Function):
    """Kernels have no derivative: the input's gradient comes from the dequantized weight."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: KernelLinear, kernel: Kernel, state: Any) -> Tensor:
        ctx.module = module
        return kernel.matmul(module, state, x.contiguous())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad @ ctx.module.dequantize().to(grad.dtype), None, None, None


def select_kernel(module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> Kernel:
    """The kernel forced on ``module`` if it can serve it (else :class:`KernelUnavailableError`),
    or the highest-priority registered kernel that can."""
    if module.kernel_request is not None:
        return _forced(module, module.kernel_request, device, dtype, type(module).__name__)
    return next(k for k in get_registry().kernels_for(module) if check(k, module, device, dtype))


def set_kernel(model: nn.Module, name: str | None) -> nn.Module:
    """Force kernel ``name`` on every :class:`KernelLinear` of ``model`` (``None``: choose the
    fastest valid one again), checked on each layer's device first: a name nothing registered
    raises :class:`~quantkit.core.errors.UnknownNameError`, a kernel that cannot serve a layer
    :class:`KernelUnavailableError` naming the layer, the reason and the kernels that can. Layers
    with a forward of their own (AQLM) are left as they are."""
    layers = [(n, m) for n, m in model.named_modules() if _dispatched(m)]
    if name is not None:
        name = get_registry().kernel_name(name)
        for label, module in layers:
            _forced(module, name, _device_of(module), None, f"{label} ({type(module).__name__})" if label else "")
    for _, module in layers:
        module.kernel_request = name
        module._choice = None
    return model


def chosen_kernels(model: nn.Module) -> dict[str, str | None]:
    """Each kernel-dispatched layer of ``model`` -> the kernel its last forward ran."""
    return {n: _kernel_name(m) for n, m in model.named_modules() if _dispatched(m)}


def _forced(module: nn.Module, name: str, device: torch.device, dtype: torch.dtype | None, layer: str) -> Kernel:
    """Kernel ``name`` for ``module``, checked; ``layer`` names the module in the error."""
    registry = get_registry()
    name = registry.kernel_name(name)
    named = [k for k in registry.kernels if k.name == name]
    kernel = next((k for k in named if k.serves(module)), named[0])
    availability = check(kernel, module, device, dtype)
    if not availability:
        valid = [k.name for k in registry.kernels_for(module) if check(k, module, device, dtype)]
        raise KernelUnavailableError(name, f"{layer or type(module).__name__} on {device}", availability.reason, valid)
    return kernel
