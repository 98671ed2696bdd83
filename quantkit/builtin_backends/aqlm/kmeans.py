"""AQLM's initialisation: residual k-means of the weight's groups (Lloyd's algorithm in torch)."""

from __future__ import annotations

import torch
from torch import Tensor

from .codeword_search import best_codewords


def nearest(points: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest centroid ``(k, d)`` of each point ``(n, d)`` (the first of equals)."""
    # argmin ||p - c||^2 = argmin <-p, c> + ||c||^2 / 2
    half_norms = centroids.square().sum(1) / 2
    return best_codewords(-points, centroids, half_norms, points.new_ones(len(points)))[1]


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
