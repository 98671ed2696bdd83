"""AQLM backend: the paper's calibration in plain torch on any device, aqlm/transformers checkpoints.

AQLM calibrates layer by layer (:mod:`quantkit.layerwise`): per decoder layer and group of
linears sharing an input, in execution order, it accumulates ``H = X^T X`` of that input (as
computed by the already quantized part of the layer), quantizes each linear with
:func:`~quantkit.builtin_backends.aqlm.aq.aq_quantize` and swaps in its
:class:`~quantkit.builtin_backends.aqlm.qlinear.AQLMLinear`. The saved folder is what
transformers' AQLM integration loads (``quant_method: aqlm``), and aqlm's ``QuantizedLinear``
(its numba CPU kernel for 2x8 and 1x8, its dequantizing path otherwise) computes the same
outputs as this backend's torch forward; aqlm 1.1.7's numba kernel races with more than one numba
thread (``numba.set_num_threads(1)``).
"""

from __future__ import annotations

import logging

from torch import nn

from quantkit.core.backend import Backend
from quantkit.core.capabilities import ALL_HARDWARE, Capabilities, ShapeLimit
from quantkit.core.config import HF_EXACT_CONFIG_KEY
from quantkit.layerwise import HessianAccumulator, LayerContext, quantize_layerwise

from .aq import aq_flops, aq_quantize, aq_scores, score_elements
from .config import PRESETS, AQLMConfig
from .qlinear import AQLMLinear, code_dtype

log = logging.getLogger("quantkit")

AQLM_SHAPE_LIMITS = (
    ShapeLimit("in_features", "in_group_size", "AQLM codes whole groups of in_group_size inputs"),
    ShapeLimit("out_features", "out_group_size", "AQLM codes whole groups of out_group_size outputs"),
)


def aqlm_storage_bits(config: AQLMConfig, out_features: int, in_features: int) -> int:
    """Codes (int8 or int16) + float16 codebooks + one float16 scale per output group."""
    num_out = out_features // config.out_group_size
    codes = num_out * (in_features // config.in_group_size) * config.num_codebooks
    code_bits = code_dtype(config.nbits_per_codebook).itemsize * 8
    return codes * code_bits + config.codebook_values * 16 + num_out * 16


def _quantize_layer(ctx: LayerContext) -> None:
    """AQLM's step of :func:`quantkit.layerwise.quantize_layerwise` for one decoder layer.

    Under ``torchrun`` each linear's solve goes to one rank (balanced by its FLOPs), which
    receives the summed Hessian and broadcasts the codes, codebooks and scales."""
    for _, members in ctx.target_groups():
        first = ctx.targets[members[0]].linear
        accumulator = HessianAccumulator(first.in_features, ctx.device, ctx.dist)
        ctx.observe({members[0]: lambda x, c, h=accumulator: h.add_batch(x)})
        ctx.work.hessian_flops += accumulator.flops
        costs = [_solve_cost(ctx, name) for name in members]
        owners = ctx.dist.owners(costs)
        H = accumulator.reduce(owners[0] if len(set(owners)) == 1 else None)
        results = {}
        for name, owner, cost in zip(members, owners, costs):
            if owner == ctx.dist.rank:
                linear, config = ctx.targets[name].linear, ctx.targets[name].config
                results[name] = aq_quantize(linear.weight, H, config)
                log.debug("%s.%s: AQLM output error %s", ctx.name, name, results[name].errors)
                ctx.work.solves += 1
                ctx.work.solve_cost += cost
        for name, owner in zip(members, owners):
            linear, config = ctx.targets[name].linear, ctx.targets[name].config
            ctx.replace(name, AQLMLinear.from_result(linear, config, ctx.dist.broadcast(results.get(name), owner)))


def _solve_cost(ctx: LayerContext, name: str) -> float:
    """AQLM's FLOPs for one linear, without the shared ``X^T X``."""
    linear, config = ctx.targets[name].linear, ctx.targets[name].config
    flops = aq_flops(config, linear.out_features, linear.in_features, 0)
    return sum(value for phase, value in flops.items() if phase != "xtx")


class AQLMBackend(Backend):
    name = "aqlm"
    config_class = AQLMConfig
    presets = PRESETS
    capabilities = Capabilities(
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=True,
        serializable=True,
        trainable=True,
        description="AQLM additive quantization in plain torch (Llama-family decoders); aqlm/transformers checkpoints",
        shape_limits=AQLM_SHAPE_LIMITS,
        quality_floor_bits=2.0,  # the paper's headline; SmolLM2 2x8: perplexity 95 where HQQ 2-bit gives 1303
    )

    def storage_bits(self, config: AQLMConfig, name: str, out_features: int, in_features: int) -> int:
        return aqlm_storage_bits(config, out_features, in_features)

    def code_bits(self, config: AQLMConfig, name: str, out_features: int, in_features: int) -> float:
        """The codes' bits per weight plus the layer's codebooks spread over its weights: a code means
        nothing without its learned alphabet (the per-output scales, like other methods' scales, are
        left out). 2x8 on a 576 x 1536 linear: 2.07; 1x16 there: 11.5, since its 2**16 x 8 float16
        codebook is larger than the codes of any layer under ~4 M weights."""
        return config.code_bits + 16 * config.codebook_values / (out_features * in_features)

    def calibration_flops(self, config: AQLMConfig, out_features: int, in_features: int, tokens: int) -> float:
        """:func:`aq_flops` but the distance scoring, which :meth:`calibration_elements` counts."""
        scores = aq_scores(config, out_features, in_features)
        ig = config.in_group_size
        scoring = scores["kmeans"] * 2 * config.out_group_size * ig + scores["beam_search"] * 2 * ig
        return sum(aq_flops(config, out_features, in_features, tokens).values()) - scoring

    def calibration_elements(self, config: AQLMConfig, out_features: int, in_features: int, tokens: int) -> float:
        """The distances k-means and beam search score, priced by :func:`.score_elements`."""
        return score_elements() * sum(aq_scores(config, out_features, in_features).values())

    def quantize(self, model: nn.Module, config: AQLMConfig, *, calibration, device) -> nn.Module:
        targets = self.targets(model, config)
        quantize_layerwise(model, targets, calibration, device, _quantize_layer, description="AQLM", data_parallel=True)
        return model

    def empty_module(self, name: str, linear: nn.Linear, config: AQLMConfig) -> AQLMLinear:
        return AQLMLinear.empty_like(linear, config)

    def quantization_config_block(self, model: nn.Module, config: AQLMConfig) -> dict:
        """transformers' AQLM block, naming the float linears exactly, with the full quantkit
        config (calibration settings, module overrides). Each is named by its weight (``lm_head.weight``,
        what transformers 4 matches) and by its module (``lm_head``, what transformers 5 matches)."""
        block = super().quantization_config_block(model, config)
        del block["modules_to_not_convert"]
        floats = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        block["linear_weights_not_to_quantize"] = sorted([*floats, *(f"{n}.weight" for n in floats)])
        block[HF_EXACT_CONFIG_KEY] = config.to_dict()
        return block
