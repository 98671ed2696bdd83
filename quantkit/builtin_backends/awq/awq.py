"""AWQ (Lin et al., 2023) for one group of linears sharing an input, after AutoAWQ.

Per block of a model, the caller: collects the inputs ``x`` of each group of linears; calls
:func:`search_scales` (evaluating the parent module, e.g. attention or MLP, through
``forward_fn``) and folds the result in with :func:`apply_scales_to_previous`; divides the
cached inputs of those linears by the scales; calls :func:`search_clip` / :func:`apply_clip` per
linear (AutoAWQ skips q/k projections); finally :func:`awq_pseudo_quantize` and
:func:`quantkit.builtin_backends.awq.packing.pack_awq`.

Group sizes must divide ``in_features`` (``-1``: one group per row), as in AutoAWQ. Scales are
rounded to float16, the dtype checkpoints store. Without ``zero_point`` weights are quantized
symmetrically to ``[-2**(bits-1), 2**(bits-1) - 1]`` and stored with zero point ``2**(bits-1)``.

Every step works through a weight in blocks of rows (:func:`quantkit.core.linears.row_blocks`) in
float32: besides its inputs and outputs, a step holds a few blocks, never a float copy of a weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantkit.core.errors import QuantizationError
from quantkit.core.linears import all_finite, row_blocks

_MIN_RANGE = 1e-5
CLIP_CHUNK_VALUES = 2**21
"""Values per tensor of the clipping search's chunks (8 MiB in float32): the whole search over a
14336 x 4096 weight took 10.3 s in 64 MiB chunks (2**24 values), 3.1 s at 2**22 and 2.5 s here."""


@dataclass
class AWQQuantized:
    """A quantized weight; ``dequantized == scales[g].T * (intweight - zeros[g].T)`` per group ``g``."""

    intweight: Tensor  # (out, in) int32 in [0, 2**bits)
    scales: Tensor  # (n_groups, out) float16
    zeros: Tensor  # (n_groups, out) int32

    @property
    def dequantized(self) -> Tensor:
        """The float32 weight ``(out, in)`` the codes encode."""
        out_features, in_features = self.intweight.shape
        grouped = self.intweight.reshape(out_features, self.scales.shape[0], -1).float()
        zeros, scales = self.zeros.t().unsqueeze(-1).float(), self.scales.t().unsqueeze(-1).float()
        return ((grouped - zeros) * scales).reshape(out_features, in_features)


@dataclass
class ScaleSearchResult:
    """Best per-input-channel scales of :func:`search_scales` and their grid point and loss."""

    scales: Tensor  # (in,) float32
    ratio: float
    loss: float


def _group_size(in_features: int, group_size: int) -> int:
    if group_size == -1:
        return in_features
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"AWQ needs group_size to divide in_features; got in_features={in_features}, group_size={group_size}"
        )
    return group_size


def _quantize_groups(w: Tensor, bits: int, zero_point: bool) -> tuple[Tensor, Tensor, Tensor]:
    """AutoAWQ's quantizer over the last dim of float ``w (..., group)``.

    Returns integer values (as float), and per-group scales and zero points of shape ``(..., 1)``.
    """
    max_int = 2**bits - 1
    if zero_point:
        max_val, min_val = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
        scales = ((max_val - min_val).clamp(min=_MIN_RANGE) / max_int).half().float()
        zeros = (-torch.round(min_val / scales)).clamp(0, max_int)
    else:
        half = 2 ** (bits - 1)
        scales = (w.abs().amax(-1, keepdim=True).clamp(min=_MIN_RANGE) / (half - 1)).half().float()
        zeros = torch.full_like(scales, half)
    q = torch.clamp(torch.round(w / scales) + zeros, 0, max_int)
    return q, scales, zeros


def _fake_quantize(w: Tensor, bits: int, group_size: int, zero_point: bool) -> Tensor:
    """Quantize-dequantize float ``w (..., in)`` group-wise along the last dim."""
    grouped = w.reshape(*w.shape[:-1], -1, group_size)
    q, scales, zeros = _quantize_groups(grouped, bits, zero_point)
    return ((q - zeros) * scales).reshape(w.shape)


@torch.no_grad()
def awq_pseudo_quantize(weight: Tensor, bits: int = 4, group_size: int = 128, zero_point: bool = True) -> AWQQuantized:
    """Group-quantize ``weight (out, in)`` with AutoAWQ's quantizer (bits 2 to 8)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8]; got {bits}")
    out_features, in_features = weight.shape
    group_size = _group_size(in_features, group_size)
    n_groups = in_features // group_size
    intweight = torch.empty(out_features, in_features, dtype=torch.int32, device=weight.device)
    scales = torch.empty(out_features, n_groups, dtype=torch.float16, device=weight.device)
    zeros = torch.empty(out_features, n_groups, dtype=torch.int32, device=weight.device)
    for rows in row_blocks(weight):
        grouped = weight[rows].float().reshape(-1, n_groups, group_size)
        q, block_scales, block_zeros = _quantize_groups(grouped, bits, zero_point)
        if not torch.isfinite(block_scales).all():
            raise QuantizationError("non-finite AWQ scales: NaN/inf weights or a group range beyond float16")
        intweight[rows] = q.reshape(-1, in_features)
        scales[rows] = block_scales.squeeze(-1)
        zeros[rows] = block_zeros.squeeze(-1)
    return AWQQuantized(intweight=intweight, scales=scales.t().contiguous(), zeros=zeros.t().contiguous())


@torch.no_grad()
def input_channel_mean_abs(x: Tensor, chunk_rows: int = 65536) -> Tensor:
    """Mean ``|x|`` per input channel of activations ``(..., in)``, float32, in bounded memory."""
    rows = x.reshape(-1, x.shape[-1])
    total = torch.zeros(rows.shape[1], dtype=torch.float32, device=x.device)
    for chunk in rows.split(chunk_rows):
        total += chunk.float().abs().sum(0)
    return total / max(rows.shape[0], 1)


def _weight_mean(linears: Sequence[nn.Linear], group_size: int) -> Tensor:
    """Mean over output rows of ``|w|`` normalized by its group's max, per input channel."""
    in_features = linears[0].weight.shape[1]
    total = torch.zeros(in_features, dtype=torch.float64, device=linears[0].weight.device)
    for linear in linears:
        for rows in row_blocks(linear.weight):
            grouped = linear.weight[rows].detach().float().abs().reshape(-1, in_features // group_size, group_size)
            grouped /= grouped.amax(-1, keepdim=True) + 1e-6
            total += grouped.reshape(-1, in_features).sum(0, dtype=torch.float64)
    return (total / sum(linear.weight.shape[0] for linear in linears)).float()


@torch.no_grad()
def search_scales(
    x: Tensor,
    linears: Sequence[nn.Linear],
    w_bits: int = 4,
    group_size: int = 128,
    zero_point: bool = True,
    n_grid: int = 20,
    forward_fn: Callable[[], Tensor] | None = None,
    duo_scaling: bool = True,
    loss_fn: Callable[[Tensor, Tensor], float] | None = None,
) -> ScaleSearchResult:
    """Grid-search AWQ's per-input-channel scales for ``linears``, which all take input ``x (..., in)``.

    For ``ratio`` in ``0, 1/n_grid, ..., (n_grid-1)/n_grid``: ``s = x_mean**ratio`` (divided by
    ``w_mean**(1 - ratio)`` with ``duo_scaling``), normalized by ``sqrt(max(s) * min(s))``; each
    linear's weight is replaced by ``Q(W * s) / s`` and the output is compared (mean squared
    error) with the float output. ``forward_fn`` computes the output the loss is taken on, e.g.
    ``lambda: mlp(x)``; it is called once with the original weights and once per grid point with
    the linears' weights temporarily overwritten in place (they are restored before returning).
    Default: the linears' own outputs on ``x``, concatenated. ``loss_fn(output, reference)``
    replaces the mean squared error (e.g. to sum it over the ranks of a distributed run).
    """
    if not linears:
        raise ValueError("search_scales needs at least one linear")
    in_features = linears[0].weight.shape[1]
    if any(linear.weight.shape[1] != in_features for linear in linears) or x.shape[-1] != in_features:
        raise ValueError("the linears and x must all have the same number of input features")
    group_size = _group_size(in_features, group_size)
    if forward_fn is None:

        def forward_fn() -> Tensor:
            return torch.cat([linear(x) for linear in linears], dim=-1)

    device = linears[0].weight.device
    x_mean = input_channel_mean_abs(x).to(device)
    w_mean = _weight_mean(linears, group_size) if duo_scaling else None
    originals = [linear.weight.detach().clone() for linear in linears]
    reference = forward_fn().float()

    best: ScaleSearchResult | None = None
    try:
        for step in range(n_grid):
            ratio = step / n_grid
            scales = x_mean.pow(ratio)
            if w_mean is not None:
                scales = scales / (w_mean.pow(1 - ratio) + 1e-4)
            scales = scales.clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            scales = torch.where(torch.isfinite(scales), scales, torch.ones_like(scales))
            for linear, original in zip(linears, originals):
                for rows in row_blocks(original):
                    scaled = original[rows].float() * scales
                    linear.weight.data[rows] = _fake_quantize(scaled, w_bits, group_size, zero_point) / scales
            output = forward_fn().float()
            loss = (output - reference).pow(2).mean().item() if loss_fn is None else loss_fn(output, reference)
            if best is None or loss < best.loss:
                best = ScaleSearchResult(scales=scales.clone(), ratio=ratio, loss=loss)
    finally:
        for linear, original in zip(linears, originals):
            linear.weight.data.copy_(original)
    if best is None:
        raise QuantizationError(f"AWQ scale search found no finite loss over {n_grid} grid points")
    return best


@torch.no_grad()
def apply_scales_to_previous(
    prev: nn.Module, linears: Sequence[nn.Linear], scales: Tensor, norm_weight_offset: float = 0.0
) -> None:
    """Fold ``scales (in,)`` into a block in place: ``prev`` outputs ``y / s``, the linears take ``W * s``.

    ``prev`` is a ``nn.Linear`` (its last ``len(scales)`` output rows and bias entries are divided,
    as AutoAWQ does for fused projections) or a norm with a 1-D ``weight`` (and optional ``bias``),
    LayerNorm or RMSNorm. Norms that multiply by ``offset + weight`` (Gemma: 1) need ``norm_weight_offset``.
    """
    weight, bias = getattr(prev, "weight", None), getattr(prev, "bias", None)
    n = scales.numel()
    if not isinstance(weight, Tensor) or not (isinstance(prev, nn.Linear) or weight.shape == (n,)):
        raise TypeError(
            f"cannot fold AWQ scales into {type(prev).__name__}: need nn.Linear or a norm with weight ({n},)"
        )
    scales = scales.detach().float().to(weight.device)
    if isinstance(prev, nn.Linear):
        scaled = weight[weight.shape[0] - n :]
        for rows in row_blocks(scaled):
            scaled[rows] = scaled[rows].float() / scales[rows].view(-1, 1)
    else:
        weight.copy_((weight.float() + norm_weight_offset) / scales - norm_weight_offset)
    if bias is not None:
        bias[-n:].copy_(bias[-n:].float() / scales)
    for linear in linears:
        for rows in row_blocks(linear.weight):
            linear.weight[rows] = linear.weight[rows].float() * scales.to(linear.weight.device)
    for param in (*prev.parameters(), *(p for linear in linears for p in linear.parameters())):
        if not all_finite(param):
            raise QuantizationError("folding AWQ scales produced non-finite parameters")


@torch.no_grad()
def group_gram_sum(x: Tensor, group_size: int, device: torch.device, max_elements: int = 2**24) -> Tensor:
    """Per input group of ``group_size`` channels, ``sum_t x_t x_t^T`` over the rows of ``x (..., in)``:
    ``(n_groups, group_size, group_size)`` float32 on ``device``, in chunks of about ``max_elements``."""
    in_features = x.shape[-1]
    group_size = _group_size(in_features, group_size)
    n_groups = in_features // group_size
    rows = x.reshape(-1, in_features)
    gram = torch.zeros(n_groups, group_size, group_size, device=device)
    for chunk in rows.split(max(1, max_elements // in_features)):
        grouped_x = chunk.to(device=device, dtype=torch.float32).reshape(-1, n_groups, group_size)
        gram.baddbmm_(grouped_x.permute(1, 2, 0), grouped_x.transpose(0, 1))
    return gram


@torch.no_grad()
def search_clip(
    weight: Tensor,
    x: Tensor,
    w_bits: int = 4,
    group_size: int = 128,
    zero_point: bool = True,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    max_elements: int = CLIP_CHUNK_VALUES,
) -> Tensor:
    """AutoAWQ's clipping search: the best ``max_val (out, n_groups)`` to clamp each group to, on
    inputs ``x (..., in)`` (pass inputs already divided by any folded AWQ scales); see
    :func:`search_clip_gram`, which it calls with the mean Gram matrices of ``x``."""
    _group_size(weight.shape[1], group_size)
    gram = group_gram_sum(x, group_size, weight.device, max_elements)
    gram /= max(x.numel() // x.shape[-1], 1)
    return search_clip_gram(weight, gram, w_bits, group_size, zero_point, n_grid, max_shrink, max_elements)


@torch.no_grad()
def search_clip_gram(
    weight: Tensor,
    gram: Tensor,
    w_bits: int = 4,
    group_size: int = 128,
    zero_point: bool = True,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    max_elements: int = CLIP_CHUNK_VALUES,
) -> Tensor:
    """AutoAWQ's clipping search given the inputs' per-group mean ``x x^T`` (``gram``, from
    :func:`group_gram_sum` divided by the number of rows).

    For every group, clamps to ``±max|w| * (1 - i / n_grid)``, ``i < max_shrink * n_grid``, and
    keeps the shrink whose quantized weights give the least mean squared output error
    ``mean_t (dw . x_t)^2``, computed exactly through each group's Gram matrix; work is chunked
    over output rows to about ``max_elements`` values per tensor.
    """
    out_features, in_features = weight.shape
    group_size = _group_size(in_features, group_size)
    n_groups = in_features // group_size

    shrink = 1 - torch.arange(max(1, int(max_shrink * n_grid)), device=weight.device) / n_grid
    best = torch.empty(out_features, n_groups, device=weight.device)
    for rows in row_blocks(weight, max(1, max_elements // len(shrink))):
        w_chunk = weight[rows].detach().float().reshape(-1, n_groups, group_size)
        max_val = w_chunk.abs().amax(-1) * shrink.view(-1, 1, 1)  # (shrinks, rows, groups)
        limit = max_val.unsqueeze(-1)
        clipped = torch.clamp(w_chunk, -limit, limit)
        q, scales, zeros = _quantize_groups(clipped, w_bits, zero_point)
        delta = ((q - zeros) * scales - w_chunk).permute(2, 0, 1, 3).flatten(1, 2)  # (groups, shrinks*rows, group)
        err = ((delta @ gram) * delta).sum(-1).view(n_groups, len(shrink), -1)  # (groups, shrinks, rows)
        choice = err.argmin(1).t()  # (rows, groups)
        best[rows] = max_val.gather(0, choice.unsqueeze(0)).squeeze(0)
    return best


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: Tensor) -> None:
    """Clamp ``linear``'s weight in place to ``±max_val`` per ``(out, group)`` from :func:`search_clip`."""
    in_features = linear.weight.shape[1]
    limit = max_val.to(device=linear.weight.device, dtype=torch.float32).unsqueeze(-1)
    for rows in row_blocks(linear.weight):
        grouped = linear.weight[rows].float().reshape(-1, max_val.shape[1], in_features // max_val.shape[1])
        linear.weight[rows] = torch.clamp(grouped, -limit[rows], limit[rows]).reshape(-1, in_features)
