"""GGUF's kernels: torch's int4 CPU kernel for the types whose blocks are its layout, the weight
dequantized once for the rest (forced only).

Q4_0 (``d * (q - 8)``), Q4_1 (``d * q + m``) and Q4_K (per 32 weights ``d * sc * q - dmin * mn``)
store 4-bit codes with one scale and one offset per 32 inputs: exactly torch's
``_weight_int4pack_mm_for_cpu`` group-32 layout, ``(q - 8) * scale + zero``, with ``zero`` 0,
``m + 8 d`` and ``8 d sc - dmin mn``. The blocks are decoded once, vectorized over the whole
weight, at the first forward; the state dict keeps the ggml bytes. torch's operator takes scales
and zeros in bfloat16 (relative rounding 2**-9) and bfloat16 activations: W4A16 numerics, as for
every ``int4-cpu`` kernel. Q8_0 (int8 codes, one scale per 32 inputs) has no exact torch CPU
kernel: ``_weight_int8pack_mm`` takes one scale per output channel, ``_int_mm`` quantizes the
activations too. It and the other types run the dequantize reference, or ``dequantize-cached``
when the user trades 4 bytes a weight for speed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantkit.core.kernels import dequantize_cached_kernel
from quantkit.core.torch_kernels import Int4State, int4_cpu_kernel, int4_state

from .qlinear import GGUFLinear
from .quants import _f16_read, _low_nibble_codes, _unpack, _unpack_k_scales, type_size

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
"""The ggml types torch's int4 CPU kernel runs exactly (up to bfloat16 scales)."""
GROUP = 32


def _q4_0(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d = _f16_read(blocks[:, :2])
    return _low_nibble_codes(blocks[:, 2:]), d, torch.zeros_like(d)


def _q4_1(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d, m = _f16_read(blocks[:, :2]), _f16_read(blocks[:, 2:4])
    return _low_nibble_codes(blocks[:, 4:]), d, m + 8 * d


def _q4_k(blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    scales, mins = _unpack_k_scales(blocks[:, 4:16])
    d = _f16_read(blocks[:, :2]) * scales.float()
    m = _f16_read(blocks[:, 2:4]) * mins.float()
    codes = _unpack(blocks[:, 16:].reshape(-1, 4, 32), 4, 2, 2).reshape(-1, GROUP)
    return codes, d.reshape(-1, 1), (8 * d - m).reshape(-1, 1)


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}


def int4_operands(module: GGUFLinear) -> tuple[Tensor, Tensor, Tensor]:
    """``module``'s weight as ``(out, in)`` codes and ``(in / 32, out)`` scales and offsets, with
    ``W = (codes - 8) * scale + offset`` per 32 inputs (float32, before any rounding)."""
    blocks = module.weight.detach().contiguous().reshape(-1, type_size(module.qtype))
    codes, scales, offsets = _DECODERS[module.qtype](blocks)
    out, groups = module.out_features, module.in_features // GROUP
    return (
        codes.reshape(out, module.in_features),
        scales.reshape(out, groups).t(),
        offsets.reshape(out, groups).t(),
    )


def _prepare_int4(module: GGUFLinear) -> Int4State:
    return int4_state(*int4_operands(module), GROUP)


def _int4_type(module: GGUFLinear) -> str:
    return "" if module.qtype in INT4_TYPES else f"it takes {', '.join(INT4_TYPES)} weights, not {module.qtype}"


INT4_CPU = int4_cpu_kernel(
    GGUFLinear,
    prepare=_prepare_int4,
    fits=_int4_type,
    group_sizes=(GROUP,),
    description=(
        "torch's _weight_int4pack_mm_for_cpu on Q4_0/Q4_1/Q4_K blocks repacked once (exact but for "
        "bfloat16 scales and offsets); bfloat16 activations (W4A16)"
    ),
)
DEQUANTIZE_CACHED = dequantize_cached_kernel(GGUFLinear)
