"""GGUF (ggml) tensor quantization and dequantization in vectorized, device-agnostic PyTorch.

``quantize`` produces the ggml block byte layout of a GGUF tensor; ``dequantize`` decodes it.

* F16, BF16 and the legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) reproduce gguf-py's
  ``gguf.quants.quantize`` byte for byte (same float32 arithmetic, same tie-breaking).
* K-quants (Q2_K ... Q6_K) follow llama.cpp's reference quantizers (``quantize_row_qX_K_ref``
  in ggml-quants.c): the same scale searches, rounding (``nearest_int``: half to even) and
  packing, run for all blocks at once. Q3_K and Q6_K reproduce llama.cpp's bytes; in the
  other searches sums are accumulated in another order (and Q4_K/Q5_K rate their trials from
  the sums), so near-ties can resolve differently: some blocks differ, equally accurate.
  Quants of sub-blocks whose quantized scale is zero are stored as 0 (they decode to the
  same values whatever they hold).
* IQ4_NL and IQ4_XS (4-bit codes through llama.cpp's non-linear table) follow
  ``quantize_iq4_nl`` / ``quantize_iq4_xs``, the quantizers llama-quantize runs.
* With an importance matrix (one value per column), K-quants, IQ4_NL/IQ4_XS and
  Q4_0/Q4_1/Q5_0/Q5_1 use llama.cpp's weighted quantizers (``quantize_qX`` with ``quant_weights``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch
from torch import Tensor

QK_K = 256
_GROUP_MAX_EPS = 1e-15

# (weights per block, bytes per block), as gguf.constants.GGML_QUANT_SIZES.
_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q5_1": (32, 24),
    "Q5_0": (32, 22),
    "Q4_1": (32, 20),
    "Q4_0": (32, 18),
    "Q6_K": (256, 210),
    "Q5_K": (256, 176),
    "Q4_K": (256, 144),
    "Q3_K": (256, 110),
    "Q2_K": (256, 84),
    "IQ4_NL": (32, 18),
    "IQ4_XS": (256, 136),
}
QUANT_TYPES: tuple[str, ...] = tuple(_SIZES)

# Weights quantized per chunk: on CPU, enough to amortize per-kernel overhead (and the
# hand-offs of the interpreter lock between the chunk threads, see _run_chunks): 2^19 weights
# quantize a 2048 x 4096 matrix to Q4_K 1.25x faster than 2^18 on 2 threads, with the same
# bytes. Q3_K first fits its sub-block scales in larger batches: its sequential refinement
# runs many small kernels on the few sub-blocks it moves.
_CPU_CHUNK_ELEMENTS = 1 << 19
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 25
_Q3_K_SCALE_BATCH_ELEMENTS = 1 << 22


def _sizes(qtype: str) -> tuple[int, int]:
    try:
        return _SIZES[qtype]
    except KeyError:
        raise ValueError(f"unsupported GGUF quantization type {qtype!r}; expected one of {QUANT_TYPES}") from None


def block_size(qtype: str) -> int:
    """Number of weights in one block of ``qtype``."""
    return _sizes(qtype)[0]


def type_size(qtype: str) -> int:
    """Number of bytes in one block of ``qtype``."""
    return _sizes(qtype)[1]


def bits_per_weight(qtype: str) -> float:
    """Storage cost of ``qtype`` in bits per weight, block scales included."""
    bs, ts = _sizes(qtype)
    return ts * 8 / bs


# ----------------------------------------------------------------------------- helpers


def _f32(value: float) -> float:
    """Round a Python float to float32, as a C float expression would be."""
    return float(np.float32(value))


def _f16_bytes(x: Tensor) -> Tensor:
    """Encode values as IEEE half precision: (N, ...) -> (N, 2) uint8, little-endian."""
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _f16_read(b: Tensor) -> Tensor:
    """Decode (N, 2) uint8 half-precision bytes to a (N, 1) float32 tensor."""
    return b.contiguous().view(torch.float16).float()


def _as_f16(x: Tensor) -> Tensor:
    """Round float32 values through half precision (GGML_FP32_TO_FP16, then back)."""
    return x.to(torch.float16).float()


def _to_bytes(codes: Tensor) -> Tensor:
    """Float codes in [0, 127] to uint8 (through int8: a much faster conversion on CPU)."""
    return codes.to(torch.int8).view(torch.uint8)


def _pack(fields: Tensor, bits: int, dim: int) -> Tensor:
    """OR the uint8 ``fields`` along ``dim`` into bytes, entry k shifted left by ``bits * k``."""
    packed = fields.select(dim, 0)
    for k in range(1, fields.shape[dim]):
        packed = packed | (fields.select(dim, k) << (bits * k))
    return packed


def _unpack(packed: Tensor, bits: int, count: int, dim: int) -> Tensor:
    """Split bytes into ``count`` fields of ``bits`` bits (lowest first), on a new axis ``dim``.

    One scalar shift and mask per field: a broadcast tensor of shifts takes torch's per-element
    shift path, 3.6x slower for nibbles on CPU."""
    mask = (1 << bits) - 1
    return torch.stack([(packed >> (bits * k)) & mask for k in range(count)], dim=dim)


def _peak(x: Tensor, dim: int) -> Tensor:
    """Entry of largest magnitude along ``dim``, with its sign, the first one on ties; keeps ``dim``."""
    top = x.amax(dim, keepdim=True)
    bottom = x.amin(dim, keepdim=True)
    peak = torch.where(top >= -bottom, top, bottom)
    tie = (top == -bottom) & (top > 0)
    if tie.any():  # +m and -m both present: the one met first wins, as in a sequential scan
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
        rank = torch.arange(x.shape[dim], 0, -1, device=x.device, dtype=x.dtype).view(shape)
        first_top = ((x == top) * rank).amax(dim, keepdim=True)
        first_bottom = ((x == bottom) * rank).amax(dim, keepdim=True)
        peak = torch.where(tie & (first_bottom > first_top), bottom, peak)
    return peak


def _safe_reciprocal(d: Tensor) -> Tensor:
    """1/d, and 0 where d == 0."""
    return torch.where(d == 0, 0.0, torch.reciprocal(d))


def _positive(x: Tensor) -> Tensor:
    """1.0 where x > 0, else 0.0: a float mask, much cheaper than a bool one on CPU."""
    return x.sign().clamp_(min=0)


def _take(old: Tensor, new: Tensor, mask: Tensor) -> Tensor:
    """``where(mask, new, old)`` for finite values and a 0/1 float mask (lerp is exact at 0 and 1)."""
    return torch.lerp(old, new, mask)


# ----------------------------------------------------------------------------- float and legacy types


def _f16_nan_bits(n: Tensor) -> Tensor:
    """numpy's float16 bits for float32 NaN bits n: sign, exponent and top payload bits, unquieted."""
    return ((n >> 16) & 0x8000) | 0x7C00 | ((n >> 13) & 0x3FF).clamp_(min=1)  # payload 0 would be infinity


def _bf16_nan_bits(n: Tensor) -> Tensor:
    """ggml's bfloat16 bits for float32 NaN bits n: sign and top payload bits, quieted."""
    return (n >> 16) | 0x40


def _half_bytes(x: Tensor, dtype: torch.dtype, nan_bits: Callable[[Tensor], Tensor]) -> Tensor:
    """float32 -> 2-byte float bytes: torch's round-to-nearest-even conversion, NaNs as ``nan_bits``."""
    bits = x.to(dtype).view(torch.int16)
    if not bool(x.sum().isfinite()):  # a NaN cannot hide in a finite sum
        nan = torch.isnan(x)
        if nan.any():
            bits = torch.where(nan, nan_bits(x.view(torch.int32)).to(torch.int16), bits)
    return bits.view(torch.uint8)


def _quantize_f16(values: Tensor) -> Tensor:
    return _half_bytes(values, torch.float16, _f16_nan_bits)


def _quantize_bf16(values: Tensor) -> Tensor:
    return _half_bytes(values, torch.bfloat16, _bf16_nan_bits)


def _round_half_away(x: Tensor) -> Tensor:
    """C ``roundf``: round to nearest, ties away from zero, exactly (as gguf-py's np_roundf)."""
    a = x.abs()
    whole = a.floor()
    return torch.copysign(a.sub_(whole).mul_(2).floor_().add_(whole), x)


def _quantize_q8_0(blocks: Tensor) -> Tensor:
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = _round_half_away(blocks * _safe_reciprocal(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=-1)


def _quantize_symmetric(blocks: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Q4_0 / Q5_0: d = -max / 2^(bits-1), codes trunc(x / d + 2^(bits-1) + 0.5) (never negative)."""
    half = 1 << (bits - 1)
    d = _peak(blocks, -1) / -half
    q = torch.mul(blocks, _safe_reciprocal(d)).add_(half + 0.5).floor_().clamp_(0, 2 * half - 1)
    return d, _to_bytes(q)


def _quantize_affine(blocks: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Q4_1 / Q5_1: d = (max - min) / (2^bits - 1), codes trunc((x - min) / d + 0.5)."""
    levels = (1 << bits) - 1
    lo = blocks.amin(-1, keepdim=True)
    d = (blocks.amax(-1, keepdim=True) - lo) / levels
    q = torch.sub(blocks, lo).mul_(_safe_reciprocal(d)).add_(0.5).floor_().clamp_(0, levels)
    return d, lo, _to_bytes(q)


def _nibbles(q: Tensor) -> Tensor:
    """Pack 32 codes per block: low nibbles from the first 16 codes, high nibbles from the last 16."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _high_bits32(q: Tensor) -> Tensor:
    """Bit 4 of each of the 32 codes of a block, as a little-endian uint32 (4 bytes)."""
    return _pack((q >> 4).view(q.shape[0], 4, 8), 1, 2)


def _quantize_q4_0(blocks: Tensor) -> Tensor:
    d, q = _quantize_symmetric(blocks, 4)
    return torch.cat([_f16_bytes(d), _nibbles(q)], dim=-1)


def _quantize_q5_0(blocks: Tensor) -> Tensor:
    d, q = _quantize_symmetric(blocks, 5)
    return torch.cat([_f16_bytes(d), _high_bits32(q), _nibbles(q)], dim=-1)


def _quantize_q4_1(blocks: Tensor) -> Tensor:
    d, lo, q = _quantize_affine(blocks, 4)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _nibbles(q)], dim=-1)


def _quantize_q5_1(blocks: Tensor) -> Tensor:
    d, lo, q = _quantize_affine(blocks, 5)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _high_bits32(q), _nibbles(q)], dim=-1)


# ----------------------------------------------------------------------------- scale searches
#
# The searches see groups as columns: x is (n, B) for B groups of n weights, so per-group
# reductions run over dim 0 and per-group results are (1, B). Their loops run over the few
# trial scales of llama.cpp's searches, each one evaluated for every group at once.


def _fit_scale_min(
    x: Tensor,
    w: Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    error: Literal["mad", "mse", "mse_from_sums"],
    return_quants: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """llama.cpp ``make_qkx2_quants`` / ``make_qkx3_quants``: x ≈ scale * q - min, q in [0, nmax].

    Starts from the min/max range, then tries the inverse scales
    ``(nmax + rmin + rdelta * i) / (max - min)`` for i = 0..nstep, ``min`` being the best
    offset so far; each trial's quants get a weighted least-squares (scale, min) refit, kept
    if it lowers the weighted ``error``: absolute ("mad") or squared, the latter either from
    the residuals ("mse") or expanded over the weighted sums ("mse_from_sums": no extra pass
    over the weights, but cancellation makes it unreliable when a few weights dominate, as
    importance-matrix weights can). Returns (scale, min, quants as float (n, B) if
    ``return_quants``).
    """
    the_min = x.amin(0, keepdim=True).clamp_(max=0).neg_()  # x ≈ scale * q - the_min, the_min >= 0
    xmax = x.amax(0, keepdim=True)
    # Constant groups (max == min) get a unit span: their quants are all 0, no refit is valid
    # (det == 0) and their scale is zeroed at the end, as in llama.cpp.
    flat = 1 - (xmax + the_min).sign()
    xmax += flat
    wx = w * x
    sum_w = w.sum(0, keepdim=True)
    sum_x = wx.sum(0, keepdim=True)
    sum_x2 = (wx * x).sum(0, keepdim=True)
    q = torch.empty_like(x)
    tmp = torch.empty_like(x)

    def quantize_with(inverse_step: float) -> None:
        iscale = (xmax + the_min).reciprocal_().mul_(inverse_step)
        torch.addcmul(the_min * iscale, x, iscale, out=q).round_().clamp_(0, nmax)

    def weighted_sums() -> tuple[Tensor, Tensor, Tensor]:
        s_l = torch.mul(w, q, out=tmp).sum(0, keepdim=True)
        s_l2 = tmp.mul_(q).sum(0, keepdim=True)
        s_xl = torch.mul(wx, q, out=tmp).sum(0, keepdim=True)
        return s_l, s_l2, s_xl

    def trial_error(scale: Tensor, the_min: Tensor, sums: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        if error == "mse_from_sums":  # sum w (scale q - the_min - x)^2, expanded
            s_l, s_l2, s_xl = sums
            fit_terms = scale * (scale * s_l2 - 2 * the_min * s_l - 2 * s_xl)
            return fit_terms + the_min * (the_min * sum_w + 2 * sum_x) + sum_x2
        residual = torch.addcmul(-the_min, q, scale, out=tmp).sub_(x)
        if error == "mad":
            return residual.abs_().mul_(w).sum(0, keepdim=True)
        return (w * residual).mul_(residual).sum(0, keepdim=True)

    quantize_with(nmax)
    scale = (xmax + the_min) / nmax
    best = trial_error(scale, the_min, weighted_sums() if error == "mse_from_sums" else ())
    best_q = q.clone() if return_quants else None

    for step in range(nstep + 1):
        quantize_with(_f32(_f32(rmin + _f32(rdelta * step)) + nmax))
        sums = s_l, s_l2, s_xl = weighted_sums()
        det = sum_w * s_l2 - s_l * s_l
        valid = _positive(det)
        invalid = 1 - valid
        det.abs_().add_(invalid)  # keeps rejected trials finite
        fit_scale = (sum_w * s_xl - sum_x * s_l) / det
        fit_min = (s_l * s_xl - s_l2 * sum_x) / det
        clipped = _positive(-fit_min)  # llama.cpp keeps min <= 0 (the_min >= 0), refitting the scale alone
        fit_min.clamp_(min=0)
        fit_scale = _take(fit_scale, s_xl / (s_l2 + invalid), clipped)
        err = trial_error(fit_scale, fit_min, sums)
        better = valid.mul_(_positive(best - err))
        best = _take(best, err, better)
        scale = _take(scale, fit_scale, better)
        the_min = _take(the_min, fit_min, better)
        if best_q is not None:
            torch.lerp(best_q, q, better, out=best_q)

    if best_q is not None:
        best_q.mul_(1 - flat)
    return scale.mul_(1 - flat), the_min, best_q


def _fit_symmetric_scale(
    x: Tensor, w: Tensor | None, nmax: int, search: bool = True, return_quants: bool = False
) -> tuple[Tensor, Tensor | None]:
    """llama.cpp ``make_qx_quants`` (rmse_type 1): x ≈ scale * q, q in [-nmax, nmax - 1].

    Tries the inverse scales -(nmax + 0.1 i) / max for i = 0, -9..9 (i = 0 only unless
    ``search``) and keeps the weighted least-squares scale of the trial with the largest
    sumlx^2 / suml2; ``w`` defaults to x^2. Returns (scale (1, B), quants + nmax as float
    (n, B) if ``return_quants``), both 0 for all-zero groups.
    """
    peak = _peak(x, 0)
    nonzero = _positive(peak.abs() - _GROUP_MAX_EPS)
    peak.add_(1 - nonzero)  # all-zero groups: any finite peak, their results are zeroed below
    if w is None:
        w = x * x
    wx = w * x
    q = torch.empty_like(x)
    tmp = torch.empty_like(x)
    scale = best = best_q = None
    for step in [0, *range(-9, 0), *range(1, 10)] if search else [0]:
        torch.mul(x, -_f32(nmax + _f32(0.1 * step)) / peak, out=q).round_().clamp_(-nmax, nmax - 1)
        sumlx = torch.mul(wx, q, out=tmp).sum(0, keepdim=True)
        suml2 = torch.mul(w, q, out=tmp).mul_(q).sum(0, keepdim=True)
        has_l2 = _positive(suml2)
        trial = sumlx / (suml2 + (1 - has_l2))  # 0 where suml2 == 0 (then sumlx == 0 too)
        if best is None:
            scale, best = trial, trial * sumlx
            best_q = q.clone() if return_quants else None
            continue
        better = has_l2 * _positive(sumlx * sumlx - best * suml2)
        scale = _take(scale, trial, better)
        best = _take(best, trial * sumlx, better)
        if best_q is not None:
            torch.lerp(best_q, q, better, out=best_q)

    if best_q is not None:
        best_q = best_q.add_(nmax).mul_(nonzero)
    return scale.mul_(nonzero), best_q


def _q3_k_scales(xs: Tensor) -> Tensor:
    """llama.cpp ``make_q3_quants(16, 4, do_rmse=true)`` scale of each 16-weight sub-block of xs (S, 256).

    The quants q = round(-4 x / max) are refined by llama.cpp's coordinate descent on the
    x^2-weighted least-squares error (up to 5 in-order sweeps over the sub-block, stopping
    after a sweep without change) and the least-squares scale is returned, as (S, 16).
    Only sub-blocks whose peak is negative can move: for the others every x * q <= 0 and the
    "slx > 0" test always fails. The descent runs on all moving sub-blocks at once: each
    step tests one element of each and finishes the few that change apart, and a sub-block
    that a sweep leaves unchanged would stay so, so the next sweep skips it.
    """
    groups = xs.reshape(-1, 16)
    sumlx, suml2, peaks = [], [], []
    for part in groups.split(_CPU_CHUNK_ELEMENTS // 16):  # cache-sized pieces for the first pass
        x = part.t().contiguous()
        peak = _peak(x, 0)
        q = (x * (-4 / (peak + (peak == 0)))).round_().clamp_(-4, 3)
        w = x * x
        sumlx.append((w * x * q).sum(0))
        suml2.append((w * q * q).sum(0))
        peaks.append(peak.view(-1))
    sumlx, suml2, peak = torch.cat(sumlx), torch.cat(suml2), torch.cat(peaks)

    group = torch.nonzero(peak < 0).view(-1)  # moving sub-blocks, visited as columns
    xa = groups.index_select(0, group).t().contiguous()
    qa = (xa * (-4 / peak.index_select(0, group))).round_().clamp_(-4, 3)
    lx, l2 = sumlx.index_select(0, group), suml2.index_select(0, group)
    for _sweep in range(5):
        if not len(group):
            break
        changed = torch.zeros_like(lx, dtype=torch.bool)
        for i in range(16):
            xi, qi = xa[i], qa[i]
            wi = xi * xi
            wxi = wi * xi
            slx = lx - wxi * qi  # the sums without element i, as llama.cpp computes them
            sl2 = l2 - wi * qi * qi
            new = (xi * sl2 / slx).round_().clamp_(-4, 3)
            tried = torch.nonzero(new != qi).view(-1)  # NaN where slx == 0: rejected below
            if not len(tried):
                continue
            new, slx, sl2, wi, wxi, old_lx, old_l2 = (
                t.index_select(0, tried) for t in (new, slx, sl2, wi, wxi, lx, l2)
            )
            new_lx, new_l2 = slx + wxi * new, sl2 + wi * new * new
            take = (slx > 0) & (new_l2 > 0) & (new_lx * new_lx * old_l2 > old_lx * old_lx * new_l2)
            accepted = torch.nonzero(take).view(-1)
            took = tried.index_select(0, accepted)
            for target, value in ((qi, new), (lx, new_lx), (l2, new_l2)):
                target.index_copy_(0, took, value.index_select(0, accepted))
            changed.index_fill_(0, took, True)
        sumlx.index_copy_(0, group, lx)
        suml2.index_copy_(0, group, l2)
        keep = torch.nonzero(changed).view(-1)
        group, lx, l2 = group[keep], lx.index_select(0, keep), l2.index_select(0, keep)
        xa, qa = xa.index_select(1, keep), qa.index_select(1, keep)
    scales = torch.where(suml2 > 0, sumlx / suml2, 0.0)
    return scales.masked_fill_(peak.abs() < _GROUP_MAX_EPS, 0.0).view(-1, 16)


def _fit_scale_vector(x: Tensor, w: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """llama.cpp ``make_qp_quants``: quantize the non-negative rows of x (S, n) to q in [0, nmax].

    Picks the best of 9 inverse scales (nmax + 0.1 i) / max, then refines the quants by
    coordinate descent on the weighted least-squares error (5 sweeps; a sweep that changes
    nothing makes the next ones no-ops, like llama.cpp's early exit).
    Returns (scale (S, 1), q (S, n) as uint8); this runs on small per-super-block tensors.
    """
    top = x.amax(-1, keepdim=True)
    zero = top < _GROUP_MAX_EPS
    top = top.masked_fill(zero, 1.0)

    def mse(iscale: Tensor, q: Tensor) -> Tensor:
        return (w * (x - torch.reciprocal(iscale) * q) ** 2).sum(-1, keepdim=True)

    iscale = nmax / top
    best = mse(iscale, (iscale * x).round_())
    for step in [*range(-4, 0), *range(1, 5)]:
        trial = _f32(_f32(0.1 * step) + nmax) / top
        err = mse(trial, (trial * x).round_().clamp_(max=nmax))
        better = err < best
        best = torch.where(better, err, best)
        iscale = torch.where(better, trial, iscale)

    q = (iscale * x).round_().clamp_(max=nmax)
    wx = w * x
    sumlx = (wx * q).sum(-1, keepdim=True)
    suml2 = (w * q * q).sum(-1, keepdim=True)
    for _sweep in range(5):
        for i in range(x.shape[-1]):
            qi, wi, wxi = q[:, i : i + 1], w[:, i : i + 1], wx[:, i : i + 1]
            slx = sumlx - wxi * qi
            sl2 = suml2 - wi * qi * qi
            new = (x[:, i : i + 1] * sl2 / slx).round_().clamp_(max=nmax)
            new_lx = slx + wxi * new
            new_l2 = sl2 + wi * new * new
            take = (slx > 0) & (sl2 > 0) & (new != qi) & (new_lx * new_lx * suml2 > sumlx * sumlx * new_l2)
            q[:, i : i + 1] = torch.where(take, new, qi)
            sumlx = torch.where(take, new_lx, sumlx)
            suml2 = torch.where(take, new_l2, suml2)

    scale = torch.where(suml2 > 0, sumlx / suml2, 0.0).masked_fill_(zero, 0.0)
    return scale, _to_bytes(q.masked_fill_(zero, 0.0).clamp_(min=0))


# ----------------------------------------------------------------------------- K-quants


def _columns(xs: Tensor, n: int) -> Tensor:
    """(S, 256) super-blocks -> (n, S * 256 / n): one sub-block of n weights per column."""
    return xs.reshape(-1, n).t().contiguous()


def _requantize(x: Tensor, d: Tensor, offset: Tensor | None, lo: int, hi: int) -> Tensor:
    """uint8 codes round((x + offset) / d) clamped to [lo, hi], minus lo; 0 where d == 0.

    x is (S, nsub, n), d and offset are (S, nsub).
    """
    nonzero = (d != 0).unsqueeze(-1)
    d = d.unsqueeze(-1) + ~nonzero  # unit step where d == 0, zeroed below
    num = x if offset is None else x + offset.unsqueeze(-1)
    return _to_bytes((num / d).round_().clamp_(lo, hi).sub_(lo).mul_(nonzero))


def _quantize_scales(values: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Non-negative per-sub-block values (S, nsub) as codes in [0, levels] times a super-block step.

    Returns (uint8 codes, fp16-rounded step (S, 1) as float32).
    """
    top = values.amax(1, keepdim=True).clamp_(min=0)
    inv = torch.where(top > 0, levels / top, 0.0)
    return _to_bytes((inv * values).round_().clamp_(0, levels)), _as_f16(top / levels)


def _fit_scales_weighted(scales: Tensor, mins: Tensor, sw: Tensor, levels: int) -> tuple[Tensor, ...]:
    """imatrix path: sub-block scales and mins quantized with ``make_qp_quants``.

    Returns (scale codes, min codes, fp16-rounded d (S, 1), fp16-rounded dmin (S, 1)).
    """
    d, ls = _fit_scale_vector(scales, sw, levels)
    dmin, lm = _fit_scale_vector(mins, sw, levels)
    return ls, lm, _as_f16(d), _as_f16(dmin)


def _pack_k_scales(ls: Tensor, lm: Tensor) -> Tensor:
    """Q4_K/Q5_K 12-byte layout of eight 6-bit scales and mins (get_scale_min_k4)."""
    hi_s, hi_m = ls[:, 4:], lm[:, 4:]
    return torch.cat(
        [ls[:, :4] | ((hi_s >> 4) << 6), lm[:, :4] | ((hi_m >> 4) << 6), (hi_s & 0x0F) | ((hi_m & 0x0F) << 4)],
        dim=-1,
    )


def _unpack_k_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of ``_pack_k_scales``: (S, 12) -> scales, mins as (S, 8) uint8."""
    lo_s, lo_m, hi = packed[:, :4], packed[:, 4:8], packed[:, 8:]
    scales = torch.cat([lo_s & 0x3F, (hi & 0x0F) | ((lo_s >> 6) << 4)], dim=-1)
    mins = torch.cat([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 6) << 4)], dim=-1)
    return scales, mins


def _importance(xs: Tensor, qw: Tensor, sigma2_factor: float) -> Tensor:
    """llama.cpp's imatrix weights qw * sqrt(sigma2 + x^2), sigma2 = factor * mean(x^2) per row of xs."""
    sigma2 = sigma2_factor * (xs * xs).sum(-1, keepdim=True) / xs.shape[-1]
    return qw * torch.sqrt(sigma2 + xs * xs)


def _quantize_q2_k(xs: Tensor, qw: Tensor | None) -> Tensor:
    s = xs.shape[0]
    x = _columns(xs, 16)
    if qw is None:
        scales, mins, _ = _fit_scale_min(x, x.abs(), 3, -0.5, 0.1, 15, error="mad")
        ls, d = _quantize_scales(scales.view(s, 16), 15)
        lm, dmin = _quantize_scales(mins.view(s, 16), 15)
    else:
        weights = _importance(xs, qw, 1.0)
        scales, mins, _ = _fit_scale_min(x, _columns(weights, 16), 3, -0.9, 0.05, 36, error="mse")
        sw = weights.view(s, 16, 16).sum(-1)
        ls, lm, d, dmin = _fit_scales_weighted(scales.view(s, 16), mins.view(s, 16), sw, 15)
    q = _requantize(xs.view(s, 16, 16), d * ls, dmin * lm, 0, 3)
    qs = _pack(q.view(s, 2, 4, 32), 2, 2).view(s, 64)
    return torch.cat([ls | (lm << 4), qs, _f16_bytes(d), _f16_bytes(dmin)], dim=-1)


def _quantize_q3_k(xs: Tensor, qw: Tensor | None, scales: Tensor | None = None) -> Tensor:
    """Q3_K blocks; ``scales`` are the sub-block scales of ``_q3_k_scales`` when already computed."""
    s = xs.shape[0]
    if qw is None:
        scales = _q3_k_scales(xs) if scales is None else scales
        top = _peak(scales, 1)
        iscale = torch.where(top == 0, 0.0, -32 / top)
        codes = (iscale * scales).round_().clamp_(-32, 31).add_(32).masked_fill_(top == 0, 0.0)
        d = _as_f16(torch.reciprocal(iscale)).masked_fill_(top == 0, 0.0)
    else:
        weights = _importance(xs, qw, 2.0)
        scales = _fit_symmetric_scale(_columns(xs, 16), _columns(weights, 16), 4)[0].view(s, 16)
        sw = weights.view(s, 16, 16).sum(-1)
        d, codes = _fit_symmetric_scale(scales.t(), sw.t(), 32, return_quants=True)
        d, codes = _as_f16(d.view(s, 1)), codes.t()
    codes = _to_bytes(codes)
    q = _requantize(xs.view(s, 16, 16), d * (codes.float() - 32), None, -4, 3)
    hmask = _pack((q >> 2).view(s, 8, 32), 1, 1)
    qs = _pack((q & 3).view(s, 2, 4, 32), 2, 2).view(s, 64)
    low = (codes[:, :8] & 0x0F) | ((codes[:, 8:] & 0x0F) << 4)
    high = _pack((codes >> 4).view(s, 4, 4), 2, 1)
    return torch.cat([hmask, qs, low, high, _f16_bytes(d)], dim=-1)


def _quantize_q45_k(xs: Tensor, qw: Tensor | None, nmax: int) -> tuple[Tensor, Tensor]:
    """Shared Q4_K/Q5_K part: header bytes (d, dmin, scales) and codes (S, 256) in [0, nmax]."""
    s = xs.shape[0]
    x = _columns(xs, 32)
    if qw is None:
        weights = torch.sqrt((x * x).mean(0, keepdim=True)) + x.abs()
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, _ = _fit_scale_min(x, weights, nmax, rmin, 0.1, nstep, error="mse_from_sums")
        ls, d = _quantize_scales(scales.view(s, 8), 63)
        lm, dmin = _quantize_scales(mins.view(s, 8), 63)
    else:
        weights = _importance(xs, qw, 2.0)
        scales, mins, _ = _fit_scale_min(x, _columns(weights, 32), nmax, -0.9, 0.05, 36, error="mse")
        sw = weights.view(s, 8, 32).sum(-1)
        ls, lm, d, dmin = _fit_scales_weighted(scales.view(s, 8), mins.view(s, 8), sw, 63)
    q = _requantize(xs.view(s, 8, 32), d * ls, dmin * lm, 0, nmax).view(s, 256)
    header = torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(ls, lm)], dim=-1)
    return header, q


def _quantize_q4_k(xs: Tensor, qw: Tensor | None) -> Tensor:
    header, q = _quantize_q45_k(xs, qw, 15)
    qs = _pack(q.view(-1, 4, 2, 32), 4, 2).view(-1, 128)
    return torch.cat([header, qs], dim=-1)


def _quantize_q5_k(xs: Tensor, qw: Tensor | None) -> Tensor:
    header, q = _quantize_q45_k(xs, qw, 31)
    s = xs.shape[0]
    qh = _pack((q >> 4).view(s, 8, 32), 1, 1)
    qs = _pack((q & 0x0F).view(s, 4, 2, 32), 4, 2).view(s, 128)
    return torch.cat([header, qh, qs], dim=-1)


def _quantize_q6_k(xs: Tensor, qw: Tensor | None) -> Tensor:
    s = xs.shape[0]
    weights = None if qw is None else _columns(qw, 16)
    scales = _fit_symmetric_scale(_columns(xs, 16), weights, 32)[0].view(s, 16)
    top = _peak(scales, 1)
    zero = top.abs() < _GROUP_MAX_EPS
    iscale = (-128 / top).masked_fill_(zero, 0.0)
    d = _as_f16(torch.reciprocal(iscale)).masked_fill_(zero, 0.0)
    codes = (iscale * scales).round_().clamp_(-128, 127)
    q = _requantize(xs.view(s, 16, 16), d * codes, None, -32, 31).view(s, 2, 4, 32)
    ql = _pack((q & 0x0F).view(s, 2, 2, 2, 32), 4, 2).view(s, 128)
    qh = _pack(q >> 4, 2, 2).view(s, 64)
    return torch.cat([ql, qh, codes.to(torch.int8).view(torch.uint8), _f16_bytes(d)], dim=-1)


# ----------------------------------------------------------------------------- legacy types with imatrix
#
# llama.cpp's weighted legacy quantizers store the quants of the search's best trial as they are.


def _quantize_q4_0_weighted(blocks: Tensor, weights: Tensor) -> Tensor:
    d, q = _fit_symmetric_scale(blocks.t().contiguous(), weights.t().contiguous(), 8, return_quants=True)
    return torch.cat([_f16_bytes(d), _nibbles(_to_bytes(q.t()))], dim=-1)


def _quantize_q5_0_weighted(blocks: Tensor, weights: Tensor) -> Tensor:
    d, q = _fit_symmetric_scale(blocks.t().contiguous(), weights.t().contiguous(), 16, return_quants=True)
    q = _to_bytes(q.t())
    return torch.cat([_f16_bytes(d), _high_bits32(q), _nibbles(q)], dim=-1)


def _fit_affine_weighted(blocks: Tensor, weights: Tensor, nmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """make_qkx3_quants on each block: (fp16 d bytes, fp16 m bytes, uint8 quants (N, 32))."""
    d, the_min, q = _fit_scale_min(
        blocks.t().contiguous(), weights.t().contiguous(), nmax, -0.9, 0.05, 36, error="mse", return_quants=True
    )
    return _f16_bytes(d), _f16_bytes(-the_min), _to_bytes(q.t())


def _quantize_q4_1_weighted(blocks: Tensor, weights: Tensor) -> Tensor:
    d, m, q = _fit_affine_weighted(blocks, weights, 15)
    return torch.cat([d, m, _nibbles(q)], dim=-1)


def _quantize_q5_1_weighted(blocks: Tensor, weights: Tensor) -> Tensor:
    d, m, q = _fit_affine_weighted(blocks, weights, 31)
    return torch.cat([d, m, _high_bits32(q), _nibbles(q)], dim=-1)


# ----------------------------------------------------------------------------- non-linear 4-bit types
#
# IQ4_NL and IQ4_XS map 4-bit codes through llama.cpp's table ``kvalues_iq4nl``; both run
# ``quantize_row_iq4_nl_impl`` (ntry = 7, as llama-quantize does, with or without importance
# matrix): per 32-weight block, the weighted least-squares scale of the best of 16 trial scales.

IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_IQ4_TRIES = 7


def _iq4_values(device: torch.device) -> Tensor:
    return torch.tensor(IQ4_VALUES, dtype=torch.float32, device=device)


def _iq4_index(x: Tensor, values: Tensor) -> Tensor:
    """llama.cpp ``best_index_int8``: the index of the table value nearest x (the upper one on ties)."""
    upper = torch.searchsorted(values, x.contiguous(), right=True).clamp_(1, values.numel() - 1)
    lower = upper - 1
    take_lower = (x - values[lower]) < (values[upper] - x)
    return torch.where(take_lower, lower, upper)


def _iq4_block_scales(x: Tensor, w: Tensor, values: Tensor) -> Tensor:
    """The scale of each 32-weight block, rows of x (N, 32) with error weights w: llama.cpp's
    search over the inverse scales ``(values[0] + i) / max`` for i = -7..7 after ``max / 127``."""
    peak = _peak(x, 1)
    nonzero = peak.abs() >= _GROUP_MAX_EPS
    peak = torch.where(nonzero, peak, 1.0)
    wx = w * x

    def fit(inverse: Tensor) -> tuple[Tensor, Tensor]:
        q = values[_iq4_index(inverse * x, values)]
        return (wx * q).sum(1, keepdim=True), (w * q * q).sum(1, keepdim=True)

    sumqx, sumq2 = fit(torch.reciprocal(peak / -values[0]))
    scale = torch.where(sumq2 > 0, sumqx / sumq2.clamp(min=1e-30), 0.0)
    best = scale * sumqx
    for step in range(-_IQ4_TRIES, _IQ4_TRIES + 1):
        sumqx, sumq2 = fit((step + IQ4_VALUES[0]) / peak)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        trial = sumqx / sumq2.clamp(min=1e-30)
        scale = torch.where(better, trial, scale)
        best = torch.where(better, trial * sumqx, best)
    return scale.masked_fill_(~nonzero, 0.0)


def _iq4_weights(xs: Tensor, qw: Tensor | None) -> Tensor:
    """Error weights of super-blocks xs (S, n): x^2, or qw * sqrt(2 mean(x^2) + x^2) with an imatrix."""
    return xs * xs if qw is None else _importance(xs, qw, 2.0)


def _iq4_codes(x: Tensor, inverse: Tensor, values: Tensor) -> Tensor:
    return _iq4_index(inverse * x, values).to(torch.uint8)


def _quantize_iq4_nl(blocks: Tensor, qw: Tensor | None) -> Tensor:
    values = _iq4_values(blocks.device)
    scale = _iq4_block_scales(blocks, _iq4_weights(blocks, qw), values)
    codes = _iq4_codes(blocks, _safe_reciprocal(scale), values)
    return torch.cat([_f16_bytes(scale), _nibbles(codes)], dim=-1)


def _quantize_iq4_xs(xs: Tensor, qw: Tensor | None) -> Tensor:
    s = xs.shape[0]
    values = _iq4_values(xs.device)
    blocks = xs.reshape(-1, 32)
    scales = _iq4_block_scales(blocks, _iq4_weights(xs, qw).reshape(-1, 32), values).view(s, 8)
    peak = _peak(scales, 1)  # the scale of largest magnitude, first on ties, 0.0 when all are 0
    d = -peak / 32
    levels = (_safe_reciprocal(d) * scales).round_().clamp_(-32, 31)
    codes = _iq4_codes(blocks, _safe_reciprocal(d * levels).view(-1, 1), values).view(s * 8, 32)
    ls = (levels + 32).to(torch.int32)
    low = (ls[:, 0::2] & 0x0F) | ((ls[:, 1::2] & 0x0F) << 4)
    high = ((ls >> 4) << torch.arange(0, 16, 2, device=xs.device, dtype=torch.int32)).sum(1, keepdim=True)
    header = torch.cat([_f16_bytes(d), high.to(torch.int16).view(torch.uint8).view(s, 2), _to_bytes(low)], dim=-1)
    return torch.cat([header, _nibbles(codes).view(s, 128)], dim=-1)


# ----------------------------------------------------------------------------- dequantization


def _centred(codes: Tensor, offset: int) -> Tensor:
    """uint8 ``codes`` (below 128) minus ``offset``, as float32: subtracted in int8, a quarter of
    the memory traffic of subtracting float32 (the same values: small integers are exact)."""
    return (codes.view(torch.int8) - offset).float()


def _low_nibble_codes(qs: Tensor) -> Tensor:
    """(N, 16) packed nibbles -> (N, 32) codes: low nibbles first, then high nibbles."""
    return _unpack(qs, 4, 2, 1).reshape(qs.shape[0], 32)


def _bit4_codes(qh: Tensor) -> Tensor:
    """(N, 4) little-endian bit mask -> (N, 32) values 0 or 16."""
    return _unpack(qh, 1, 8, 2).reshape(qh.shape[0], 32) << 4


def _dequantize_q8_0(b: Tensor) -> Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16_read(b[:, :2])


def _dequantize_q4_0(b: Tensor) -> Tensor:
    return _f16_read(b[:, :2]) * _centred(_low_nibble_codes(b[:, 2:]), 8)


def _dequantize_q4_1(b: Tensor) -> Tensor:
    return _f16_read(b[:, :2]) * _low_nibble_codes(b[:, 4:]).float() + _f16_read(b[:, 2:4])


def _dequantize_q5_0(b: Tensor) -> Tensor:
    q = _low_nibble_codes(b[:, 6:]) | _bit4_codes(b[:, 2:6])
    return _f16_read(b[:, :2]) * _centred(q, 16)


def _dequantize_q5_1(b: Tensor) -> Tensor:
    q = _low_nibble_codes(b[:, 8:]) | _bit4_codes(b[:, 4:8])
    return _f16_read(b[:, :2]) * q.float() + _f16_read(b[:, 2:4])


def q2_k_groups(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q2_K blocks as ``W = codes * scales + offsets`` per 16 weights: ``(s, 16, 16)`` codes in
    ``[0, 4)``, ``(s, 16)`` float32 scales ``d * sc`` and offsets ``-dmin * m``."""
    s = b.shape[0]
    sc = b[:, :16]
    codes = _unpack(b[:, 16:80].reshape(s, 2, 32), 2, 4, 2).reshape(s, 16, 16)
    d, dmin = _f16_read(b[:, 80:82]), _f16_read(b[:, 82:84])
    return codes, d * (sc & 0x0F).float(), -(dmin * (sc >> 4).float())


def q3_k_groups(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q3_K blocks as ``W = codes * scales + offsets`` per 16 weights: ``(s, 16, 16)`` codes in
    ``[-4, 4)``, ``(s, 16)`` float32 scales ``d * (sc - 32)``, zero offsets."""
    s = b.shape[0]
    high = _unpack(b[:, :32], 1, 8, 1).reshape(s, 16, 16)
    low = _unpack(b[:, 32:96].reshape(s, 2, 32), 2, 4, 2).reshape(s, 16, 16)
    packed = b[:, 96:108]
    sc = torch.cat([packed[:, :8] & 0x0F, packed[:, :8] >> 4], dim=-1)
    sc = sc | (_unpack(packed[:, 8:], 2, 4, 1).reshape(s, 16) << 4)
    scales = _f16_read(b[:, 108:110]) * (sc.float() - 32)
    return low.to(torch.int8) - 4 * (1 - high.to(torch.int8)), scales, torch.zeros_like(scales)


def q6_k_groups(b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Q6_K blocks as ``W = codes * scales + offsets`` per 16 weights: ``(s, 16, 16)`` codes in
    ``[-32, 32)``, ``(s, 16)`` float32 scales ``d * sc``, zero offsets."""
    s = b.shape[0]
    low = _unpack(b[:, :128].reshape(s, 2, 2, 32), 4, 2, 2).reshape(s, 2, 4, 32)
    high = _unpack(b[:, 128:192].reshape(s, 2, 32), 2, 4, 2)
    codes = (low | (high << 4)).reshape(s, 16, 16).view(torch.int8) - 32
    scales = _f16_read(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()
    return codes, scales, torch.zeros_like(scales)


SMALL_GROUP_DECODERS = {"Q2_K": q2_k_groups, "Q3_K": q3_k_groups, "Q6_K": q6_k_groups}
"""The K-quants with a scale per 16 weights, decoded to codes, scales and offsets."""


def _dequantize_small_groups(qtype: str) -> Callable[[Tensor], Tensor]:
    def dequantize(b: Tensor) -> Tensor:
        codes, scales, offsets = SMALL_GROUP_DECODERS[qtype](b)
        return (scales.unsqueeze(-1) * codes.float() + offsets.unsqueeze(-1)).reshape(b.shape[0], QK_K)

    return dequantize


def _dequantize_q45_k(b: Tensor, q: Tensor) -> Tensor:
    """Shared Q4_K/Q5_K decoding of codes q (S, 8, 32) with the 16-byte header of b."""
    scales, mins = _unpack_k_scales(b[:, 4:16])
    d = (_f16_read(b[:, :2]) * scales.float()).unsqueeze(-1)
    m = (_f16_read(b[:, 2:4]) * mins.float()).unsqueeze(-1)
    return (d * q.float() - m).reshape(b.shape[0], QK_K)


def _dequantize_q4_k(b: Tensor) -> Tensor:
    q = _unpack(b[:, 16:].reshape(-1, 4, 32), 4, 2, 2).reshape(-1, 8, 32)
    return _dequantize_q45_k(b, q)


def _dequantize_q5_k(b: Tensor) -> Tensor:
    high = _unpack(b[:, 16:48], 1, 8, 1)
    low = _unpack(b[:, 48:].reshape(-1, 4, 32), 4, 2, 2).reshape(-1, 8, 32)
    return _dequantize_q45_k(b, low | (high << 4))


def _dequantize_iq4_nl(b: Tensor) -> Tensor:
    return _f16_read(b[:, :2]) * _iq4_values(b.device)[_low_nibble_codes(b[:, 2:]).long()]


def _dequantize_iq4_xs(b: Tensor) -> Tensor:
    s = b.shape[0]
    high = _unpack(b[:, 2:4].contiguous().view(torch.int16).to(torch.int32), 2, 8, 1).view(s, 8)
    low = _unpack(b[:, 4:8], 4, 2, 2).reshape(s, 8)
    dl = _f16_read(b[:, :2]) * ((low.to(torch.int32) | (high << 4)).float() - 32)
    codes = _low_nibble_codes(b[:, 8:].reshape(s * 8, 16)).long()
    return (dl.reshape(s * 8, 1) * _iq4_values(b.device)[codes]).reshape(s, QK_K)


# ----------------------------------------------------------------------------- public API

_LEGACY_QUANTIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "F16": _quantize_f16,
    "BF16": _quantize_bf16,
    "Q8_0": _quantize_q8_0,
    "Q5_1": _quantize_q5_1,
    "Q5_0": _quantize_q5_0,
    "Q4_1": _quantize_q4_1,
    "Q4_0": _quantize_q4_0,
}
_WEIGHTED_LEGACY_QUANTIZERS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Q5_1": _quantize_q5_1_weighted,
    "Q5_0": _quantize_q5_0_weighted,
    "Q4_1": _quantize_q4_1_weighted,
    "Q4_0": _quantize_q4_0_weighted,
}
_K_QUANTIZERS: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    "Q6_K": _quantize_q6_k,
    "Q5_K": _quantize_q5_k,
    "Q4_K": _quantize_q4_k,
    "Q3_K": _quantize_q3_k,
    "Q2_K": _quantize_q2_k,
    "IQ4_XS": _quantize_iq4_xs,
    "IQ4_NL": _quantize_iq4_nl,
}
"""Quantizers of (blocks, importance weights or ``None``): the K-quants and the IQ4 types."""
_DEQUANTIZERS: dict[str, Callable[[Tensor], Tensor]] = {
    "Q8_0": _dequantize_q8_0,
    "Q5_1": _dequantize_q5_1,
    "Q5_0": _dequantize_q5_0,
    "Q4_1": _dequantize_q4_1,
    "Q4_0": _dequantize_q4_0,
    "Q6_K": _dequantize_small_groups("Q6_K"),
    "Q5_K": _dequantize_q5_k,
    "Q4_K": _dequantize_q4_k,
    "Q3_K": _dequantize_small_groups("Q3_K"),
    "Q2_K": _dequantize_small_groups("Q2_K"),
    "IQ4_XS": _dequantize_iq4_xs,
    "IQ4_NL": _dequantize_iq4_nl,
}


def _run_chunks(work: Callable[[int], None], starts: range, on_cpu: bool) -> None:
    """Call ``work`` on every chunk start.

    A chunk runs many small kernels. On CPU, spreading the chunks over a thread pool whose
    kernels run single-threaded scales better than intra-op parallelism, and degrades
    gracefully when other processes compete for the cores; torch's intra-op thread count is
    set to 1 meanwhile and restored afterwards. The pool's threads run in the caller's inference
    mode (a thread does not inherit it): their writes land in tensors the caller made.
    """
    threads = torch.get_num_threads()
    if not on_cpu or threads == 1:
        for start in starts:
            work(start)
        return
    inference = torch.is_inference_mode_enabled()

    def in_callers_mode(start: int) -> None:
        with torch.inference_mode(inference):
            work(start)

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max(1, min(threads, len(starts)))) as pool:
            for _ in pool.map(in_callers_mode, starts):
                pass
    finally:
        torch.set_num_threads(threads)


def quantize(weight: Tensor, qtype: str, imatrix: Tensor | None = None) -> Tensor:
    """Quantize ``weight`` (rows, cols) to ``qtype``; returns uint8 (rows, cols / block_size * type_size).

    The bytes are the ggml block layout, row after row, as stored in a GGUF file; leading
    dimensions are kept and the weights are converted to float32 a chunk at a time (a bfloat16 or
    float16 matrix is never held whole in float32: a 128256 x 4096 output head would take 2 GiB). ``imatrix`` (cols,)
    holds llama.cpp importance-matrix values, one per column; F32, F16, BF16 and Q8_0 ignore
    it. Runs on ``weight``'s device.
    """
    bs, ts = _sizes(qtype)
    if weight.dim() == 0:
        raise ValueError(f"{qtype}: cannot quantize a 0-d tensor")
    cols = weight.shape[-1]
    if cols % bs:
        raise ValueError(f"{qtype}: row length {cols} is not a multiple of the block size {bs}")
    out_shape = (*weight.shape[:-1], cols // bs * ts)
    x = weight.detach().contiguous()  # no graph: the chunk threads run with grad mode on
    if qtype == "F32":
        return x.to(torch.float32).view(torch.uint8).reshape(out_shape).clone()
    if imatrix is not None:
        if imatrix.shape != (cols,):
            raise ValueError(f"{qtype}: imatrix has shape {tuple(imatrix.shape)}, expected ({cols},)")
        imatrix = imatrix.to(device=x.device, dtype=torch.float32).view(-1, bs)
        if qtype not in _K_QUANTIZERS and qtype not in _WEIGHTED_LEGACY_QUANTIZERS:
            imatrix = None

    rows = x.view(-1, cols)
    blocks_per_row = cols // bs
    blocks = rows.view(-1, bs)
    out = torch.empty((blocks.shape[0], ts), dtype=torch.uint8, device=x.device)
    if imatrix is not None and qtype in _WEIGHTED_LEGACY_QUANTIZERS:
        # these use the mean of x^2 over the whole row (rows converted a chunk at a time)
        row_sigma2 = torch.cat(
            [part.float().square().sum(-1) for part in rows.split(max(1, _CPU_CHUNK_ELEMENTS // cols))]
        )
        row_sigma2 /= cols
    on_cpu = x.device.type == "cpu"
    chunk = max(1, (_CPU_CHUNK_ELEMENTS if on_cpu else _ACCELERATOR_CHUNK_ELEMENTS) // bs)
    q3_scales = None
    if qtype == "Q3_K" and imatrix is None:
        q3_scales = torch.empty((blocks.shape[0], 16), device=x.device)
        batch = max(1, _Q3_K_SCALE_BATCH_ELEMENTS // bs) if on_cpu else chunk

        def fit_q3_scales(start: int) -> None:
            q3_scales[start : start + batch] = _q3_k_scales(blocks[start : start + batch].float())

        _run_chunks(fit_q3_scales, range(0, blocks.shape[0], batch), on_cpu)

    def quantize_chunk(start: int) -> None:
        part = blocks[start : start + chunk].float()
        qw = None
        if imatrix is not None:
            index = torch.arange(start, start + part.shape[0], device=x.device)
            qw = imatrix[index % blocks_per_row]
        if q3_scales is not None:
            out[start : start + chunk] = _quantize_q3_k(part, None, q3_scales[start : start + chunk])
        elif qtype in _K_QUANTIZERS:
            out[start : start + chunk] = _K_QUANTIZERS[qtype](part, qw)
        elif qw is None:
            out[start : start + chunk] = _LEGACY_QUANTIZERS[qtype](part)
        else:
            sigma2 = row_sigma2[index // blocks_per_row].unsqueeze(-1)
            out[start : start + chunk] = _WEIGHTED_LEGACY_QUANTIZERS[qtype](part, qw * torch.sqrt(sigma2 + part * part))

    _run_chunks(quantize_chunk, range(0, blocks.shape[0], chunk), on_cpu)
    return out.view(out_shape)


def dequantize(data: Tensor, qtype: str, shape: Sequence[int]) -> Tensor:
    """Decode ggml bytes of ``qtype`` into a float32 tensor of ``shape`` (on ``data``'s device)."""
    bs, ts = _sizes(qtype)
    shape = tuple(int(n) for n in shape)
    numel = int(np.prod(shape, dtype=np.int64))
    if not shape or shape[-1] % bs or data.numel() * data.element_size() != numel // bs * ts:
        raise ValueError(f"{qtype}: {data.numel() * data.element_size()} bytes do not encode a tensor of shape {shape}")
    raw = data.contiguous().view(torch.uint8).reshape(-1, ts)
    if qtype == "F32":
        return raw.view(torch.float32).reshape(shape).clone()
    if qtype == "F16":
        return raw.view(torch.float16).float().reshape(shape)
    if qtype == "BF16":
        return (raw.view(torch.int16).to(torch.int32) << 16).view(torch.float32).reshape(shape)
    return _DEQUANTIZERS[qtype](raw).reshape(shape)
