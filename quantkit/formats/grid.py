"""One quantized linear as integer codes on a grid, independent of how a format packs them.

``W[o, i] = scales[g, o] * (codes[o, i] - zeros[g, o])`` with ``g = g_idx[i]``: the form GPTQ, AWQ,
round-to-nearest and compressed-tensors' integer schemes share. A layer moves between formats
through a :class:`GridWeight`; :func:`fit` says whether a target format holds it exactly (every
weight dequantizing to the same float32, checked bit for bit) and, if not, why, and re-quantizes
it by round-to-nearest only when a lossy conversion is allowed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from quantkit.builtin_backends.awq.config import AWQConfig
from quantkit.builtin_backends.gptq.gptq import rtn_quantize
from quantkit.builtin_backends.gptq.packing import SUPPORTED_BITS
from quantkit.core.errors import QuantkitError

log = logging.getLogger("quantkit")

AWQ_GROUP_SIZES: tuple[int, ...] = AWQConfig.__dataclass_fields__["group_size"].metadata["choices"]


class LossyConversionError(QuantkitError, ValueError):
    """A conversion would change weights; ``allow_lossy=True`` (``--allow-lossy``) re-quantizes instead."""


@dataclass(frozen=True)
class GridWeight:
    """A group-quantized linear: unsigned codes, zero points, scales and the group of every input."""

    codes: Tensor
    """``(out, in)`` int32 codes in ``[0, 2**bits)``."""
    zeros: Tensor
    """``(n_groups, out)`` int32 zero points (``2**(bits-1)`` everywhere for a symmetric grid)."""
    scales: Tensor
    """``(n_groups, out)`` float scales, in the dtype their format stores."""
    g_idx: Tensor
    """``(in,)`` int64 group of every input."""
    bits: int
    bias: Tensor | None

    @classmethod
    def of(cls, module: nn.Module) -> GridWeight:
        """The grid of a quantkit GPTQ/RTN (``GPTQLinear``) or AWQ (``AWQLinear``) layer."""
        codes, zeros, scales = module.grouped_codes()
        return cls(codes.int(), zeros.int(), scales, module.group_index().long(), module.bits, module.bias)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def group_size(self) -> int | None:
        """Inputs per group when groups are contiguous runs (the last may be shorter); ``None`` for act-order."""
        size = int(torch.count_nonzero(self.g_idx == 0))
        contiguous = torch.arange(self.g_idx.numel(), device=self.g_idx.device) // size
        return size if torch.equal(self.g_idx, contiguous) else None

    @property
    def symmetric(self) -> bool:
        """Every zero point at the grid's middle: the grid of a symmetric scheme."""
        return bool((self.zeros == 2 ** (self.bits - 1)).all())

    def dequantize(self) -> Tensor:
        """The float32 weight ``(out, in)``."""
        return self.scales.float()[self.g_idx].t() * (self.codes - self.zeros[self.g_idx].t())


@dataclass(frozen=True)
class Grid:
    """A scheme: ``bits``, groups of ``group_size`` inputs (-1: one per row), symmetry, act-order groups."""

    bits: int
    group_size: int
    symmetric: bool
    act_order: bool = False


def schemes(weights: Mapping[str, GridWeight]) -> dict[str, Grid]:
    """The scheme of every layer. One group per row is per-channel (-1), unless the row is exactly one
    group of the size the model's other layers use (the 64-input layers of a group-64 model)."""
    sizes = {int(torch.count_nonzero(w.g_idx == 0)) for w in weights.values() if w.n_groups > 1}
    common = sizes.pop() if len(sizes) == 1 else None
    found = {}
    for name, w in weights.items():
        size = int(torch.count_nonzero(w.g_idx == 0))
        if w.n_groups == 1 and size != common:
            size = -1
        found[name] = Grid(w.bits, size, w.symmetric, w.group_size is None)
    return found


def problems(weight: GridWeight, fmt: str) -> list[str]:
    """Why format ``fmt`` cannot hold ``weight`` exactly (empty: it can)."""
    out_features, in_features = weight.codes.shape
    found = []
    size = weight.group_size
    if fmt in ("awq", "compressed-tensors") and size is None:
        found.append(
            f"act-order groups (g_idx not in contiguous runs) cannot be stored in {fmt}"
            + (" (compressed-tensors 0.20 removed actorder='group')" if fmt == "compressed-tensors" else "")
        )
    if fmt in ("awq", "compressed-tensors") and size is not None and in_features % size:
        found.append(f"{fmt} needs groups that divide in_features={in_features}; the group size is {size}")
    if fmt == "gptq":
        if weight.bits not in SUPPORTED_BITS:
            found.append(f"GPTQ stores bits in {SUPPORTED_BITS}, not {weight.bits}")
        if weight.zeros.numel() and int(weight.zeros.min()) < 1:
            found.append("zero point 0 cannot be stored in GPTQ v1 (it stores zero - 1)")
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if n * weight.bits % 32:
                found.append(f"GPTQ packs {name}={n} x {weight.bits} bits into whole 32-bit words")
    if fmt == "awq":
        if weight.bits != 4:
            found.append(f"AWQ stores 4-bit codes, not {weight.bits}-bit")
        if size is not None and weight.n_groups > 1 and size not in AWQ_GROUP_SIZES:
            found.append(f"AWQ's group sizes are {AWQ_GROUP_SIZES}, not {size}")
        if weight.n_groups == 1 and in_features not in AWQ_GROUP_SIZES:
            found.append(f"AWQ has no per-channel scheme (one group of {in_features} inputs)")
        if out_features % 8:
            found.append(f"AWQ packs out_features={out_features} in words of 8")
    if fmt in ("gptq", "awq") and weight.scales.dtype != torch.float16:
        cast = weight.scales.to(torch.float16)
        if not torch.equal(cast.to(weight.scales.dtype), weight.scales):
            found.append(f"{weight.scales.dtype} scales are not all exact in {fmt}'s float16")
    return found


def nearest_grid(weight: GridWeight, fmt: str) -> Grid:
    """The grid of format ``fmt`` closest to ``weight``'s: the one a lossy conversion re-quantizes to."""
    in_features = weight.codes.shape[1]
    size = weight.group_size or int(torch.count_nonzero(weight.g_idx == 0))
    size = -1 if size == in_features else size
    bits = weight.bits
    if fmt == "awq":
        bits = 4
    elif fmt == "gptq" and bits not in SUPPORTED_BITS:
        bits = min(b for b in SUPPORTED_BITS if b >= bits)
    return Grid(bits, size, weight.symmetric)


def fit(weight: GridWeight, fmt: str, name: str, *, allow_lossy: bool) -> GridWeight:
    """``weight`` as format ``fmt`` will hold it (scales cast to float16 for GPTQ and AWQ).

    A weight the format cannot hold exactly raises :class:`LossyConversionError` naming the layer and the
    reasons, unless ``allow_lossy``: then it is re-quantized by round-to-nearest on the nearest grid the
    format holds (:func:`nearest_grid`); a grid no format rule allows even then is refused.
    """
    reasons = problems(weight, fmt)
    if reasons and not allow_lossy:
        raise LossyConversionError(
            f"{name}: converting to {fmt} is not exact: {'; '.join(reasons)}; pass allow_lossy=True "
            "(--allow-lossy) to re-quantize it by round-to-nearest"
        )
    if reasons:
        grid = nearest_grid(weight, fmt)
        float_weight = weight.dequantize()
        result = rtn_quantize(float_weight, bits=grid.bits, group_size=grid.group_size, sym=grid.symmetric)
        converted = GridWeight(
            result.intweight.int(), result.zeros.int(), result.scales, result.g_idx.long(), grid.bits, weight.bias
        )
        still = problems(converted, fmt)
        if still:
            raise LossyConversionError(f"{name}: cannot be stored in {fmt} even re-quantized: {'; '.join(still)}")
        error = (converted.dequantize() - float_weight).abs().max().item()
        log.warning("%s: re-quantized for %s (%s); max weight change %.3g", name, fmt, "; ".join(reasons), error)
        return converted
    converted = weight if fmt == "compressed-tensors" else replace(weight, scales=weight.scales.to(torch.float16))
    if not torch.equal(converted.dequantize(), weight.dequantize()):
        raise LossyConversionError(f"{name}: converting to {fmt} changed weights although no rule says it would")
    return converted
