"""GPTQ for one linear layer (Frantar et al., 2022), after the auto-gptq / GPTQModel reference.

Usage: feed the layer's calibration inputs to a :class:`quantkit.layerwise.HessianAccumulator`, then call
:func:`gptq_quantize` with the layer weight and ``accumulator.H``; pack the result with
:func:`quantkit.builtin_backends.gptq.packing.pack_gptq`. :func:`rtn_quantize` is the round-to-nearest baseline
with the same quantizer and result type.

The min/max quantizer follows the reference with three changes that keep every result storable
in a GPTQ v1 checkpoint exactly as computed: scales are rounded to float16 (the stored dtype)
before the weights are rounded against them; an asymmetric group whose zero point would be 0
(all its weights >= 0, which v1 cannot store) gets zero point 1 and a range stretched to fit;
and a symmetric group always spans ``[-max|w|, max|w|]``. GPTQ's group parameters are computed
when the column loop enters a group, from the group's error-compensated weights.

Three refinements of GPTQModel are options of :func:`gptq_quantize`: group-aware activation
reordering (``act_group_aware``, Gafni et al. 2025: columns sorted by Hessian diagonal within each
group, groups by their largest diagonal, so the stored groups stay contiguous), a searched range
per group (``mse``: the shrink of the min/max range with the least ``sum |w - q|**mse``), and
dampening raised by fixed steps until the Hessian factorizes (``damp_auto_increment``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from torch.nn import functional as F

from quantkit.core.errors import QuantizationError
from quantkit.core.linears import all_finite

_FP16_MIN_SUBNORMAL = 2.0**-24
_FP16_MAX = 65504.0
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_COARSE_STEP = 4
"""The searched range tries the shrinks ``1 - i / MSE_GRID`` of the min/max range, ``i < MSE_MAX_SHRINK *
MSE_GRID`` (the grid of GPTQ's and GPTQModel's quantizer), coarse to fine: every ``MSE_COARSE_STEP``-th
shrink, then each row's ``2 * (MSE_COARSE_STEP - 1)`` neighbours of its best one."""
_MSE_CHUNK_ELEMENTS = 2**18  # a (shrinks, k, out) slab that stays in the L2 cache
_REVERSE_CHUNK_ELEMENTS = 2**18


@dataclass
class GPTQResult:
    """A quantized layer: integer codes, their groups' scales and zero points."""

    intweight: Tensor  # (out, in) int32 in [0, 2**bits)
    scales: Tensor  # (n_groups, out) float16
    zeros: Tensor  # (n_groups, out) int32 in [1, 2**bits)
    g_idx: Tensor  # (in,) int32
    bits: int
    loss: float | None  # GPTQ's proxy loss, ~ mean over samples of ||(W - Q) x||^2; None for RTN
    damp_percent: float | None  # dampening that made the Hessian invertible; None for RTN

    @cached_property
    def dequantized(self) -> Tensor:
        """``scales[g_idx].T * (intweight - zeros[g_idx].T)``, ``(out, in)`` float32: computed when
        asked for (packing a layer needs only the codes)."""
        groups = self.g_idx.long()
        scales = self.scales.float()
        weight = torch.empty_like(self.intweight, dtype=scales.dtype)
        return torch.sub(self.intweight, self.zeros[groups].t(), out=weight).mul_(scales[groups].t())


def _validate(weight: Tensor, bits: int, group_size: int) -> int:
    """Check the common arguments; return the effective group size."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in); got shape {tuple(weight.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8]; got {bits}")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be -1 (one group per row) or positive; got {group_size}")
    if not all_finite(weight):
        raise QuantizationError("weight contains NaN or infinite values")
    return weight.shape[1] if group_size == -1 else group_size


def _minmax_params(xmin: Tensor, xmax: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale (float16-representable, as float32) and integer zero point from per-row min/max."""
    maxq = 2**bits - 1
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = xmin.masked_fill(empty, -1.0), xmax.masked_fill(empty, 1.0)

    def fp16_scale(value: Tensor) -> Tensor:
        return value.clamp(_FP16_MIN_SUBNORMAL, _FP16_MAX).half().float()

    scale = fp16_scale((xmax - xmin) / maxq)
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    lifted = zero == 0
    scale = torch.where(lifted, fp16_scale(xmax / (maxq - 1)), scale)
    return scale, zero.masked_fill(lifted, 1.0)


def _range_errors(
    members: Tensor, xmin: Tensor, xmax: Tensor, shrinks: Tensor, bits: int, sym: bool, mse: float
) -> Tensor:
    """``sum |w - q|**mse`` ``(n, out)`` of ``members (k, out)`` quantized on each of the ``n`` shrunk
    ranges ``shrinks * [xmin, xmax]`` (``shrinks``: ``(n, 1)`` for every row, or ``(n, out)``)."""
    maxq = 2**bits - 1
    errors = []
    for p in shrinks.split(max(1, _MSE_CHUNK_ELEMENTS // members.numel())):
        scale, zero = _minmax_params(p * xmin, p * xmax, bits, sym)
        scale, zero = scale.unsqueeze(1), zero.unsqueeze(1)
        error = torch.div(members, scale).round_().add_(zero).clamp_(0, maxq).sub_(zero).mul_(scale).sub_(members)
        errors.append(error.abs_().pow_(mse).sum(1))
    return torch.cat(errors)


def _fit_params(members: Tensor, bits: int, sym: bool, mse: float) -> tuple[Tensor, Tensor]:
    """Scale and zero point ``(out,)`` of one group ``members (k, out)``: min/max, or with ``mse > 0``
    the shrink ``p`` of the min/max range whose quantization error ``sum |w - q|**mse`` is least on
    the coarse-to-fine grid of ``MSE_COARSE_STEP`` (ties: the widest range)."""
    xmin, xmax = members.amin(0), members.amax(0)
    if mse == 0:
        return _minmax_params(xmin, xmax, bits, sym)
    n = int(MSE_MAX_SHRINK * MSE_GRID)
    coarse = torch.arange(0, n, MSE_COARSE_STEP, device=members.device)
    best = coarse[_range_errors(members, xmin, xmax, 1 - coarse.view(-1, 1) / MSE_GRID, bits, sym, mse).argmin(0)]
    offsets = torch.arange(1 - MSE_COARSE_STEP, MSE_COARSE_STEP, device=members.device).view(-1, 1)
    fine = 1 - (best + offsets).clamp_(0, n - 1) / MSE_GRID  # (2 * step - 1, out), widest range first
    shrink = fine.gather(0, _range_errors(members, xmin, xmax, fine, bits, sym, mse).argmin(0, keepdim=True))[0]
    return _minmax_params(shrink * xmin, shrink * xmax, bits, sym)


def _group_params(weight: Tensor, group_size: int, bits: int, sym: bool, mse: float = 0.0) -> tuple[Tensor, Tensor]:
    """Quantizer params ``(n_groups, out)`` of every run of ``group_size`` inputs of ``weight (out, in)``
    (the last one ragged where ``in`` is not a multiple)."""
    if mse > 0:
        starts = range(0, weight.shape[1], group_size)
        params = [_fit_params(weight[:, g : g + group_size].t(), bits, sym, mse) for g in starts]
        return torch.stack([p[0] for p in params]), torch.stack([p[1] for p in params])
    # zeros completing a ragged group change no range: the min/max range always spans 0
    xmin, xmax = _groups(weight, group_size).aminmax(dim=-1)
    scale, zero = _minmax_params(xmin, xmax, bits, sym)
    return scale.t().contiguous(), zero.t().contiguous()


def _groups(weight: Tensor, group_size: int) -> Tensor:
    """``weight (out, in)`` as ``(out, n_groups, group_size)``, a ragged last group completed with zeros."""
    padding = -weight.shape[1] % group_size
    return (F.pad(weight, (0, padding)) if padding else weight).view(weight.shape[0], -1, group_size)


def _finish(
    intweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    g_idx: Tensor,
    bits: int,
    loss: float | None,
    damp: float | None,
) -> GPTQResult:
    """The result of float codes and parameters (a NaN in them, from a solve that overflowed, raises:
    the scales' clamp to float16's range and the codes' to ``[0, 2**bits)`` let it through)."""
    if not (all_finite(scales) and all_finite(intweight)):
        raise QuantizationError("quantization produced non-finite weights")
    return GPTQResult(
        intweight=intweight.to(torch.int32),
        scales=scales.half(),
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        bits=bits,
        loss=loss,
        damp_percent=damp,
    )


@torch.no_grad()
def rtn_quantize(
    weight: Tensor, bits: int = 4, group_size: int = 128, sym: bool = True, mse: float = 0.0
) -> GPTQResult:
    """Round-to-nearest with GPTQ's quantizer; ragged last groups use ``ceil(in / group_size)`` groups."""
    group_size = _validate(weight, bits, group_size)
    w = weight.float()
    out_features, in_features = w.shape
    scales, zeros = _group_params(w, group_size, bits, sym, mse)
    # clamp(round(w / s) + z, 0, maxq), in place, each group's parameters broadcast over its inputs
    q = _groups(w, group_size) / scales.t().unsqueeze(-1)
    del w
    q.round_().add_(zeros.t().unsqueeze(-1)).clamp_(0, 2**bits - 1)
    g_idx = torch.arange(in_features, device=q.device) // group_size
    return _finish(q.view(out_features, -1)[:, :in_features], scales, zeros, g_idx, bits, loss=None, damp=None)


def _reverse_(matrix: Tensor) -> Tensor:
    """``matrix.flip(0, 1)`` in place: a contiguous matrix read backwards, a chunk at a time."""
    flat = matrix.view(-1)
    n = flat.numel()
    for start in range(0, n // 2, _REVERSE_CHUNK_ELEMENTS):
        end = min(start + _REVERSE_CHUNK_ELEMENTS, n // 2)
        low, high = flat[start:end], flat[n - end : n - start]
        kept = low.clone()
        low.copy_(high.flip(0))
        high.copy_(kept.flip(0))
    return matrix


def _invert_hessian_(H: Tensor, damp_percent: float, damp_auto_increment: float) -> tuple[Tensor, float]:
    """Overwrite ``H`` with the upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; while
    the damped matrix does not factorize, ``damp`` grows by ``damp_auto_increment`` (below 1; 0: no
    retry). One more matrix of ``H``'s size is held meanwhile."""
    mean_diag = H.diagonal().mean()
    damp = damp_percent
    info = torch.empty((), dtype=torch.int32, device=H.device)
    # With P the reversal permutation and P H P = L L^T, H^-1 = U^T U for U = P L^-1 P (upper,
    # positive diagonal): the factor without forming H^-1 (one Cholesky, one triangular solve).
    # LAPACK works in place on columns: ``lower`` is the transposed view of a matrix holding
    # P H^T P, so its lower triangle is P H P's and the factor needs no further copy.
    flipped = torch.empty(H.shape, dtype=H.dtype, device=H.device)
    lower = flipped.mT
    while True:
        _reverse_(flipped.copy_(H.mT)).diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(lower, out=(lower, info))
        if info.item() == 0:
            break
        next_damp = damp + damp_auto_increment
        if not damp < next_damp < 1:
            raise QuantizationError(
                f"the Hessian is not positive definite even with damp_percent={damp:g} "
                f"(damp_auto_increment={damp_auto_increment:g}); use more or more varied calibration samples"
            )
        damp = next_damp
    H.zero_().diagonal().fill_(1)
    _reverse_(torch.linalg.solve_triangular(lower, H, upper=False, out=H))
    if not all_finite(H):
        raise QuantizationError(f"the inverse Hessian overflows float32 with damp_percent={damp:g}; raise damp_percent")
    return H, damp


def group_aware_order(diag: Tensor, group_size: int) -> Tensor:
    """GAR's column order: within each full group by decreasing ``diag``, full groups by decreasing
    largest ``diag`` (ties keep their order), a ragged last group last and unsorted."""
    n_full = diag.numel() // group_size
    grouped = diag[: n_full * group_size].view(n_full, group_size)
    values, local = torch.sort(grouped, dim=1, descending=True, stable=True)
    order = torch.argsort(values[:, 0], descending=True, stable=True)
    columns = (local + torch.arange(n_full, device=diag.device).view(-1, 1) * group_size)[order].reshape(-1)
    return torch.cat((columns, torch.arange(n_full * group_size, diag.numel(), device=diag.device)))


@torch.no_grad()
def gptq_quantize(
    weight: Tensor,
    H: Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    static_groups: bool = False,
    damp_percent: float = 0.05,
    block_size: int = 128,
    act_group_aware: bool = True,
    damp_auto_increment: float = 0.01,
    mse: float = 0.0,
    overwrite_hessian: bool = False,
) -> GPTQResult:
    """Quantize ``weight (out, in)`` with GPTQ against the Hessian ``H (in, in)``.

    Inputs whose Hessian diagonal is 0 (never active) get weight 0. ``desc_act`` quantizes the
    columns in order of decreasing Hessian diagonal; groups are then formed in that order (so
    ``g_idx`` is not sorted) unless ``static_groups``, which fixes every group's parameters up
    front from the unpermuted weight. Without ``desc_act``, ``act_group_aware`` quantizes the
    groups in order of their largest Hessian diagonal and each group's columns in order of
    decreasing diagonal: ``g_idx`` stays sorted (a ragged last group stays last). ``mse > 0``
    searches each group's range (:func:`_fit_params`). Ragged last groups use
    ``ceil(in / group_size)`` groups. Runs on ``weight.device``; ``weight`` is not modified, nor
    is ``H`` unless ``overwrite_hessian`` (a float32 ``H`` on that device is then the solve's
    working matrix: its memory is not needed twice). Besides the weight's copies, the solve holds
    two matrices of ``H``'s size at most.
    """
    group_size = _validate(weight, bits, group_size)
    if not 0 < damp_percent < 1:
        raise ValueError(f"damp_percent must be in (0, 1); got {damp_percent}")
    if not 0 <= damp_auto_increment < 1:
        raise ValueError(f"damp_auto_increment must be in [0, 1); got {damp_auto_increment}")
    if mse < 0:
        raise ValueError(f"mse must be 0 (min/max) or a positive norm exponent; got {mse}")
    out_features, in_features = weight.shape
    if H.shape != (in_features, in_features):
        raise ValueError(f"H has shape {tuple(H.shape)}; expected ({in_features}, {in_features})")
    device = weight.device
    H = H.to(device, torch.float32, memory_format=torch.contiguous_format, copy=not overwrite_hessian)
    if not all_finite(H):
        raise QuantizationError("the Hessian contains NaN or infinite values")
    dead = H.diagonal() == 0
    H[dead, dead] = 1

    if desc_act:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    elif act_group_aware:
        perm = group_aware_order(H.diagonal(), group_size)
    else:
        perm = None
    if perm is not None:
        torch.index_select(H[perm], 1, perm, out=H)
    Hinv, damp = _invert_hessian_(H, damp_percent, damp_auto_increment)
    del H

    W = weight.to(torch.float32, copy=True)
    W[:, dead] = 0
    maxq = 2**bits - 1
    n_groups = -(-in_features // group_size)
    natural_groups = torch.arange(in_features, device=device) // group_size
    if static_groups:
        scales, zeros = _group_params(W, group_size, bits, sym, mse)
    else:
        scales = W.new_empty(n_groups, out_features)
        zeros = W.new_empty(n_groups, out_features)
    if perm is not None:
        W = W[:, perm]
    # Group of each column in quantization order: act-order without static groups forms the groups
    # in that order; otherwise every column keeps its natural group.
    column_groups = natural_groups if perm is None or (desc_act and not static_groups) else natural_groups[perm]
    column_group_list = column_groups.tolist()

    # The column loop runs on W transposed, (in, out): each input column is a contiguous row,
    # which makes its rank-1 updates about 4x faster on CPU than on strided columns.
    Wt = W.t().contiguous()
    del W
    Qt = torch.empty_like(Wt)
    loss = Wt.new_zeros(())
    for b0 in range(0, in_features, block_size):
        b1 = min(b0 + block_size, in_features)
        W1 = Wt[b0:b1].clone()
        Hinv1 = Hinv[b0:b1, b0:b1]
        Err1 = torch.empty_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            g = column_group_list[col]
            if not static_groups and col % group_size == 0:
                end = min(col + group_size, in_features)
                members = W1[i : end - b0]
                if end > b1:  # the group runs past this block: add the block's updates so far
                    tail = Wt[b1:end] - Hinv[b0:col, b1:end].t() @ Err1[:i]
                    members = torch.cat((members, tail), 0)
                scales[g], zeros[g] = _fit_params(members, bits, sym, mse)
            w = W1[i]
            q = torch.clamp(torch.round(w / scales[g]) + zeros[g], 0, maxq)
            Qt[col] = q
            err = (w - scales[g] * (q - zeros[g])) / Hinv1[i, i]
            W1[i + 1 :].addr_(Hinv1[i, i + 1 :], err, alpha=-1)
            Err1[i] = err
        loss += Err1.square().sum() / 2
        Wt[b1:].addmm_(Hinv[b0:b1, b1:].t(), Err1, alpha=-1)
    del Wt, Hinv  # two copies of the codes at most from here on
    if perm is not None:
        inverse = torch.argsort(perm)
        Qt, column_groups = Qt[inverse], column_groups[inverse]
    Q = Qt.t().contiguous()
    del Qt
    return _finish(Q, scales, zeros, column_groups, bits, loss=loss.item(), damp=damp)
