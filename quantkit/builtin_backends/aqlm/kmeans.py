"""AQLM's initialisation: residual k-means of the weight's groups (Lloyd's algorithm in torch)."""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_VALUES = 2**19
"""Largest score matrix (rows x codewords) the beam search computes at once (2 MiB of float32):
glibc maps larger temporaries afresh at each step; with 2**24 values (64 MiB), 1x16 on a SmolLM2
MLP linear spent 91 of its 214 CPU-seconds in the kernel's page faults."""
_CACHE_VALUES = 2**16  # a distance slab that stays in the L2 cache
MIN_CHUNK_POINTS = 16
"""Fewest points per distance slab (4 MiB of float32 with 2**16 centroids): one point per slab made
1x16's k-means keep one tiny result per point between 256 KiB temporaries, which fragmented glibc's
heap to tens of GiB on SmolLM2's MLP linears."""


def first_argmax(scores: Tensor) -> Tensor:
    """``scores.argmax(1)`` (the first maximum of each row), in vectorised reductions: torch's
    CPU ``argmax`` runs element by element, several times slower than ``amax``."""
    k = scores.shape[1]
    descending = torch.arange(k, 0, -1, dtype=scores.dtype, device=scores.device)
    at_max = (scores - scores.amax(1, keepdim=True)).sign_().add_(1)  # 1 at each row's maximum, else 0
    return at_max.mul_(descending).amax(1).neg_().add_(k).long()


def nearest(points: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid ``(k, d)`` of each point ``(n, d)``, in chunks of points
    whose distances fill the L2 cache (at least ``MIN_CHUNK_POINTS`` points), written into one tensor."""
    neg_half_norms = centroids.square().sum(1) / -2
    step = max(_CACHE_VALUES // len(centroids), MIN_CHUNK_POINTS)
    codes = torch.empty(len(points), dtype=torch.long, device=points.device)
    for start in range(0, len(points), step):
        chunk = slice(start, start + step)
        # argmin ||p - c||^2 = argmax <p, c> - ||c||^2 / 2
        codes[chunk] = first_argmax(torch.addmm(neg_half_norms, points[chunk], centroids.T))
    return codes


def kmeans(
    points: Tensor, k: int, iters: int, generator: torch.Generator, per_centroid: int | None = None
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means of ``points`` ``(n, d)`` into ``k`` centroids: ``(centroids (k, d), codes (n,))``.

    Centroids start at ``k`` points drawn at random; a cluster that empties keeps its centroid.
    With ``per_centroid``, the centroids are fitted on a random sample of ``k * per_centroid``
    points (all points get codes). With ``n <= k`` the clustering is exact: every point is a
    centroid (the rest are repeats of random points) and its own code.
    """
    n = len(points)
    if n <= k:
        extra = torch.randint(n, (k - n,), generator=generator).to(points.device)
        return torch.cat([points, points[extra]]), torch.arange(n, device=points.device)
    order = torch.randperm(n, generator=generator).to(points.device)
    sample = points[order[: k * per_centroid]] if per_centroid is not None else points
    centroids = points[order[:k]].clone()
    for _ in range(iters):
        codes = nearest(sample, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, codes, sample)
        counts = torch.bincount(codes, minlength=k).to(points.dtype)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids, nearest(points, centroids)


def residual_kmeans(
    points: Tensor, num_codebooks: int, k: int, iters: int, generator: torch.Generator, per_centroid: int | None = None
) -> tuple[Tensor, Tensor]:
    """Additive codes by residual k-means: codebook ``m`` clusters what codebooks ``0..m-1`` left.

    ``points`` ``(n, d)``; returns ``(codebooks (num_codebooks, k, d), codes (n, num_codebooks))``.
    """
    residue = points.clone()
    codebooks, codes = [], []
    for _ in range(num_codebooks):
        centroids, assigned = kmeans(residue, k, iters, generator, per_centroid)
        residue -= centroids[assigned]
        codebooks.append(centroids)
        codes.append(assigned)
    return torch.stack(codebooks), torch.stack(codes, dim=1)
