"""The inference module of GPTQ checkpoints: GPTQ v1 buffers, run by the registered kernels.

Buffers, names and dtypes are those of auto-gptq's / GPTQModel's ``QuantLinear`` (see
:mod:`quantkit.builtin_backends.gptq.packing`), so a state dict of these modules is a GPTQ checkpoint.
The forward (:class:`~quantkit.core.dispatch.KernelLinear`) runs the fastest kernel that serves
the layer: torch's int4 CPU kernel for 4-bit layers of whole groups of 32 to 256, else the
``dequantize`` reference on every device torch runs on (unpack, rescale, ``F.linear``). A
kernel's repacked weight is kept outside the state dict, which stays exactly what was saved.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from quantkit.core.dispatch import KernelLinear
from quantkit.core.torch_kernels import GroupedCodes

from .packing import dequantize_gptq, unpack_gptq


def gptq_groups(in_features: int, group_size: int) -> int:
    """Number of groups: ``ceil(in / group_size)`` (a ragged last group is allowed), 1 for -1."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


class GPTQLinear(KernelLinear):
    """A linear layer stored as GPTQ v1 ``qweight``, ``qzeros``, ``scales``, ``g_idx`` (+ ``bias``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        n_groups: int,
        *,
        bias: bool,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        int32 = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.empty(in_features * bits // 32, out_features, **int32))
        self.register_buffer("qzeros", torch.empty(n_groups, out_features * bits // 32, **int32))
        self.register_buffer("scales", torch.empty(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.empty(in_features, **int32))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def empty_like(
        cls, linear: nn.Linear, bits: int, group_size: int, device: torch.device | str = "meta"
    ) -> GPTQLinear:
        """An unfilled module shaped for ``linear`` (for loading a checkpoint into)."""
        bias = linear.bias
        return cls(
            linear.in_features,
            linear.out_features,
            bits,
            gptq_groups(linear.in_features, group_size),
            bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            device=device,
        )

    @classmethod
    def from_packed(cls, packed: dict[str, Tensor], bits: int, bias: Tensor | None) -> GPTQLinear:
        """Wrap the output of :func:`quantkit.builtin_backends.gptq.packing.pack_gptq` (and the float bias)."""
        qweight = packed["qweight"]
        module = cls(
            qweight.shape[0] * 32 // bits,
            qweight.shape[1],
            bits,
            packed["scales"].shape[0],
            bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            device="meta",
        )
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            setattr(module, name, packed[name])
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    def dequantize(self) -> Tensor:
        """The float32 weight ``(out, in)`` these buffers encode."""
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)

    @property
    def group_size(self) -> int:
        """Inputs per group: the size of group 0 (that of every group but a ragged last one)."""
        return int(torch.count_nonzero(self.g_idx == 0))

    def group_index(self) -> Tensor:
        """The group of every input (``g_idx``, int64)."""
        return self.g_idx.long()

    def grouped_codes(self) -> GroupedCodes:
        intweight, zeros = unpack_gptq(self.qweight, self.qzeros, self.bits)
        return GroupedCodes(intweight, zeros, self.scales)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"groups={self.scales.shape[0]}, bias={self.bias is not None}"
        )
