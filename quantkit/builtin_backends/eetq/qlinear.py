"""The EETQ linear: int8 codes and float16 scales, a state dict in transformers' ``EetqLinear`` layout.

transformers (``integrations/eetq.py``, ``EetqLinear``) holds ``weight`` int8 ``(in_features,
out_features)`` in EETQ's kernel layout (:mod:`.layout`), ``weight_scales`` float16
``(out_features,)`` and an optional ``bias`` ``(out_features,)``. This module's buffers have
exactly those names, dtypes and shapes, and its state dict is exactly that layout. In memory its
``weight`` holds the codes row-major ``(out_features, in_features)`` (reshaped to the format's
``(in_features, out_features)``), what torch's CPU kernels take; state-dict hooks convert between
the two layouts.

The CPU forward keeps EETQ's numerics, W8A16: int8 weights, 16-bit activations, float32
accumulation, no activation quantization. Activations go to bfloat16 (the 16-bit type this CPU
kernel vectorizes; its float32 and float16 paths are scalar loops, ~10 ms per input row on a
2048x2048 weight), the codes' products accumulate in float32 and come out in bfloat16, and the
float16 scales multiply them in float32. Like EETQ's ``w8_a16_gemm``, which switches from its
batched GEMV to a CUTLASS GEMM above a few rows, it takes torch's ``_weight_int8pack_mm`` for up
to :data:`GEMV_ROWS` input rows and a bfloat16 GEMM on the codes (exact in bfloat16) above. On
CUDA with the ``eetq`` package installed, :meth:`EetqLinear.use_eetq_kernel` switches the buffer to
EETQ's own layout and kernel (float16 activations); other devices dequantize and call ``F.linear``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from quantkit.core.errors import ModelFormatError

from .layout import dequantize, pack, quantize, unpack

EETQ_MODULE = "EETQ"
"""The compiled extension the ``eetq`` package installs (``w8_a16_gemm``)."""
GEMV_ROWS = 16
"""Input rows up to which the CPU forward takes ``_weight_int8pack_mm`` (a GEMM on the codes above)."""


class EetqLinear(nn.Module):
    """A linear layer stored as EETQ's int8 ``weight`` and float16 ``weight_scales`` (+ ``bias``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.eetq_layout = False
        """Whether ``weight`` holds EETQ's kernel layout (``use_eetq_kernel``) rather than the ``(out, in)`` codes."""
        self.register_buffer("weight", torch.empty(in_features, out_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scales", torch.empty(out_features, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.register_state_dict_post_hook(_save_eetq_layout)
        self.register_load_state_dict_pre_hook(_load_eetq_layout)

    @classmethod
    def empty_like(cls, linear: nn.Linear, device: torch.device | str = "meta") -> EetqLinear:
        """An unfilled module shaped for ``linear`` (for loading a checkpoint into)."""
        bias = linear.bias
        return cls(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            device=device,
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device) -> EetqLinear:
        """``linear`` quantized on ``device``, where the module is."""
        module = cls.empty_like(linear)
        codes, module.weight_scales = quantize(linear.weight.detach().to(device))
        module.weight = codes.reshape(module.in_features, module.out_features)
        if linear.bias is not None:
            module.bias = linear.bias.detach().to(device, copy=True)
        return module

    def codes(self) -> Tensor:
        """The int8 codes ``(out, in)``, whichever layout the module holds."""
        return unpack(self.weight) if self.eetq_layout else self.weight.view(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ``(out, in)`` weight these codes and scales encode."""
        return dequantize(self.codes(), self.weight_scales, dtype)

    def use_eetq_kernel(self) -> None:
        """Hold EETQ's kernel layout and run through ``eetq``'s ``w8_a16_gemm`` (CUDA, ``eetq`` installed)."""
        if not self.eetq_layout:
            self.weight = pack(self.codes())
            self.eetq_layout = True

    def matmul(self, x: Tensor) -> Tensor:
        """``x @ W.T`` for ``x`` ``(m, in)``: EETQ's kernel, the CPU kernels, or the dequantized weight."""
        if self.eetq_layout and x.is_cuda:
            from EETQ import w8_a16_gemm

            return w8_a16_gemm(x.half(), self.weight, self.weight_scales).to(x.dtype)
        if x.device.type != "cpu":
            return F.linear(x, self.dequantize(x.dtype))
        activations, codes = x.to(torch.bfloat16), self.codes()
        if x.shape[0] <= GEMV_ROWS:
            ones = torch.ones(self.out_features, dtype=torch.bfloat16)
            products = torch.ops.aten._weight_int8pack_mm(activations, codes, ones)
        else:
            products = F.linear(activations, codes.to(torch.bfloat16))
        return (products.float() * self.weight_scales.float()).to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        out = _WeightOnlyMatmul.apply(x.reshape(-1, self.in_features), self).reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _WeightOnlyMatmul(torch.autograd.Function):
    """The int8 kernels have no derivative: the input's gradient comes from the dequantized weight."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, module: EetqLinear) -> Tensor:
        ctx.module = module
        return module.matmul(x.contiguous())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad @ ctx.module.dequantize(grad.dtype), None


def _save_eetq_layout(module: EetqLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    if not module.eetq_layout:
        state_dict[prefix + "weight"] = pack(module.codes())


def _load_eetq_layout(module: EetqLinear, state_dict: dict, prefix: str, *_args: Any) -> None:
    """Check the saved ``weight`` against transformers' ``EetqLinear`` and bring it to the module's layout."""
    weight = state_dict.get(prefix + "weight")
    if weight is None:
        return
    expected = (module.in_features, module.out_features)
    if weight.dtype != torch.int8 or tuple(weight.shape) != expected:
        raise ModelFormatError(
            f"{prefix}weight is not an EETQ weight: {weight.dtype} {tuple(weight.shape)}, expected int8 {expected} "
            "(in_features, out_features); the file and its quantization_config disagree on this layer"
        )
    if not module.eetq_layout:
        state_dict[prefix + "weight"] = unpack(weight).reshape(expected)
