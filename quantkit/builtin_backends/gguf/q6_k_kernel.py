"""``q6k-avx512``: a native GEMV on Q6_K's own block bytes, for x86 CPUs with AVX512-BF16.

Q6_K (6-bit codes, a scale per 16 inputs) is the type llama.cpp's Q4_K_M and Q5_K_M mixes give
the output head, a vocabulary-sized matrix: at batch 1 the largest read of a decode step.
``gemv-inductor`` runs it from int8 codes (1.125 bytes a weight, repacked), at about 30 G weights
a second; this kernel reads the 0.82 bytes a weight as stored, converts the codes to bfloat16
through a table and multiplies them with the activations split into two bfloat16 halves (which
represent a float32 to 2**-17) with ``vdpbf16ps``, accumulating in float32: float32 numerics, at
about twice the speed on the head's shape (``benchmarks/results/kernel_speed_q6_k.txt``). The C++
(:mod:`.native`) is compiled at the first use (about 20 s, then cached on disk). Above
:data:`~quantkit.core.inductor_kernels.GEMV_ROWS` input rows the weight is dequantized for the
call (:func:`.kernels.many_rows`), as for ``gemv-inductor``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantkit.core.hardware import Hardware
from quantkit.core.inductor_kernels import GEMV_ROWS
from quantkit.core.kernels import Kernel
from quantkit.core.native_code import PROGRAMS

from .kernels import many_rows
from .native import CPU_FEATURES, available, extension
from .qlinear import GGUFLinear
from .quants import type_size


def tiled_blocks(blocks: Tensor, out: int, tile_blocks: int) -> Tensor:
    """``(out, n_blocks * 210)`` Q6_K bytes reordered by input tiles of ``tile_blocks`` blocks: every
    row's first tile, then every row's second, ...; the bytes unchanged (no copy) when one tile
    holds the whole row."""
    rows = blocks.reshape(out, -1, type_size("Q6_K"))
    if rows.shape[1] <= tile_blocks:
        return blocks.reshape(-1)
    return torch.cat(
        [rows[:, start : start + tile_blocks].reshape(-1) for start in range(0, rows.shape[1], tile_blocks)]
    )


def _prepare(module: GGUFLinear) -> Tensor:
    return tiled_blocks(module.weight.detach().contiguous(), module.out_features, extension().TILE_BLOCKS)


def _matmul(module: GGUFLinear, blocks: Tensor, x: Tensor) -> Tensor:
    if x.shape[0] > GEMV_ROWS:
        return many_rows(module, x)
    return extension().q6_k_gemv(x.float().contiguous(), blocks, module.out_features).to(x.dtype)


def _q6_k(module: GGUFLinear) -> str:
    if module.qtype != "Q6_K":
        return f"it takes Q6_K weights, not {module.qtype}"
    return "" if available() else "quantkit's native GGUF code did not build here (the log says why)"


Q6_K_AVX512 = Kernel(
    name="q6k-avx512",
    layers=(GGUFLinear,),
    devices=frozenset({Hardware.CPU}),
    prepare=_prepare,
    matmul=_matmul,
    compute_dtype=torch.float32,
    fits=_q6_k,
    programs=PROGRAMS,
    cpu_features=CPU_FEATURES,
    priority=12,
    description=(
        "Q6_K blocks read as stored (0.82 bytes a weight) by a native AVX512-BF16 GEMV, codes to bfloat16 by "
        "table, float32 activations as two bfloat16 halves, float32 accumulation; the weight dequantized "
        "above 4 rows"
    ),
)
