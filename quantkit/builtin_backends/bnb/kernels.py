"""bitsandbytes' kernels: for its 4-bit layers (NF4/FP4, with or without double quantization) and
its LLM.int8 layers.

``bitsandbytes`` runs ``bnb.matmul_4bit`` on the module's canonical weight, what bitsandbytes'
own ``Linear4bit.forward`` runs, on every device bitsandbytes does. ``bnb-cpu`` runs bitsandbytes'
fused AVX512-BF16 GEMV (``torch.ops.bitsandbytes.gemv_4bit``) on a copy of the weight packed once by
bitsandbytes' ``_convert_weight_packed_for_cpu``: the layout its ``Linear4bit`` would repack the
module's own weight into in place, kept here outside the state dict (the module's weight, quant
state and saved bytes stay canonical; the copy costs the 4-bit weight's size once more). The
packing turns the absmax (double quantization resolved) into bfloat16, relative rounding 2**-9:
the same class of rounding as the ``int4-cpu`` kernels' bfloat16 scales, with bfloat16
activations (W4A16 numerics). From :data:`~quantkit.core.torch_kernels.DENSE_ROWS` input rows on
it runs a bfloat16 GEMM on the weight dequantized for the call, as ``int4-cpu`` does. With grad
mode on (QLoRA's training steps) it takes bitsandbytes' own ``matmul_4bit`` and its autograd: the
per-call dequantization to float32 and back cost QLoRA 1.2-1.3x the float LoRA step.

LLM.int8 (``Linear8bitLt``) quantizes the activations too: each row to int8 by its absmax, after
setting aside the input columns holding a value at or above the threshold, which stay in float
against the dequantized weight. Both parts multiply the same int8 weight with its row scale, so
they are one product ``a @ W.T`` with ``W = CB * SCB / 127`` and ``a`` the activations as LLM.int8
sees them: the dequantized int8 rows, with the outlier columns' own values
(:func:`llm_int8_activations`, compiled as a graph of its own). ``gemv-inductor`` then multiplies ``a`` in one
compiled pass over the int8 codes (float32 sums where bitsandbytes sums int32: float rounding
apart, the same numbers); above 4 rows the int8 rows (outlier columns zeroed) multiply the int8
weight in int32 through ``torch._int_mm``, and the outlier columns the weight dequantized on them,
bitsandbytes' own computation in float32 where it goes through float16 (slow on a CPU).
``bitsandbytes`` runs ``bnb.matmul`` as ``Linear8bitLt.forward`` does (on the CPU an int8
``torch._int_mm`` GEMM: fast for a prompt, slow for a decode step's single row).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from quantkit.core.capabilities import ShapeLimit
from quantkit.core.hardware import Hardware
from quantkit.core.inductor_kernels import GroupedGemvState, gemv_inductor_kernel, grouped_gemv_state
from quantkit.core.kernels import Kernel
from quantkit.core.torch_kernels import DENSE_ROWS, dense, dense_matmul

from .backend import BNB_HARDWARE
from .layers import Bnb4bit, Bnb8bit, int8_weight

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
    if torch.is_grad_enabled():  # training (QLoRA): bitsandbytes' own product and autograd
        return _bnb_matmul(module, None, x)
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
    differentiable=True,
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
    differentiable=True,
    description=(
        "bitsandbytes' AVX512-BF16 gemv_4bit on a copy packed once (bfloat16 absmax and activations, W4A16); "
        f"from {DENSE_ROWS} rows a bfloat16 GEMM on the weight dequantized per call"
    ),
)


def _int8_rows(x: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """LLM.int8's rows as bitsandbytes' ``int8_vectorwise_quant`` computes them, in float16 from
    ``x``: values at or above ``threshold`` (when positive) set aside, each row scaled by its absmax
    to integers (round half to even, float32). Returns the integers, each row's step
    (``absmax / 127``) and the columns holding a set-aside value (``(1, in)`` bool)."""
    half = x.to(torch.float16)
    outliers = half.abs() >= threshold if threshold > 0 else torch.zeros_like(half, dtype=torch.bool)
    kept = half.masked_fill(outliers, 0)
    row_stats = kept.abs().amax(dim=1, keepdim=True).float()
    return torch.round(kept * (127.0 / row_stats)), row_stats / 127.0, outliers.any(dim=0, keepdim=True)


def llm_int8_activations(x: Tensor, threshold: float) -> Tensor:
    """The float32 activations LLM.int8 multiplies by its dequantized weight: each row's int8
    values times its step, and the columns that held a set-aside value with ``x``'s own values."""
    integers, step, columns = _int8_rows(x, threshold)
    return torch.where(columns, x.float(), integers * step)


def _llm_int8_rows(module: Bnb8bit, x: Tensor) -> Tensor:
    """LLM.int8 above :data:`~quantkit.core.inductor_kernels.GEMV_ROWS` rows, bitsandbytes'
    ``int8_mixed_scaled_mm`` in float32 where it computes in float16: the int8 rows (outlier columns
    zeroed) times the int8 weight in int32 (``torch._int_mm``), scaled by the row steps and weight
    scales, plus the outlier columns' own values times the weight dequantized on those columns."""
    codes, weight_scales = int8_weight(module)
    integers, step, columns = _int8_rows(x, float(module.state.threshold))
    int8_rows = integers.masked_fill(columns, 0).to(torch.int8)
    weight_steps = weight_scales.float() / 127.0
    out = torch._int_mm(int8_rows, codes.t()).float() * step * weight_steps
    outlier_columns = columns.view(-1).nonzero().view(-1)
    if outlier_columns.numel():
        dequantized = codes.index_select(1, outlier_columns).float() * weight_steps.unsqueeze(1)
        out.addmm_(x.index_select(1, outlier_columns).float(), dequantized.t())
    return out.to(x.dtype)


@dataclass(frozen=True)
class Int8Activations:
    """:func:`llm_int8_activations` at one threshold, as a ``gemv-inductor`` prologue (equal
    thresholds share compiled code)."""

    threshold: float

    def __call__(self, x: Tensor) -> Tensor:
        return llm_int8_activations(x, self.threshold)


def _bitsandbytes_int8(module: Bnb8bit, x: Tensor) -> Tensor:
    """``Linear8bitLt.forward`` without the bias (the dispatch adds it)."""
    import bitsandbytes as bnb

    module.state.is_training = module.training
    if module.weight.CB is not None:
        module.init_8bit_state()
    out = bnb.matmul(x, module.weight, state=module.state)
    if not module.state.has_fp16_weights and module.state.CB is not None:
        module.weight.data = module.state.CB
    return out


def _prepare_llm_int8(module: Bnb8bit) -> GroupedGemvState:
    codes, row_scales = int8_weight(module)
    scales = (row_scales.float() / 127.0).view(1, -1)
    return grouped_gemv_state(
        codes,
        scales,
        torch.zeros_like(scales),
        module.in_features,
        prologue=Int8Activations(float(module.state.threshold)),
        scale_dtype=torch.float32,
    )


BITSANDBYTES_INT8 = Kernel(
    name="bitsandbytes",
    layers=(Bnb8bit,),
    devices=BNB_HARDWARE,
    prepare=lambda module: None,
    matmul=lambda module, state, x: _bitsandbytes_int8(module, x),
    activation_bits=8,
    requires=("bitsandbytes",),
    priority=10,
    description="bitsandbytes' own LLM.int8 matmul (int8 activations, outlier columns in float): its forward",
    differentiable=True,
)
GEMV_INDUCTOR_INT8 = gemv_inductor_kernel(
    Bnb8bit,
    prepare=_prepare_llm_int8,
    fits=None,
    many_rows=_llm_int8_rows,
    activation_bits=8,
    description=(
        "LLM.int8: the activations quantized per row as bitsandbytes does, outlier columns kept, then one "
        "compiled GEMV over the int8 codes (float32 row scales and sums); above 4 rows an int32 GEMM of the "
        "int8 rows (torch._int_mm) and a float32 product of the outlier columns"
    ),
)
