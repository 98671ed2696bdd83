"""AutoAWQ checkpoint tensors (4-bit), in the GEMM and GEMV layouts transformers and vLLM load.

GEMM (``version="gemm"``), for a linear with ``in_features`` inputs and ``out_features`` outputs:

* ``qweight`` int32 ``(in_features, out_features // 8)``: eight 4-bit weights per word, packed along
  the output dim; nibble ``i`` (bits ``4i .. 4i+3``) of word ``c`` holds output column
  ``8c + AWQ_PACK_ORDER[i]``, the interleave ``[0, 2, 4, 6, 1, 3, 5, 7]`` of AutoAWQ's kernels.
* ``qzeros`` int32 ``(n_groups, out_features // 8)``: zero points, packed and interleaved the same way.
* ``scales`` float16 ``(n_groups, out_features)``.

GEMV (``version="gemv"``): ``qweight`` int32 ``(out_features, in_features // 8)`` packed along the
input dim in plain order; ``qzeros`` int32 ``(out_features, width)`` and ``scales`` float16
``(out_features, 8 * width)``, both per output row and zero-padded to AutoAWQ's group-count ``width``.

Groups are contiguous runs of ``group_size = in_features // n_groups`` inputs; zero points are
stored as they are (no offset), in ``[0, 15]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantkit.core.linears import ROW_BLOCK_ELEMENTS, row_blocks

BITS = 4
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_UNPACK_ORDER = tuple(AWQ_PACK_ORDER.index(column) for column in range(8))
_PLAIN_ORDER = tuple(range(8))


def _check_range(name: str, values: Tensor, low: int, high: int) -> None:
    if values.numel() and (values.min() < low or values.max() > high):
        raise ValueError(f"{name} must lie in [{low}, {high}]; got [{values.min()}, {values.max()}]")


def _pack_last_dim(values: Tensor, order: tuple[int, ...]) -> Tensor:
    """Pack ints ``(..., n)`` in ``[0, 16)`` into int32 ``(..., n // 8)``; nibble i takes value ``order[i]``."""
    if values.shape[-1] % 8:
        raise ValueError(f"cannot pack {values.shape[-1]} 4-bit values into whole 32-bit words")
    flat = values.reshape(-1, values.shape[-1])
    packed = torch.empty(flat.shape[0], flat.shape[1] // 8, dtype=torch.int32, device=values.device)
    shifts = torch.arange(0, 32, BITS, device=values.device)
    for rows in row_blocks(flat):  # int64 words in blocks: 8 bytes per value, never for the whole tensor
        nibbles = flat[rows].to(torch.int64).reshape(-1, packed.shape[1], 8)[..., list(order)]
        words = (nibbles << shifts).sum(-1)
        packed[rows] = torch.where(words >= 2**31, words - 2**32, words)
    return packed.reshape(*values.shape[:-1], -1)


def _unpack_last_dim(packed: Tensor, order: tuple[int, ...], transpose: bool = False) -> Tensor:
    """Inverse of :func:`_pack_last_dim` (``order`` is the inverse permutation): int32 ``(rows, 8 * n)``
    of 2-D ``packed (rows, n)``, or its transpose, unpacked a block of rows at a time (an int32 shift
    sign-extends, the mask keeps the nibble)."""
    rows, words = packed.shape
    out = torch.empty((8 * words, rows) if transpose else (rows, 8 * words), dtype=torch.int32, device=packed.device)
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=packed.device)
    for block in row_blocks(packed, ROW_BLOCK_ELEMENTS // 8):
        nibbles = ((packed[block].unsqueeze(-1) >> shifts) & 0xF)[..., list(order)].reshape(-1, 8 * words)
        if transpose:
            out[:, block] = nibbles.t()
        else:
            out[block] = nibbles
    return out


def _check_layer(intweight: Tensor, zeros: Tensor, scales: Tensor) -> int:
    """Validate GEMM/GEMV inputs; return the group size."""
    out_features, in_features = intweight.shape
    n_groups = scales.shape[0]
    if scales.shape != (n_groups, out_features) or zeros.shape != scales.shape:
        raise ValueError(
            f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be "
            f"(n_groups, out_features={out_features})"
        )
    if n_groups == 0 or in_features % n_groups:
        raise ValueError(f"in_features={in_features} is not split evenly into {n_groups} groups")
    _check_range("intweight", intweight, 0, 2**BITS - 1)
    _check_range("zeros", zeros, 0, 2**BITS - 1)
    return in_features // n_groups


def pack_awq(intweight: Tensor, zeros: Tensor, scales: Tensor) -> dict[str, Tensor]:
    """Pack ``intweight (out, in)``, ``zeros (n_groups, out)`` and ``scales (n_groups, out)`` as AWQ GEMM."""
    _check_layer(intweight, zeros, scales)
    return {
        "qweight": _pack_last_dim(intweight.t(), AWQ_PACK_ORDER),
        "qzeros": _pack_last_dim(zeros, AWQ_PACK_ORDER),
        "scales": scales.to(torch.float16).contiguous(),
    }


def unpack_awq(qweight: Tensor, qzeros: Tensor) -> tuple[Tensor, Tensor]:
    """Unpack AWQ GEMM tensors into int32 ``intweight (out, in)`` and ``zeros (n_groups, out)``."""
    return _unpack_last_dim(qweight, _UNPACK_ORDER, transpose=True), _unpack_last_dim(qzeros, _UNPACK_ORDER)


def dequantize_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> Tensor:
    """Float32 weight ``(out, in)`` of AWQ GEMM tensors: ``scales[g] * (q - zeros[g])``.

    Unpacks straight into the group-broadcast layout (one shift per nibble position, taken in
    AWQ's interleaved order), so the hot path makes no gathers and no repeated scales.
    """
    n_groups, out_features = scales.shape
    shifts = BITS * torch.tensor(_UNPACK_ORDER, dtype=torch.int32, device=qweight.device)
    q = (qweight.unsqueeze(-1) >> shifts).bitwise_and_(0xF).view(n_groups, -1, out_features).float()
    zeros = ((qzeros.unsqueeze(-1) >> shifts) & 0xF).view(n_groups, 1, out_features)
    weight = q.sub_(zeros).mul_(scales.float().view(n_groups, 1, out_features))
    return weight.view(-1, out_features).t()


def gemv_group_width(n_groups: int, group_size: int) -> int:
    """Packed zero-point words per output row in AutoAWQ's GEMV layout (``calculate_zeros_width``)."""
    if group_size not in (32, 64) and group_size < 128:
        raise ValueError(f"the AWQ GEMV layout supports group_size 32, 64 or >= 128; got {group_size}")
    multiple = {32: 4, 64: 2}.get(group_size, 1)
    words = -(-n_groups // 8)
    return -(-words // multiple) * multiple


def pack_awq_gemv(intweight: Tensor, zeros: Tensor, scales: Tensor) -> dict[str, Tensor]:
    """Pack ``intweight (out, in)``, ``zeros (n_groups, out)`` and ``scales (n_groups, out)`` as AWQ GEMV."""
    group_size = _check_layer(intweight, zeros, scales)
    n_groups = scales.shape[0]
    padding = (0, 8 * gemv_group_width(n_groups, group_size) - n_groups)
    return {
        "qweight": _pack_last_dim(intweight, _PLAIN_ORDER),
        "qzeros": _pack_last_dim(torch.nn.functional.pad(zeros.t(), padding), _PLAIN_ORDER),
        "scales": torch.nn.functional.pad(scales.to(torch.float16).t(), padding).contiguous(),
    }


def unpack_awq_gemv(qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Unpack AWQ GEMV tensors into ``intweight (out, in)``, ``zeros`` and ``scales`` ``(n_groups, out)``."""
    intweight = _unpack_last_dim(qweight, _PLAIN_ORDER)
    n_groups = intweight.shape[1] // group_size
    zeros = _unpack_last_dim(qzeros, _PLAIN_ORDER)[:, :n_groups].t().contiguous()
    return intweight, zeros, scales[:, :n_groups].t().contiguous()
