"""The EETQ linear: int8 codes and float16 scales, a state dict in transformers' ``EetqLinear`` layout.

transformers (``integrations/eetq.py``, ``EetqLinear``) holds ``weight`` int8 ``(in_features,
out_features)`` in EETQ's kernel layout (:mod:`.layout`), ``weight_scales`` float16
``(out_features,)`` and an optional ``bias`` ``(out_features,)``. This module's buffers have
exactly those names, dtypes and shapes, and its state dict is exactly that layout. In memory its
``weight`` holds the codes row-major ``(out_features, in_features)`` (reshaped to the format's
``(in_features, out_features)``), what torch's CPU kernels take; state-dict hooks convert between
the two layouts.

The forward (:class:`~quantkit.core.dispatch.KernelLinear`) runs the kernels of :mod:`.kernels`:
torch's int8 CPU kernels with EETQ's W8A16 numerics, eetq's own ``w8_a16_gemm`` on CUDA when the
package is installed, else the ``dequantize`` reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from quantkit.core.dispatch import KernelLinear
from quantkit.core.errors import ModelFormatError

from .layout import dequantize, pack, quantize, unpack


class EetqLinear(KernelLinear):
    """A linear layer stored as EETQ's int8 ``weight`` and float16 ``weight_scales`` (+ ``bias``)."""

    bits = 8

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
        """The int8 codes ``(out, in)``."""
        return self.weight.view(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ``(out, in)`` weight these codes and scales encode."""
        return dequantize(self.codes(), self.weight_scales, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _save_eetq_layout(module: EetqLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
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
    state_dict[prefix + "weight"] = unpack(weight).reshape(expected)
