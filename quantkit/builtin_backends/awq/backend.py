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
    awq_pseudo_quantize,
    input_channel_mean_abs,
    search_clip,
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
    """AWQ's step of :func:`quantkit.layerwise.quantize_layerwise`; chunk 0 holds the search tokens."""

    def __call__(self, ctx: LayerContext) -> None:
        groups = ctx.target_groups()
        heads = [members[0] for _, members in groups]
        sums = {head: 0.0 for head in heads}
        counts = dict.fromkeys(heads, 0)
        kept: dict[str, Tensor] = {}

        def observer(head: str):
            def observe(x: Tensor, chunk: int) -> None:
                rows = x.numel() // x.shape[-1]
                sums[head] = sums[head] + input_channel_mean_abs(x) * rows
                counts[head] += rows
                if chunk == 0:
                    kept[head] = x.detach()

            return observe

        ctx.observe({head: observer(head) for head in heads})
        for group, members in groups:
            head = members[0]
            scales = self._search(ctx, group, members, sums[head] / counts[head], kept[head])
            if scales is not None:
                kept[head] = kept[head] / scales
        for group, members in groups:
            for name in members:
                target = ctx.targets[name]
                if group.clips(name):
                    cfg = target.config
                    max_val = search_clip(
                        target.linear.weight, kept[members[0]], cfg.bits, cfg.group_size, cfg.zero_point
                    )
                    apply_clip(target.linear, max_val)
        for name, target in ctx.targets.items():
            cfg, linear = target.config, target.linear
            q = awq_pseudo_quantize(linear.weight, cfg.bits, cfg.group_size, cfg.zero_point)
            module = AWQLinear.pack(q.intweight, q.zeros, q.scales, linear.bias, cfg.version)
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

            def forward() -> Tensor:
                return torch.cat([linear(x) for linear in linears], dim=-1)
        else:
            inspected = ctx.module(group.inspect)
            kwargs = ctx.kwargs[0] if group.inspect_takes_kwargs else {}

            def forward() -> Tensor:
                out = inspected(x, **kwargs)
                return out[0] if isinstance(out, tuple) else out

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
        )
        apply_scales_to_previous(previous, linears, result.scales)
        log.debug(
            "%s: AWQ scales for %s: ratio %.2f, loss %.4g", ctx.name, ", ".join(members), result.ratio, result.loss
        )
        return result.scales


class AWQBackend(Backend):
    """AWQ in plain torch. ``search_tokens``: calibration tokens the scale search evaluates its
    loss on per grid point (the channel statistics always use every token)."""

    name = "awq"
    layer_classes = (AWQLinear,)
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
            _AWQLayerQuantizer(),
            description="AWQ",
            chunk_samples=max(1, self.search_tokens // seqlen),
        )
        return model

    def empty_module(self, name: str, linear: nn.Linear, config: AWQConfig) -> AWQLinear:
        return AWQLinear.empty_like(linear, config.group_size, config.version)
