"""Additive quantization of one linear's weight (AQLM's per-layer algorithm) and its cost.

:func:`aq_quantize` follows the paper: per-output-group scales (the group's norm), residual
k-means of the scaled weight's groups for the first codes and codebooks, then ``rounds`` of beam
search over the codes (:mod:`.beam_search`) and Adam on codebooks and scales
(:mod:`.codebook_update`, kept only when it lowers the error), both minimising the output error
on the calibration inputs summarised by ``H = X^T X`` (no rounds where k-means is exact: no more
weight groups than codewords). Codebooks and scales end rounded to float16, the stored type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .beam_search import beam_search, dequantize, output_error
from .codebook_update import update_codebooks
from .codeword_search import NATIVE
from .config import AQLMConfig
from .kmeans import residual_kmeans

STORED_DTYPE = torch.float16
"""dtype of the stored codebooks and scales (the paper counts 16 bits each)."""

EPS = 1e-9


@dataclass
class AQResult:
    """A quantized weight: ``dequantize(codes, codebooks, scales)`` approximates it."""

    codes: Tensor  # (out / og, in / ig, num_codebooks) long in [0, 2**nbits)
    codebooks: Tensor  # (num_codebooks, 2**nbits, og, ig) float32, float16-representable
    scales: Tensor  # (out / og,) float32, float16-representable
    errors: dict[str, float] = field(default_factory=dict)
    """Output error after each phase (``kmeans``, ``beam1``, ``adam1``, ..., ``stored``)."""

    def weight(self) -> Tensor:
        return dequantize(self.codes, self.codebooks, self.scales)


def aq_quantize(weight: Tensor, H: Tensor, config: AQLMConfig) -> AQResult:
    """AQLM-quantize ``weight (out, in)`` for inputs whose ``X^T X`` is ``H (in, in)``."""
    W = weight.detach().float()
    H = H.to(W)
    og, ig = config.out_group_size, config.in_group_size
    out_features, in_features = W.shape
    groups = W.view(out_features // og, og, in_features // ig, ig).transpose(1, 2)  # (O, I, og, ig)
    scales = groups.flatten(1).norm(dim=1) + EPS
    points = (groups / scales.view(-1, 1, 1, 1)).reshape(-1, og * ig)
    generator = torch.Generator().manual_seed(config.seed)
    books, codes = residual_kmeans(
        points,
        config.num_codebooks,
        2**config.nbits_per_codebook,
        config.kmeans_iters,
        generator,
        config.kmeans_points_per_centroid,
    )
    codebooks = books.view(config.num_codebooks, -1, og, ig)
    codes = codes.view(out_features // og, in_features // ig, config.num_codebooks)
    errors = {"kmeans": output_error(W, H, dequantize(codes, codebooks, scales))}
    for r in range(1, _rounds(config, out_features, in_features) + 1):
        codes = beam_search(W, H, codebooks, scales, codes, config.beam_size)
        errors[f"beam{r}"] = output_error(W, H, dequantize(codes, codebooks, scales))
        if config.codebook_steps:
            steps, lr = config.codebook_steps, config.codebook_lr
            updated = update_codebooks(W, H, codes, codebooks, scales, steps=steps, lr=lr)
            error = output_error(W, H, dequantize(codes, *updated))
            if error <= errors[f"beam{r}"]:  # Adam can overshoot (on an exact k-means, say): keep the better
                codebooks, scales = updated
            errors[f"adam{r}"] = min(error, errors[f"beam{r}"])
    codebooks, scales = (t.to(STORED_DTYPE).float() for t in (codebooks, scales))
    errors["stored"] = output_error(W, H, dequantize(codes, codebooks, scales))
    return AQResult(codes, codebooks, scales, errors)


NATIVE_SCORE_ELEMENTS = 0.07
"""Elementwise operations the time estimator counts per (group, codeword) score of k-means and beam
search on the native kernel: 18.3 G scores/s on 2 cores at 1x16, 14x the reference elementwise rate
(:data:`quantkit.estimate.REFERENCE_RATES`; ``benchmarks/results/aqlm_codeword_search.txt``)."""
TORCH_SCORE_ELEMENTS = 1.2
"""The same on torch's path, which writes each score and reads it back in the reduction: memory-bound
at 1.0-1.1 G scores/s on 2 cores (16 FLOPs a score at 8 values a codeword)."""


def score_elements() -> float:
    """Elementwise operations a score costs on this machine (:data:`NATIVE_SCORE_ELEMENTS` where
    the native kernel is supported, else :data:`TORCH_SCORE_ELEMENTS`): a prediction builds nothing."""
    return NATIVE_SCORE_ELEMENTS if NATIVE.supported() else TORCH_SCORE_ELEMENTS


def _rounds(config: AQLMConfig, out_features: int, in_features: int) -> int:
    """Rounds of beam search and codebook updates worth running: none when there are no more weight
    groups than codewords, where k-means gives every group its own codeword (exact: nothing to improve)."""
    groups = out_features * in_features // (config.out_group_size * config.in_group_size)
    return 0 if groups <= 2**config.nbits_per_codebook else config.rounds


def aq_scores(config: AQLMConfig, out_features: int, in_features: int) -> dict[str, float]:
    """How many (group, codeword) distances :func:`aq_quantize` scores on one ``out x in`` linear,
    per phase: the k-means assignments (``2 * og * ig`` of :func:`aq_flops`' ``kmeans`` FLOPs a
    score) and the beam search's codeword scoring (``2 * ig`` of its ``beam_search`` FLOPs a score)."""
    og, ig, books = config.out_group_size, config.in_group_size, config.num_codebooks
    size = 2**config.nbits_per_codebook
    points = out_features * in_features // (og * ig)
    per_centroid = config.kmeans_points_per_centroid
    fitted = points if per_centroid is None else min(points, per_centroid * size)
    rounds = _rounds(config, out_features, in_features)
    return {
        "kmeans": 0.0 if points <= size else float(books * (config.kmeans_iters * fitted + points) * size),
        "beam_search": float(rounds * books * (in_features // ig) * size * config.beam_size * out_features),
    }


def aq_flops(config: AQLMConfig, out_features: int, in_features: int, tokens: int) -> dict[str, float]:
    """Floating-point operations (multiply and add counted apart) of :func:`aq_quantize` on one
    ``out x in`` linear calibrated on ``tokens`` inputs, per phase; the dominant terms only.
    ``xtx`` is per linear: linears reading the same input (q/k/v, gate/up) share one in practice."""
    og, ig = config.out_group_size, config.in_group_size
    scores = aq_scores(config, out_features, in_features)
    rounds = _rounds(config, out_features, in_features)
    search_steps = config.num_codebooks * (in_features // ig)
    per_search = 2 * out_features * in_features**2 + search_steps * (  # beside the codeword scoring:
        2 * config.beam_size * out_features * ig * in_features  # the rank-ig update of (Ŵ - W) H
    )
    return {
        "xtx": 2.0 * tokens * in_features**2,
        "kmeans": 2.0 * og * ig * scores["kmeans"],
        "beam_search": float(rounds * per_search) + 2.0 * ig * scores["beam_search"],
        "codebook_update": 2.0 * rounds * config.codebook_steps * out_features * in_features**2,
    }
