"""quantkit's native CPU code for ggml blocks (:file:`native.cpp`), compiled at the first use.

x86 CPUs with AVX512-BF16 (:data:`CPU_FEATURES`) and a C++ toolchain (:data:`PROGRAMS`) get a Q6_K
GEMV (the ``q6k-avx512`` kernel) and dequantizers for the legacy types, Q4_K, Q5_K and Q6_K. These
compute exactly what :func:`.quants.dequantize` computes (the same float32 operations in the same
order), into memory that asks for transparent huge pages (outputs of 2 MiB and more), at 0.20-0.69
ns a weight on 2 cores, 5.6-21.8x faster (``benchmarks/results/gguf_dequantize_speed.txt``): what a
prompt's product on the dequantized weight waits for. ``torch.utils.cpp_extension`` builds the
source once per version (about 20 s) and caches it on disk.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from quantkit.core.native_code import NativeExtension

CPU_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "f16c")
"""The ``/proc/cpuinfo`` flags the compiled code uses."""
FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mf16c")
"""Compiler flags: the instruction sets of :data:`CPU_FEATURES`; no contraction of a product and a sum
into one rounding (the dequantizers round as torch does); OpenMP for torch's ``at::parallel_for``
(resolved against torch's own OpenMP runtime, not linked)."""
NATIVE = NativeExtension(
    "quantkit_ggml_native",
    Path(__file__).with_name("native.cpp"),
    CPU_FEATURES,
    FLAGS,
    fallback="GGUF weights dequantize through torch, Q6_K runs other kernels",
)


def extension() -> ModuleType:
    """The compiled extension (built once per source version, cached by torch on disk)."""
    return NATIVE.module()


def available() -> bool:
    """Whether this machine runs the native code (see :meth:`NativeExtension.available`)."""
    return NATIVE.available()


def dequantize(data: Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """The weights of ``data`` (contiguous CPU bytes of whole ``qtype`` blocks), flat, in float32 or
    bfloat16 (rounded from the float32 values as ``.to(torch.bfloat16)`` does); ``None`` where the
    native code does not serve (another type, dtype or device, or this machine lacks it)."""
    if (
        data.device.type != "cpu"
        or qtype not in DEQUANTIZED_TYPES
        or dtype not in (torch.float32, torch.bfloat16)
        or not available()
    ):
        return None
    return extension().dequantize(data.contiguous().view(torch.uint8).reshape(-1), qtype, dtype == torch.bfloat16)


DEQUANTIZED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
"""The types :func:`dequantize` serves (the extension's own list, checked by a test)."""
