"""bitsandbytes' kernels for its 4-bit layers (NF4/FP4, with or without double quantization).

``bitsandbytes`` runs ``bnb.matmul_4bit`` on the module's canonical weight, what bitsandbytes'
own ``Linear4bit.forward`` runs, on every device bitsandbytes does. ``bnb-cpu`` runs bitsandbytes'
fused AVX512-BF16 GEMV (``torch.ops.bitsandbytes.gemv_4bit``) on a copy of the weight packed once by
bitsandbytes' ``_convert_weight_packed_for_cpu``: the layout its ``Linear4bit`` would repack the
module's own weight into in place, kept here outside the state dict (the module's weight, quant
state and saved bytes stay canonical; the copy costs the 4-bit weight's size once more). The
packing turns the absmax (double quantization resolved) into bfloat16, relative rounding 2**-9:
the same class of rounding as the ``int4-cpu`` kernels' bfloat16 scales, with bfloat16
activations (W4A16 numerics). From :data:`~quantkit.core.torch_kernels.DENSE_ROWS` input rows on
it runs a bfloat16 GEMM on the weight dequantized for the call, as ``int4-cpu`` does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from quantkit.core.capabilities import ShapeLimit
from quantkit.core.hardware import Hardware
from quantkit.core.kernels import Kernel
from quantkit.core.torch_kernels import DENSE_ROWS, dense, dense_matmul

from .backend import BNB_HARDWARE
from .layers import Bnb4bit

BNB_CPU_SHAPE_LIMITS = (
    ShapeLimit("out_features", 32, "bitsandbytes' CPU packing takes output channels in blocks of 32"),
    ShapeLimit("in_features", 2, "bitsandbytes' CPU packing puts two inputs in a byte"),
)


def _bnb_matmul(module: Bnb4bit, state: None, x: Tensor) -> Tensor:
    import bitsandbytes as bnb

    if not module.compute_type_is_set:  # bitsandbytes' forward: float32/bfloat16 inputs set it
        module.set_compute_type(x)
        module.compute_type_is_set = True
    activations = x if module.compute_dtype is None else x.to(module.compute_dtype)
    return bnb.matmul_4bit(activations, module.weight, quant_state=module.weight.quant_state).to(x.dtype)


def _prepare_packed(module: Bnb4bit) -> tuple[Tensor, Any]:
    """A packed copy of the weight and quant state (the module's own are left as they are)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    weight = module.weight
    return _convert_weight_packed_for_cpu(weight.data.clone(), copy.deepcopy(weight.quant_state))


def _bnb_cpu_matmul(module: Bnb4bit, state: tuple[Tensor, Any], x: Tensor) -> Tensor:
    if dense(x):
        return dense_matmul(module, x)
    packed, quant_state = state
    product = torch.ops.bitsandbytes.gemv_4bit(
        x.to(torch.bfloat16), packed, quant_state.shape, quant_state.absmax, quant_state.code, quant_state.blocksize
    )
    return product.to(x.dtype)


def _whole_blocks(module: Bnb4bit) -> str:
    """``""`` when each row of the weight holds whole quantization blocks (the packing takes the
    absmax per row), else why not."""
    blocksize = module.weight.quant_state.blocksize
    if module.in_features % blocksize == 0:
        return ""
    return f"bitsandbytes' CPU packing takes whole blocks of {blocksize} inputs a row, not {module.in_features} inputs"


BITSANDBYTES = Kernel(
    name="bitsandbytes",
    layers=(Bnb4bit,),
    devices=BNB_HARDWARE,
    prepare=lambda module: None,
    matmul=_bnb_matmul,
    requires=("bitsandbytes",),
    priority=10,
    description="bitsandbytes' own matmul_4bit on the canonical weight in the layer's compute dtype (its forward)",
)
BNB_CPU = Kernel(
    name="bnb-cpu",
    layers=(Bnb4bit,),
    devices=frozenset({Hardware.CPU}),
    prepare=_prepare_packed,
    matmul=_bnb_cpu_matmul,
    compute_dtype=torch.bfloat16,
    shape_limits=BNB_CPU_SHAPE_LIMITS,
    fits=_whole_blocks,
    requires=("bitsandbytes",),
    cpu_features=("avx512_bf16",),
    priority=20,
    description=(
        "bitsandbytes' AVX512-BF16 gemv_4bit on a copy packed once (bfloat16 absmax and activations, W4A16); "
        f"from {DENSE_ROWS} rows a bfloat16 GEMM on the weight dequantized per call"
    ),
)
