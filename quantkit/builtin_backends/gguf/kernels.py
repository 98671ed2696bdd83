"""GGUF's kernels: torch's int4 CPU kernel for the types whose blocks are its layout, a compiled
GEMV for the types with 16-input scales, the weight dequantized once for any type (forced only).

Q4_0 (``d * (q - 8)``), Q4_1 (``d * q + m``) and Q4_K (per 32 weights ``d * sc * q - dmin * mn``)
store 4-bit codes with one scale and one offset per 32 inputs: exactly torch's
``_weight_int4pack_mm_for_cpu`` group-32 layout, ``(q - 8) * scale + zero``, with ``zero`` 0,
``m + 8 d`` and ``8 d sc - dmin mn``. The blocks are decoded once, vectorized over the whole
weight, at the first forward; the state dict keeps the ggml bytes. torch's operator takes scales
and zeros in bfloat16 (relative rounding 2**-9) and bfloat16 activations: W4A16 numerics, as for
every ``int4-cpu`` kernel. Q8_0 (int8 codes, one scale per 32 inputs) has no exact torch CPU
kernel of its own (``_weight_int8pack_mm`` takes one scale per output channel, ``_int_mm``
quantizes the activations too); it and the 5-bit types (Q5_0, Q5_1 and Q5_K, one scale and offset
per 32 inputs) run ``int4x2-cpu``: their centred codes split into high and low nibbles, two int4
products summed (:func:`~quantkit.core.torch_kernels.split_int4_state`). The types with 16-input
scales (Q2_K, Q3_K, Q6_K), which no int4 group holds, run ``gemv-inductor``
(:mod:`quantkit.core.inductor_kernels`): their codes, sub-block scales and minimums as int8 codes
with bfloat16 scales and offsets per 16 inputs. ``dequantize-cached`` trades 4 bytes a weight for
speed when the user forces it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from quantkit.core.inductor_kernels import GroupedGemvState, gemv_inductor_kernel, grouped_gemv_state
from quantkit.core.kernels import dequantize_cached_kernel
from quantkit.core.torch_kernels import (
    Int4State,
    SplitInt4State,
    dense,
    int4_cpu_kernel,
    int4_cuda_kernel,
    int4_state,
    split_int4_cpu_kernel,
    split_int4_state,
)

from .qlinear import GGUFLinear
from .quants import (
    SMALL_GROUP_DECODERS,
    _bit4_codes,
    _f16_read,
    _low_nibble_codes,
    _unpack,
    _unpack_k_scales,
    type_size,
)

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
"""The ggml types torch's int4 CPU kernel runs exactly (up to bfloat16 scales)."""
GROUP = 32


def _q4_0(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d = _f16_read(blocks[:, :2])
    return _low_nibble_codes(blocks[:, 2:]), d, torch.zeros_like(d)


def _q4_1(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d, m = _f16_read(blocks[:, :2]), _f16_read(blocks[:, 2:4])
    return _low_nibble_codes(blocks[:, 4:]), d, m + 8 * d


def _k_sub_blocks(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K super-blocks' scale ``d * sc`` and minimum ``dmin * mn`` of each 32-weight
    sub-block, ``(n, 8)`` float32 (``W = d * sc * q - dmin * mn``)."""
    scales, mins = _unpack_k_scales(blocks[:, 4:16])
    return _f16_read(blocks[:, :2]) * scales.float(), _f16_read(blocks[:, 2:4]) * mins.float()


def _q4_k(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d, m = _k_sub_blocks(blocks)
    codes = _unpack(blocks[:, 16:].reshape(-1, 4, 32), 4, 2, 2).reshape(-1, GROUP)
    return codes, d.reshape(-1, 1), (8 * d - m).reshape(-1, 1)


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}


def _q8_0(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d = _f16_read(blocks[:, :2])
    return blocks[:, 2:].contiguous().view(torch.int8).int(), d, torch.zeros_like(d)


def _q5_0(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d = _f16_read(blocks[:, :2])
    codes = _low_nibble_codes(blocks[:, 6:]) | _bit4_codes(blocks[:, 2:6])
    return codes.int() - 16, d, torch.zeros_like(d)


def _q5_1(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d, m = _f16_read(blocks[:, :2]), _f16_read(blocks[:, 2:4])
    codes = _low_nibble_codes(blocks[:, 8:]) | _bit4_codes(blocks[:, 4:8])
    return codes.int() - 16, d, m + 16 * d


def _q5_k(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d, m = _k_sub_blocks(blocks)
    high = _unpack(blocks[:, 16:48], 1, 8, 1)
    low = _unpack(blocks[:, 48:].reshape(-1, 4, 32), 4, 2, 2).reshape(-1, 8, 32)
    codes = (low | (high << 4)).reshape(-1, GROUP).int() - 16
    return codes, d.reshape(-1, 1), (16 * d - m).reshape(-1, 1)


_SPLIT_DECODERS = {"Q8_0": _q8_0, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q5_K": _q5_k}
"""The types ``int4x2-cpu`` runs: ``W = codes * scale + offset`` per 32 inputs, signed codes."""
SPLIT_TYPES = tuple(_SPLIT_DECODERS)


def int4_operands(module: GGUFLinear) -> tuple[Tensor, Tensor, Tensor]:
    """``module``'s weight as ``(out, in)`` codes and ``(in / 32, out)`` scales and offsets, with
    ``W = (codes - 8) * scale + offset`` per 32 inputs (float32, before any rounding); for the
    :data:`SPLIT_TYPES`, ``W = codes * scale + offset`` with signed codes."""
    return _operands(module, _DECODERS | _SPLIT_DECODERS, GROUP)


def _operands(module: GGUFLinear, decoders: dict, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """``module``'s blocks through ``decoders[qtype]``: ``(out, in)`` codes, ``(in / group, out)``
    scales and offsets."""
    blocks = module.weight.detach().contiguous().reshape(-1, type_size(module.qtype))
    codes, scales, offsets = decoders[module.qtype](blocks)
    out, groups = module.out_features, module.in_features // group
    return (
        codes.reshape(out, module.in_features),
        scales.reshape(out, groups).t(),
        offsets.reshape(out, groups).t(),
    )


def dense_bfloat16(module: GGUFLinear, x: Tensor) -> Tensor:
    """Many rows: a bfloat16 GEMM on the weight dequantized straight to bfloat16 for the call (the
    native dequantizers skip the float32 copy)."""
    return F.linear(x.to(torch.bfloat16), module.dequantize(torch.bfloat16)).to(x.dtype)


def many_rows(module: GGUFLinear, x: Tensor) -> Tensor:
    """The GEMV kernels' product above their rows: :func:`dense_bfloat16` where that is faster,
    else ``F.linear`` on the weight dequantized to the activations' dtype."""
    return dense_bfloat16(module, x) if dense(x) else F.linear(x, module.dequantize(x.dtype))


def _prepare_int4(module: GGUFLinear) -> Int4State:
    return int4_state(*int4_operands(module), GROUP)


def _int4_type(module: GGUFLinear) -> str:
    return "" if module.qtype in INT4_TYPES else f"it takes {', '.join(INT4_TYPES)} weights, not {module.qtype}"


INT4_CPU = int4_cpu_kernel(
    GGUFLinear,
    prepare=_prepare_int4,
    fits=_int4_type,
    group_sizes=(GROUP,),
    dense_product=dense_bfloat16,
    description=(
        "torch's _weight_int4pack_mm_for_cpu on Q4_0/Q4_1/Q4_K blocks repacked once (exact but for "
        "bfloat16 scales and offsets); bfloat16 activations (W4A16)"
    ),
)


INT4_CUDA = int4_cuda_kernel(INT4_CPU)


def _prepare_split(module: GGUFLinear) -> SplitInt4State:
    return split_int4_state(*int4_operands(module), GROUP)


def _split_type(module: GGUFLinear) -> str:
    return "" if module.qtype in SPLIT_TYPES else f"it takes {', '.join(SPLIT_TYPES)} weights, not {module.qtype}"


INT4X2_CPU = split_int4_cpu_kernel(
    GGUFLinear,
    prepare=_prepare_split,
    fits=_split_type,
    dense_product=dense_bfloat16,
    description=(
        "Q8_0/Q5_0/Q5_1/Q5_K blocks as two int4 products (high and low nibbles of the centred codes) on "
        "torch's _weight_int4pack_mm_for_cpu, repacked once (exact but for bfloat16 scales and offsets); "
        "bfloat16 activations (W8A16/W5A16)"
    ),
)
GEMV_TYPES = tuple(SMALL_GROUP_DECODERS)
"""The types ``gemv-inductor`` runs: a scale (and an offset) per 16 inputs."""
SMALL_GROUP = 16


def small_group_operands(module: GGUFLinear) -> tuple[Tensor, Tensor, Tensor]:
    """``module``'s weight (a :data:`GEMV_TYPES` type) as ``(out, in)`` signed codes and
    ``(in / 16, out)`` float32 scales and offsets, ``W = codes * scale + offset``."""
    return _operands(module, SMALL_GROUP_DECODERS, SMALL_GROUP)


def _prepare_gemv(module: GGUFLinear) -> GroupedGemvState:
    return grouped_gemv_state(*small_group_operands(module), SMALL_GROUP)


def _gemv_type(module: GGUFLinear) -> str:
    return "" if module.qtype in GEMV_TYPES else f"it takes {', '.join(GEMV_TYPES)} weights, not {module.qtype}"


GEMV_INDUCTOR = gemv_inductor_kernel(
    GGUFLinear,
    prepare=_prepare_gemv,
    fits=_gemv_type,
    many_rows=many_rows,
    description=(
        "Q2_K/Q3_K/Q6_K blocks as int8 codes with bfloat16 scales and offsets per 16 inputs, repacked once; "
        "a dequantize-GEMV torch.compile generates (float32 activations); the weight dequantized above 4 rows"
    ),
)
DEQUANTIZE_CACHED = dequantize_cached_kernel(GGUFLinear)
