"""EETQ's kernels: torch's int8 CPU kernels with EETQ's W8A16 numerics, and eetq's own on CUDA.

On the CPU: int8 weights, bfloat16 activations, float32 accumulation, no activation quantization.
Activations go to bfloat16 (the 16-bit type torch's int8 CPU kernel vectorizes; its float32 and
float16 paths are scalar loops, ~10 ms per input row on a 2048x2048 weight), the codes' products
accumulate in float32 and come out in bfloat16, and the float16 scales multiply them in float32.
Like EETQ's ``w8_a16_gemm``, which switches from its batched GEMV to a CUTLASS GEMM above a few
rows, it takes torch's ``_weight_int8pack_mm`` for up to :data:`GEMV_ROWS` input rows and a bfloat16
GEMM on the codes (exact in bfloat16) above; the module's buffer already holds the codes as both take
them, so nothing is repacked. On CUDA GPUs of :data:`EETQ_CAPABILITIES` with the ``eetq`` package
installed, ``w8_a16_gemm`` runs on the weight repacked once into EETQ's layout (float16 activations).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from quantkit.core.hardware import Hardware
from quantkit.core.kernels import Kernel

from .backend import EETQ_SHAPE_LIMITS
from .layout import pack
from .qlinear import EetqLinear

EETQ_MODULE = "EETQ"
"""The compiled extension the ``eetq`` package installs (``w8_a16_gemm``)."""
EETQ_CAPABILITIES = ((7, 5), (9, 0))
"""The CUDA compute capabilities (from, up to) whose kernel layout :mod:`.layout` writes; EETQ's
preprocessing refuses the others."""
GEMV_ROWS = 16
"""Input rows up to which the CPU kernel takes ``_weight_int8pack_mm`` (a GEMM on the codes above)."""


def _int8_cpu_matmul(module: EetqLinear, state: Tensor, x: Tensor) -> Tensor:
    activations, codes = x.to(torch.bfloat16), module.codes()
    if x.shape[0] <= GEMV_ROWS:
        products = torch.ops.aten._weight_int8pack_mm(activations, codes, state)
    else:
        products = F.linear(activations, codes.to(torch.bfloat16))
    return (products.float() * module.weight_scales.float()).to(x.dtype)


def _capability_fits(module: EetqLinear) -> str:
    low, high = EETQ_CAPABILITIES
    capability = torch.cuda.get_device_capability(module.device)
    if low <= capability < high:
        return ""
    return f"EETQ's layout is that of compute capabilities {low} up to {high}, not {capability}"


def _eetq_matmul(module: EetqLinear, state: Tensor, x: Tensor) -> Tensor:
    from EETQ import w8_a16_gemm  # an optional package: imported only where its kernel runs

    return w8_a16_gemm(x.half(), state, module.weight_scales).to(x.dtype)


INT8_CPU = Kernel(
    name="int8-cpu",
    layers=(EetqLinear,),
    devices=frozenset({Hardware.CPU}),
    prepare=lambda module: torch.ones(module.out_features, dtype=torch.bfloat16),
    matmul=_int8_cpu_matmul,
    compute_dtype=torch.bfloat16,
    bits=(8,),
    priority=10,
    description=(
        f"torch's _weight_int8pack_mm up to {GEMV_ROWS} rows, a bfloat16 GEMM on the codes above; "
        "bfloat16 activations (EETQ's W8A16)"
    ),
)
EETQ_CUDA = Kernel(
    name="eetq",
    layers=(EetqLinear,),
    devices=frozenset({Hardware.CUDA}),
    prepare=lambda module: pack(module.codes()),
    matmul=_eetq_matmul,
    compute_dtype=torch.float16,
    bits=(8,),
    shape_limits=EETQ_SHAPE_LIMITS,
    fits=_capability_fits,
    requires=(EETQ_MODULE,),
    priority=30,
    description="eetq's w8_a16_gemm (CUTLASS) on the weight repacked once into EETQ's layout; float16 activations",
)
