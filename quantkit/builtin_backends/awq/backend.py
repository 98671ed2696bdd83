"""AWQ backend: activation-aware scaling and clipping in plain torch, AutoAWQ checkpoints.

Per decoder layer (through :mod:`quantkit.layerwise`), as AutoAWQ does for Llama:

1. one forward pass collects, for each group of linears sharing an input (q/k/v after
   ``input_layernorm``; o after ``v_proj``; gate/up after ``post_attention_layernorm``; down
   after ``up_proj``), the mean ``|x|`` of every input channel over all calibration tokens,
   and keeps the inputs of the first ``search_tokens`` tokens;
2. per group, grid-searches the per-channel scales (:func:`quantkit.builtin_backends.awq.awq.search_scales`)
   that minimise the error of the group's consumer (the attention block for q/k/v, the MLP
   for gate/up, the linear itself otherwise) on those kept tokens, and folds them into the
   preceding norm or linear; o is scaled only when ``v_proj`` and ``o_proj`` have the same
   shape (no grouped-query attention), and a group with an unquantized member is not scaled;
3. searches a clipping range per linear except q/k (:func:`quantkit.builtin_backends.awq.awq.search_clip`);
4. quantizes with zero points (or symmetric) and packs into the AutoAWQ GEMM (or GEMV) layout.

The pipeline then runs the quantized layer to get the next layer's inputs.

Under ``torchrun`` (:mod:`quantkit.distributed`) each rank keeps the search samples it holds
(the first ``search_tokens // seqlen`` calibration samples, spread over the ranks); the channel
statistics, every grid point's loss and the clipping Gram matrices are summed over the ranks,
so every rank picks the same scales; each clipping search runs on one rank, which broadcasts
its result.

AWQ's formats store ``in_features / group_size`` groups per row, so ``group_size`` must divide
every quantized layer's ``in_features`` (:data:`AWQ_SHAPE_LIMITS`): otherwise a
:class:`QuantizationError` names the layers (SmolLM2-135M's 576-wide inputs take group_size 32
or 64, not 128).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from quantkit.core.backend import Backend
from quantkit.core.capabilities import ALL_HARDWARE, Capabilities, ShapeLimit
from quantkit.layerwise import LayerContext, LinearGroup, quantize_layerwise

from .awq import (
    apply_clip,
    apply_scales_to_previous,
    group_gram_sum,
    search_clip_gram,
    search_scales,
)
from .config import PRESETS, AWQConfig
from .packing import gemv_group_width
from .qlinear import AWQLinear

log = logging.getLogger("quantkit")

DEFAULT_SEARCH_TOKENS = 1024


AWQ_SHAPE_LIMITS = (
    ShapeLimit("in_features", "group_size", "the format stores in_features / group_size groups per row"),
    ShapeLimit("out_features", 8, "the GEMM layout packs 8 outputs per 32-bit word", when={"version": "gemm"}),
    ShapeLimit("in_features", 8, "the GEMV layout packs 8 inputs per 32-bit word", when={"version": "gemv"}),
)
"""What AutoAWQ's formats need of a linear."""


class _AWQLayerQuantizer:
    """AWQ's step of :func:`quantkit.layerwise.quantize_layerwise`: the scale search and the clipping
    search evaluate on the first ``search_samples`` calibration samples (chunk 0 in one process)."""

    def __init__(self, search_samples: int):
        self.search_samples = search_samples

    def __call__(self, ctx: LayerContext) -> None:
        groups = ctx.target_groups()
        heads = [members[0] for _, members in groups]
        sums = dict.fromkeys(heads, 0.0)
        counts = dict.fromkeys(heads, 0)
        parts: dict[str, list[Tensor]] = {head: [] for head in heads}
        empty: dict[str, Tensor] = {}

        def observer(head: str):
            def observe(x: Tensor, chunk: int) -> None:
                rows = x.reshape(-1, x.shape[-1])
                # summed in float64: the order of the samples does not show at float32 precision
                sums[head] = sums[head] + rows.abs().sum(0, dtype=torch.float64)
                counts[head] += rows.shape[0]
                keep = int((ctx.sample_ids[chunk] < self.search_samples).sum())
                if keep:
                    parts[head].append(x[:keep].detach())
                empty[head] = x[:0].detach()

            return observe

        ctx.observe({head: observer(head) for head in heads})
        kept = {head: torch.cat(p) if len(p) > 1 else p[0] if p else empty[head] for head, p in parts.items()}
        for group, members in groups:
            head = members[0]
            total = sums[head] + empty[head].new_zeros(empty[head].shape[-1], dtype=torch.float64)
            mean_abs = (ctx.reduce_sum(total) / _sum(ctx, counts[head])).to(empty[head].dtype)
            scales = self._search(ctx, group, members, mean_abs, kept[head])
            if scales is not None:
                kept[head] = kept[head] / scales
        clipped = [(name, members[0]) for group, members in groups for name in members if group.clips(name)]
        grams = {}
        for name, head in clipped:
            key = (head, ctx.targets[name].config.group_size)
            if key not in grams:
                grams[key] = _gram(ctx, kept[head], key[1], ctx.targets[name].linear.weight.device)
        # the search's dominant cost: out * in * group_size per shrink
        sizes = [grams[head, ctx.targets[name].config.group_size].shape[-1] for name, head in clipped]
        costs = [float(ctx.targets[name].linear.weight.numel() * size) for (name, _), size in zip(clipped, sizes)]
        owners = ctx.dist.owners(costs)
        max_vals = {}
        for (name, head), owner, cost in zip(clipped, owners, costs):
            if owner == ctx.dist.rank:
                target = ctx.targets[name]
                cfg = target.config
                gram = grams[head, cfg.group_size]
                max_vals[name] = search_clip_gram(target.linear.weight, gram, cfg.bits, cfg.group_size, cfg.zero_point)
                ctx.work.solves += 1
                ctx.work.solve_cost += cost
        for (name, _), owner in zip(clipped, owners):
            apply_clip(ctx.targets[name].linear, ctx.dist.broadcast(max_vals.get(name), owner))
        for name, target in ctx.targets.items():
            cfg, linear = target.config, target.linear
            module = AWQLinear.quantize(linear, cfg.bits, cfg.group_size, cfg.zero_point, cfg.version)
            ctx.replace(name, module.to(linear.weight.device))

    def _search(
        self, ctx: LayerContext, group: LinearGroup, members: list[str], mean_abs: Tensor, x: Tensor
    ) -> Tensor | None:
        """Search and fold one group's scales; ``None`` when the group is left unscaled."""
        linears = [ctx.targets[name].linear for name in members]
        previous = ctx.module(group.previous)
        if len(members) != len(group.names):
            log.info("%s: AWQ does not scale %s (some are not quantized)", ctx.name, ", ".join(group.names))
            return None
        if (
            group.scale_when_square
            and getattr(previous, "weight", None) is not None
            and (previous.weight.shape != linears[0].weight.shape)
        ):
            return None
        if group.inspect is None:

            def run(x: Tensor) -> Tensor:
                return torch.cat([linear(x) for linear in linears], dim=-1)
        else:
            inspected = ctx.module(group.inspect)
            kwargs = ctx.kwargs[0] if group.inspect_takes_kwargs else {}

            def run(x: Tensor) -> Tensor:
                out = inspected(x, **_batch(kwargs, x.shape[0]))
                return out[0] if isinstance(out, tuple) else out

        def forward() -> Tensor:
            if not x.shape[0]:  # a rank that holds none of the search samples
                return x.new_zeros((0, 1))
            return run(x)

        cfg = ctx.targets[members[0]].config
        # search_scales reads only the per-channel mean |x| from its x when forward_fn is given:
        # pass the mean over all calibration tokens, and evaluate the loss on the kept ones.
        result = search_scales(
            mean_abs.view(1, -1),
            linears,
            w_bits=cfg.bits,
            group_size=cfg.group_size,
            zero_point=cfg.zero_point,
            forward_fn=forward,
            loss_fn=_loss(ctx),
        )
        apply_scales_to_previous(previous, linears, result.scales)
        log.debug(
            "%s: AWQ scales for %s: ratio %.2f, loss %.4g", ctx.name, ", ".join(members), result.ratio, result.loss
        )
        return result.scales


def _batch(kwargs: dict, samples: int) -> dict:
    """The layer's keyword arguments (captured for a whole chunk) for its first ``samples`` samples:
    per-sample tensors (attention mask, rotary embeddings) cut to them, the rest as they are."""

    def cut(value):
        if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[0] > samples:
            return value[:samples]
        if isinstance(value, tuple):
            return tuple(cut(item) for item in value)
        return value

    return {key: cut(value) for key, value in kwargs.items()}


def _sum(ctx: LayerContext, count: int) -> int:
    """``count`` summed over the ranks."""
    if ctx.dist.world == 1:
        return count
    return int(ctx.reduce_sum(torch.tensor([count], dtype=torch.float64)).item())


def _gram(ctx: LayerContext, x: Tensor, group_size: int, device: torch.device) -> Tensor:
    """The per-group mean ``x x^T`` of every rank's search samples: each sample's float32 Gram
    matrices summed in float64, exactly (see :class:`quantkit.layerwise.HessianAccumulator`), so
    the result does not depend on how the samples are split over chunks or ranks."""
    gram = group_gram_sum(x[:0], group_size, device).double()
    for sample in x.split(1):
        gram += group_gram_sum(sample, group_size, device)
    gram = ctx.reduce_sum(gram) / max(_sum(ctx, x.numel() // x.shape[-1]), 1)
    return gram.float()


def _loss(ctx: LayerContext):
    """The scale search's mean squared error over every rank's search samples, summed in
    float64 so that it does not depend on how the samples are split over ranks."""

    def loss(output: Tensor, reference: Tensor) -> float:
        err = (output - reference).pow(2)
        total = ctx.reduce_sum(err.sum(dtype=torch.float64).reshape(1))
        return float(total.item() / _sum(ctx, err.numel()))

    return loss


class AWQBackend(Backend):
    """AWQ in plain torch. ``search_tokens``: calibration tokens the scale search evaluates its
    loss on per grid point (the channel statistics always use every token)."""

    name = "awq"
    layer_classes = (AWQLinear,)
    streams_layers = True
    config_class = AWQConfig
    presets = PRESETS
    capabilities = Capabilities(
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=True,
        serializable=True,
        trainable=True,
        description="AWQ in plain torch (Llama-family decoders); checkpoints in the AutoAWQ GEMM/GEMV format",
        shape_limits=AWQ_SHAPE_LIMITS,
    )

    def __init__(self, search_tokens: int = DEFAULT_SEARCH_TOKENS):
        self.search_tokens = search_tokens

    def storage_bits(self, config: AWQConfig, name: str, out_features: int, in_features: int) -> int:
        groups = math.ceil(in_features / config.group_size)
        if config.version == "gemm":
            return in_features * out_features * 4 + groups * out_features * (4 + 16)
        width = gemv_group_width(groups, config.group_size)
        return in_features * out_features * 4 + out_features * width * (32 + 8 * 16)

    def quantize(self, model: nn.Module, config: AWQConfig, *, calibration, device) -> nn.Module:
        targets = self.targets(model, config)
        seqlen = calibration.shape[-1] if calibration is not None and calibration.dim() == 2 else 1
        quantize_layerwise(
            model,
            targets,
            calibration,
            device,
            _AWQLayerQuantizer(max(1, self.search_tokens // seqlen)),
            description="AWQ",
            chunk_samples=max(1, self.search_tokens // seqlen),
            data_parallel=True,
        )
        return model

    def empty_module(self, name: str, linear: nn.Linear, config: AWQConfig) -> AWQLinear:
        return AWQLinear.empty_like(linear, config.group_size, config.version)
