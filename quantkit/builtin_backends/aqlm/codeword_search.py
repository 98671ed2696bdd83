"""AQLM's inner step: the best codeword of each row, ``argmin_k <q_r, c_k> + w_r b_k``.

k-means' nearest centroid and a greedy beam-search step are both this search over all ``2**nbits``
codewords. With 8 values a codeword a score is 16 FLOPs, so torch's (rows x codewords) score matrix
and its reduction run at memory speed (0.6-1.0 G scores/s a core). On x86 CPUs with AVX-512 a native
kernel (:file:`native.cpp`) keeps no score and runs at 7.8-9.8 G scores/s a core, 8-16x faster
(``benchmarks/results/aqlm_codeword_search.txt``); elsewhere torch scores bounded slabs of rows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from quantkit.core.native_code import NativeExtension

NATIVE = NativeExtension(
    "quantkit_aqlm_native",
    Path(__file__).with_name("native.cpp"),
    ("avx512f",),
    ("-O3", "-fopenmp", "-mavx512f"),
    fallback="AQLM scores codewords through torch",
)
SLAB_VALUES = 2**16
"""Scores the torch path computes at once (a slab that stays in the L2 cache) ..."""
MIN_SLAB_ROWS = 16
"""... but at least this many rows: one row a slab against 2**16 codewords kept one tiny result per
row between 256 KiB temporaries, which fragmented glibc's heap to tens of GiB on SmolLM2's MLP linears."""


def first_argmin(scores: Tensor) -> Tensor:
    """``scores.argmin(1)`` (the first minimum of each row), in vectorised reductions: torch's
    CPU ``argmin`` runs element by element, several times slower than ``amin``."""
    k = scores.shape[1]
    descending = torch.arange(k, 0, -1, dtype=scores.dtype, device=scores.device)
    at_min = (scores.amin(1, keepdim=True) - scores).sign_().add_(1)  # 1 at each row's minimum, else 0
    return at_min.mul_(descending).amax(1).neg_().add_(k).long()


def best_codewords(queries: Tensor, codewords: Tensor, bias: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """For ``queries (n, d)``, ``codewords (K, d)``, ``bias (K,)`` and ``weights (n,)``: the lowest
    ``<q_r, c_k> + w_r b_k`` of each row ``(n,)`` and its first codeword ``(n,)`` (long); natively
    where the kernel runs (float32 on the CPU, ``K`` a multiple of 16), else :func:`torch_best_codewords`."""
    if _native(queries, codewords):
        contiguous = (t.contiguous() for t in (queries, codewords.T, bias, weights))
        return NATIVE.module().best_codewords(*contiguous)
    return torch_best_codewords(queries, codewords, bias, weights)


def torch_best_codewords(queries: Tensor, codewords: Tensor, bias: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`best_codewords` in torch on any device, scoring slabs of rows."""
    values = queries.new_empty(len(queries))
    indices = torch.empty(len(queries), dtype=torch.long, device=queries.device)
    step = max(SLAB_VALUES // len(codewords), MIN_SLAB_ROWS)
    for start in range(0, len(queries), step):
        rows = slice(start, start + step)
        scores = (queries[rows] @ codewords.T).addr_(weights[rows], bias)
        indices[rows] = first_argmin(scores)
        values[rows] = scores.gather(1, indices[rows, None]).squeeze(1)
    return values, indices


def _native(queries: Tensor, codewords: Tensor) -> bool:
    return (
        queries.device.type == "cpu"
        and queries.dtype == codewords.dtype == torch.float32
        and len(codewords) % 16 == 0
        and NATIVE.available()
    )
