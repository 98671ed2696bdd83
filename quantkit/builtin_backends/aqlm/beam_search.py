"""AQLM's code assignment: beam search over codes minimising a linear's output error.

For a weight ``W (out, in)`` and the calibration inputs' ``H = X^T X (in, in)``, the output error
of an approximation ``Ŵ`` is ``tr((Ŵ - W) H (Ŵ - W)^T)``; rows (output groups) add up
independently, so every output group runs its own beam, all of them vectorised. The search
visits each input group ``j`` and codebook ``m`` in turn and scores all ``2**nbits`` codewords
as the replacement of code ``(j, m)`` in every hypothesis at once: with ``G = (Ŵ - W) H``
maintained per hypothesis, the change of a row's error from replacing ``c_old`` by ``c`` (scaled
by ``s``) is ``2 s <c - c_old, G_j> + s² (c - c_old)^T H_jj (c - c_old)``, which for all ``c``
is one matmul of the codebook with a vector per (hypothesis, output group). Keeping the old
code is always a candidate, so the best hypothesis never gets worse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .codeword_search import best_codewords

CHUNK_VALUES = 2**19
"""Largest score matrix (hypotheses x codewords x output groups) a wider beam computes at once
(2 MiB of float32): glibc maps larger temporaries afresh at each step; with 2**24 values (64 MiB),
1x16 on a SmolLM2 MLP linear spent 91 of its 214 CPU-seconds in the kernel's page faults."""


def dequantize(codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """The weight ``(out, in)`` of ``codes (O, I, M)`` (long), ``codebooks (M, K, og, ig)`` and
    per-output-group ``scales (O,)``; differentiable in codebooks and scales."""
    num_out, num_in, num_codebooks = codes.shape
    _, _, out_group, in_group = codebooks.shape
    blocks = codebooks[torch.arange(num_codebooks, device=codes.device), codes].sum(2)  # (O, I, og, ig)
    blocks = blocks * scales.view(-1, 1, 1, 1)
    return blocks.transpose(1, 2).reshape(num_out * out_group, num_in * in_group)


def output_error(weight: Tensor, H: Tensor, approximation: Tensor) -> float:
    """``tr((Ŵ - W) H (Ŵ - W)^T)``: the squared output error over the inputs summarised by ``H``."""
    error = approximation - weight
    return float(((error @ H) * error).sum())


def beam_search(weight: Tensor, H: Tensor, codebooks: Tensor, scales: Tensor, codes: Tensor, beam_size: int) -> Tensor:
    """Codes ``(O, I, M)`` for ``weight`` found by beam search from ``codes``, for fixed codebooks
    and scales. A beam of one (greedy) searches all output groups at once through
    :func:`.best_codewords`; wider beams go in chunks of output groups that bound their scores' memory."""
    num_out = codes.shape[0]
    codebook_size = codebooks.shape[1]
    out_group = codebooks.shape[2]
    step = num_out if beam_size == 1 else max(1, CHUNK_VALUES // (beam_size * codebook_size))
    found = [
        _search(
            weight[start * out_group : (start + step) * out_group],
            H,
            codebooks,
            scales[start : start + step],
            codes[start : start + step],
            beam_size,
        )
        for start in range(0, num_out, step)
    ]
    return torch.cat(found)


def _search(weight: Tensor, H: Tensor, codebooks: Tensor, scales: Tensor, codes: Tensor, beam_size: int) -> Tensor:
    num_out, num_in, num_codebooks = codes.shape
    _, codebook_size, out_group, in_group = codebooks.shape
    in_features = weight.shape[1]
    rows = torch.arange(num_out, device=codes.device)
    error = dequantize(codes, codebooks, scales) - weight
    G = (error @ H).view(1, num_out, out_group, in_features)  # (beam, O, og, in)
    losses = (error.view(num_out, -1) * G.view(num_out, -1)).sum(1)[None]  # (beam, O)
    beam = codes[None].clone()  # (beam, O, I, M)
    s = scales.view(1, num_out, 1)
    for j in range(num_in):
        cols = slice(j * in_group, (j + 1) * in_group)
        Hjj = H[cols, cols]
        for m in range(num_codebooks):
            book = codebooks[m]  # (K, og, ig)
            norms = ((book @ Hjj) * book).sum((1, 2))  # (K,): c^T H_jj c over the group's rows
            old = book[beam[..., j, m]]  # (beam, O, og, ig)
            old_H = old @ Hjj
            Gj = G[..., cols]  # (beam, O, og, ig)
            width = len(beam)
            # score(c) = loss + <c, linear> + s² c^T H_jj c + constant, for every codeword c
            linear = 2 * s * Gj.reshape(width, num_out, -1) - 2 * s.square() * old_H.reshape(width, num_out, -1)
            sv = s.view(1, num_out)
            constant = -2 * sv * (old * Gj).flatten(2).sum(2) + sv.square() * (old * old_H).flatten(2).sum(2)
            if beam_size == 1:
                flat = book.view(codebook_size, -1)
                values, chosen = best_codewords(linear.view(num_out, -1), flat, norms, sv[0].square())
                best, chosen = (values + losses[0] + constant[0])[None], chosen[None]
                source = torch.zeros_like(chosen)
            else:
                scores = (book.reshape(codebook_size, -1) @ linear.reshape(width * num_out, -1).T).view(
                    codebook_size, width, num_out
                )
                scores += norms.view(-1, 1, 1) * sv.square()[None] + (losses + constant)[None]
                best, index = (
                    scores.transpose(0, 1)
                    .reshape(width * codebook_size, num_out)
                    .topk(min(beam_size, width * codebook_size), dim=0, largest=False)
                )
                source, chosen = index // codebook_size, index % codebook_size  # (beam', O)
            delta = (book[chosen] - old[source, rows]) * s.view(1, num_out, 1, 1)  # (beam', O, og, ig)
            update = (delta.reshape(-1, in_group) @ H[cols]).view(len(best), num_out, out_group, in_features)
            if width == 1 and len(best) == 1:  # greedy: nothing to reorder
                G += update
            else:
                G, beam = G[source, rows] + update, beam[source, rows]
            beam[..., j, m] = chosen
            losses = best
    return beam[0]
