"""HQQ's kernels: torch's int4 CPU kernel for 4-bit layers grouped along their inputs, a compiled
GEMV for the other widths.

An HQQ weight is ``(q - z) * s`` per group with a float zero point ``z``; with axis 1 a group
is ``group_size`` consecutive inputs of one output row, exactly torch's
``_weight_int4pack_mm_for_cpu`` layout ``(q - 8) * scale + zero`` with ``scale = s`` and
``zero = (8 - z) * s``. The codes are unpacked from hqq's 4-bit packing once, at the first
forward. torch's operator takes scales and zeros in bfloat16 (relative rounding 2**-9, so up to
``|8 - z| * s * 2**-9`` on a weight, a 64th of a quantization step) and bfloat16 activations:
W4A16 numerics, as every ``int4-cpu`` kernel. The other widths (1 to 8 bits) and group sizes run
``gemv-inductor`` (:mod:`quantkit.core.inductor_kernels`) on the codes hqq unpacks, the same way.
Axis-0 layers (groups along the outputs) run the dequantize reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantkit.core.capabilities import ShapeLimit
from quantkit.core.inductor_kernels import GroupedGemvState, gemv_inductor_kernel, grouped_gemv_state
from quantkit.core.torch_kernels import INT4_SHAPE_LIMITS, Int4State, int4_cpu_kernel, int4_cuda_kernel, int4_state

from .layers import HQQLayer


def int4_operands(module: HQQLayer) -> tuple[Tensor, Tensor, Tensor]:
    """A 4-bit axis-1 layer's weight as ``(out, in)`` codes and ``(in / group_size, out)`` scales
    and offsets, ``W = (codes - 8) * scale + offset`` (float32, before any rounding)."""
    packed, meta = module.W_q.detach(), module.meta
    out, groups = module.out_features, module.in_features // module.group_size
    codes = torch.cat([packed >> 4, packed & 0x0F]).reshape(out, module.in_features)
    scales = meta["scale"].float().reshape(out, groups).t()
    zeros = meta["zero"].float().reshape(out, groups).t()
    return codes, scales, (8 - zeros) * scales


def _prepare_int4(module: HQQLayer) -> Int4State:
    return int4_state(*int4_operands(module), module.group_size)


def _axis_1(module: HQQLayer) -> str:
    axis = module.meta["axis"]
    return "" if axis == 1 else f"it takes groups along the inputs (axis 1), not axis {axis}"


WHOLE_GROUPS = ShapeLimit(
    "in_features", "group_size", "hqq's groups run across rows unless each row holds whole groups"
)


def _prepare_gemv(module: HQQLayer) -> GroupedGemvState:
    """Codes of any width as hqq unpacks them, centred on ``2**(bits - 1)``; ``W = (q - z) * s``."""
    meta, groups = module.meta, module.in_features // module.group_size
    centre = 1 << (module.bits - 1)
    rows = module.out_features * groups  # 3-bit packing pads the unpacked rows
    codes = module.unpack(dtype=torch.uint8)[:rows].reshape(module.out_features, module.in_features)
    scales = meta["scale"].float().reshape(module.out_features, groups).t()
    zeros = meta["zero"].float().reshape(module.out_features, groups).t()
    return grouped_gemv_state(codes.int() - centre, scales, (centre - zeros) * scales, module.group_size)


INT4_CPU = int4_cpu_kernel(
    HQQLayer,
    prepare=_prepare_int4,
    fits=_axis_1,
    shape_limits=(*INT4_SHAPE_LIMITS, WHOLE_GROUPS),
    description=(
        "torch's _weight_int4pack_mm_for_cpu on HQQ's 4-bit axis-1 codes repacked once (exact but for "
        "bfloat16 scales and offsets); bfloat16 activations (W4A16)"
    ),
)
INT4_CUDA = int4_cuda_kernel(INT4_CPU)
GEMV_INDUCTOR = gemv_inductor_kernel(
    HQQLayer,
    prepare=_prepare_gemv,
    fits=_axis_1,
    shape_limits=(WHOLE_GROUPS,),
    description=(
        "HQQ's axis-1 codes of any width unpacked once as int8, bfloat16 scales and offsets; a dequantize-GEMV "
        "torch.compile generates (float32 activations); the weight dequantized above 4 rows"
    ),
)
