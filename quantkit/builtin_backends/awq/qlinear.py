"""The inference module of AWQ checkpoints: AutoAWQ GEMM/GEMV buffers, run by the registered kernels.

Buffer names, shapes and dtypes are AutoAWQ's ``WQLinear_GEMM`` / ``WQLinear_GEMV`` ones (see
:mod:`quantkit.builtin_backends.awq.packing`), so a state dict of these modules is an AWQ checkpoint. The
forward (:class:`~quantkit.core.dispatch.KernelLinear`) runs the fastest kernel that serves the
layer: torch's int4 CPU kernel for groups of 32 to 256, else the ``dequantize`` reference (unpack,
``F.linear``) on whatever device the buffers are on (CPU, CUDA, ROCm, MPS). A kernel's repacked
weight is kept outside the state dict.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quantkit.core.dispatch import KernelLinear
from quantkit.core.linears import row_blocks
from quantkit.core.torch_kernels import GroupedCodes

from .awq import awq_pseudo_quantize
from .packing import BITS, dequantize_awq, gemv_group_width, pack_awq, pack_awq_gemv, unpack_awq, unpack_awq_gemv

VERSIONS = ("gemm", "gemv")


def awq_buffer_shapes(version: str, in_features: int, out_features: int, group_size: int) -> dict[str, tuple[int, int]]:
    """Shapes of ``qweight``, ``qzeros`` and ``scales`` in the AutoAWQ layout ``version``."""
    n_groups = in_features // group_size
    if version == "gemm":
        return {
            "qweight": (in_features, out_features // 8),
            "qzeros": (n_groups, out_features // 8),
            "scales": (n_groups, out_features),
        }
    width = gemv_group_width(n_groups, group_size)
    return {
        "qweight": (out_features, in_features // 8),
        "qzeros": (out_features, width),
        "scales": (out_features, 8 * width),
    }


class AWQLinear(KernelLinear):
    """A 4-bit linear layer stored as AutoAWQ ``qweight``, ``qzeros``, ``scales`` (+ ``bias``)."""

    bits = BITS

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        version: str = "gemm",
        *,
        bias: bool,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if version not in VERSIONS:
            raise ValueError(f"AWQ version must be one of {VERSIONS}; got {version!r}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.version = group_size, version
        shapes = awq_buffer_shapes(version, in_features, out_features, group_size)
        self.register_buffer("qweight", torch.empty(shapes["qweight"], dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(shapes["qzeros"], dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(shapes["scales"], dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)

    @classmethod
    def empty_like(
        cls, linear: nn.Linear, group_size: int, version: str, device: torch.device | str = "meta"
    ) -> AWQLinear:
        """An unfilled module shaped for ``linear`` (for loading a checkpoint into)."""
        bias = linear.bias
        return cls(
            linear.in_features,
            linear.out_features,
            group_size,
            version,
            bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            device=device,
        )

    @classmethod
    def pack(
        cls, intweight: Tensor, zeros: Tensor, scales: Tensor, bias: Tensor | None, version: str = "gemm"
    ) -> AWQLinear:
        """Pack integer weights ``(out, in)``, zero points and scales ``(n_groups, out)``."""
        out_features, in_features = intweight.shape
        packed = (pack_awq if version == "gemm" else pack_awq_gemv)(intweight, zeros, scales)
        return cls._holding(packed, in_features, out_features, in_features // scales.shape[0], bias, version)

    @classmethod
    def quantize(
        cls, linear: nn.Linear, bits: int, group_size: int, zero_point: bool, version: str = "gemm"
    ) -> AWQLinear:
        """``linear`` quantized with AutoAWQ's quantizer and packed a block of output rows (a multiple
        of 8, :func:`~quantkit.core.linears.row_blocks`) at a time: the integer codes of the whole weight
        are never held."""
        pack = pack_awq if version == "gemm" else pack_awq_gemv
        blocks, n_groups = [], 1
        for rows in row_blocks(linear.weight, multiple=8):
            q = awq_pseudo_quantize(linear.weight[rows], bits, group_size, zero_point)
            blocks.append(pack(q.intweight, q.zeros, q.scales))
            n_groups = q.scales.shape[0]
        dim = 1 if version == "gemm" else 0  # the output dim of every packed tensor
        packed = {name: torch.cat([block[name] for block in blocks], dim) for name in blocks[0]}
        return cls._holding(
            packed, linear.in_features, linear.out_features, linear.in_features // n_groups, linear.bias, version
        )

    @classmethod
    def _holding(
        cls,
        packed: dict[str, Tensor],
        in_features: int,
        out_features: int,
        group_size: int,
        bias: Tensor | None,
        version: str,
    ) -> AWQLinear:
        """A module holding ``packed`` (qweight, qzeros, scales) and a copy of ``bias``."""
        module = cls(
            in_features,
            out_features,
            group_size,
            version,
            bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            device="meta",
        )
        for name, tensor in packed.items():
            setattr(module, name, tensor)
        if bias is not None:
            module.bias = bias.detach().clone()
        return module

    def dequantize(self) -> Tensor:
        """The float32 weight ``(out, in)`` these buffers encode."""
        if self.version == "gemm":
            return dequantize_awq(self.qweight, self.qzeros, self.scales)
        intweight, zeros, scales = self.grouped_codes()
        groups = self.group_index()
        return scales.float()[groups].t() * (intweight - zeros[groups].t())

    def group_index(self) -> Tensor:
        """The group of every input: contiguous runs of ``group_size`` (int64)."""
        return torch.arange(self.in_features, device=self.qweight.device) // self.group_size

    def grouped_codes(self) -> GroupedCodes:
        if self.version == "gemm":
            return GroupedCodes(*unpack_awq(self.qweight, self.qzeros), self.scales)
        return GroupedCodes(*unpack_awq_gemv(self.qweight, self.qzeros, self.scales, self.group_size))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, version={self.version}, bias={self.bias is not None}"
        )
