"""GPTQ backend: plain torch on any device, GPTQ v1 checkpoints.

GPTQ calibrates layer by layer (:mod:`quantkit.layerwise`): per decoder layer it accumulates
one Hessian per group of linears sharing an input, quantizes those linears with
:func:`quantkit.builtin_backends.gptq.gptq.gptq_quantize` and runs the quantized layer to produce the next
layer's inputs. With ``true_sequential`` the groups are quantized one after the other in
execution order (q/k/v, then o, then gate/up, then down), each calibrated on inputs computed
by the already quantized part of the layer; the forward pass that collects a group's inputs
stops at that group, so this costs little more than quantizing the layer at once.

It writes (as does the round-to-nearest backend) the GPTQ v1 format of auto-gptq / GPTQModel / transformers
(``qweight``, ``qzeros``, ``scales``, ``g_idx`` per linear; :class:`~quantkit.builtin_backends.gptq.qlinear.GPTQLinear`)
and run it with a torch dequantize + matmul on every device. ``group_size`` need not divide
``in_features``: the last group is shorter (``ceil(in / group_size)`` groups), which the
format's ``g_idx`` expresses; some third-party kernels refuse such checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from quantkit.core.backend import Backend
from quantkit.core.capabilities import ALL_HARDWARE, Capabilities, ShapeLimit
from quantkit.layerwise import HessianAccumulator, LayerContext, LinearGroup, one_cpu_thread, quantize_layerwise

from .config import PRESETS, GPTQConfig
from .gptq import GPTQResult, gptq_quantize
from .packing import pack_gptq
from .qlinear import GPTQLinear, gptq_groups

log = logging.getLogger("quantkit")


def gptq_storage_bits(bits: int, group_size: int, out_features: int, in_features: int) -> int:
    """qweight + qzeros (packed along the output dim) + float16 scales + int32 g_idx."""
    groups = gptq_groups(in_features, group_size)
    qweight = -(-in_features * bits // 32) * out_features * 32
    qzeros = groups * -(-out_features * bits // 32) * 32
    return qweight + qzeros + groups * out_features * 16 + in_features * 32


GPTQ_SHAPE_LIMITS = (
    ShapeLimit(("in_features", "bits"), 32, "the GPTQ format packs each output's codes into 32-bit words"),
    ShapeLimit(("out_features", "bits"), 32, "the GPTQ format packs each group's zero points into 32-bit words"),
)
"""What the GPTQ v1 format (shared by round-to-nearest) needs of a linear."""


def packed_module(linear: nn.Linear, result: GPTQResult) -> GPTQLinear:
    packed = pack_gptq(result.intweight, result.zeros, result.scales, result.g_idx, result.bits)
    module = GPTQLinear.from_packed(packed, result.bits, linear.bias)
    return module.to(linear.weight.device)


class _GPTQLayerQuantizer:
    """GPTQ's step of :func:`quantkit.layerwise.quantize_layerwise` for one decoder layer.

    Linears sharing an input (and a config) are quantized as one weight stacked along the
    output dim: GPTQ treats rows independently, so this gives each the same result as alone
    while factorizing their shared Hessian once.

    Under ``torchrun`` the Hessians are summed onto the rank that owns each solve (solves
    balanced over the ranks by ``in_features**2 * out_features``), which broadcasts the result.
    """

    def __init__(self, config: GPTQConfig):
        self.config = config

    def __call__(self, ctx: LayerContext) -> None:
        groups = ctx.target_groups()
        steps = [[group] for group in groups] if self.config.true_sequential else [groups]
        packed: dict[str, GPTQLinear] = {}
        for step in steps:
            packed.update(self._step(ctx, step))
        for name, module in packed.items():
            ctx.replace(name, module)

    def _step(self, ctx: LayerContext, step: list[tuple[LinearGroup, list[str]]]) -> dict[str, GPTQLinear]:
        """Calibrate and solve one step's groups; their linears packed (what a step returns is all
        it keeps: 4-bit codes, no int32 ones, no Hessian)."""
        hessians = {
            members[0]: HessianAccumulator(ctx.targets[members[0]].linear.in_features, ctx.device, ctx.dist)
            for _, members in step
        }
        ctx.observe({name: (lambda x, c, h=h: h.add_batch(x)) for name, h in hessians.items()})
        solves = [(members[0], names) for _, members in step for names in _same_config(ctx, members)]
        owners = ctx.dist.owners([_solve_cost(ctx, names) for _, names in solves])
        for head in hessians:
            ranks = {owner for (h, _), owner in zip(solves, owners) if h == head}
            ctx.work.hessian_flops += hessians[head].flops
            hessians[head].reduce(ranks.pop() if len(ranks) == 1 else None)
        stacked = {}
        mine = [(head, names) for (head, names), owner in zip(solves, owners) if owner == ctx.dist.rank]
        for index, (head, names) in enumerate(mine):
            last = all(h != head for h, _ in mine[index + 1 :])  # the solve may then overwrite the Hessian
            H = (hessians.pop(head) if last else hessians[head]).H
            stacked[tuple(names)] = self._solve(ctx, names, H, overwrite_hessian=last)
            del H
            ctx.work.solves += 1
            ctx.work.solve_cost += _solve_cost(ctx, names)
        hessians.clear()
        packed: dict[str, GPTQLinear] = {}
        for (_, names), owner in zip(solves, owners):
            packed.update(_packed(ctx, names, ctx.dist.broadcast(stacked.pop(tuple(names), None), owner)))
        return packed

    def _solve(self, ctx: LayerContext, names: list[str], H: torch.Tensor, overwrite_hessian: bool) -> GPTQResult:
        """GPTQ on the stacked weights of ``names`` (``overwrite_hessian``: ``H`` is not needed after)."""
        cfg = ctx.targets[names[0]].config
        linears = [ctx.targets[name].linear for name in names]
        stacked = torch.cat([linear.weight for linear in linears])
        with one_cpu_thread(stacked.device):
            result = gptq_quantize(
                stacked,
                H,
                bits=cfg.bits,
                group_size=cfg.group_size,
                sym=cfg.sym,
                desc_act=cfg.desc_act,
                static_groups=cfg.static_groups,
                damp_percent=cfg.damp_percent,
                act_group_aware=cfg.act_group_aware,
                damp_auto_increment=cfg.damp_auto_increment,
                mse=cfg.mse,
                overwrite_hessian=overwrite_hessian,
            )
        label = f"{ctx.name}.{{{','.join(names)}}}"
        if result.damp_percent is not None and result.damp_percent > cfg.damp_percent:
            log.warning(
                "%s: Hessian not invertible with damp_percent=%g (dead or collinear inputs); used %g",
                label,
                cfg.damp_percent,
                result.damp_percent,
            )
        log.debug("%s: GPTQ loss %.4g", label, result.loss)
        return result


def _solve_cost(ctx: LayerContext, names: list[str]) -> float:
    """GPTQ's dominant cost for these stacked linears: ``in_features**2 * out_features``."""
    linears = [ctx.targets[name].linear for name in names]
    return float(linears[0].in_features ** 2 * sum(linear.out_features for linear in linears))


def _packed(ctx: LayerContext, names: list[str], result: GPTQResult) -> dict[str, GPTQLinear]:
    """The stacked ``result`` packed per linear; each linear's weight becomes its dequantized self."""
    linears = [ctx.targets[name].linear for name in names]
    packed = {}
    rows = [linear.out_features for linear in linears]
    parts = zip(result.intweight.split(rows), result.scales.split(rows, dim=1), result.zeros.split(rows, dim=1))
    for name, linear, (intweight, scales, zeros) in zip(names, linears, parts):
        part = replace(
            result,
            intweight=intweight,
            scales=scales.contiguous(),
            zeros=zeros.contiguous(),
            g_idx=result.g_idx.clone(),
            loss=None,
        )
        linear.weight.copy_(part.dequantized)
        packed[name] = packed_module(linear, part)
    return packed


def _same_config(ctx: LayerContext, members: list[str]) -> list[list[str]]:
    """``members`` partitioned by effective config (module_overrides can set them apart)."""
    parts: list[list[str]] = []
    for name in members:
        config = ctx.targets[name].config
        part = next((p for p in parts if ctx.targets[p[0]].config == config), None)
        if part is None:
            parts.append([name])
        else:
            part.append(name)
    return parts


class GPTQBackend(Backend):
    name = "gptq"
    layer_classes = (GPTQLinear,)
    streams_layers = True
    config_class = GPTQConfig
    presets = PRESETS
    capabilities = Capabilities(
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=True,
        serializable=True,
        trainable=True,
        description=(
            "GPTQ in plain torch (Llama-family decoders); checkpoints in the GPTQ v1 (auto-gptq/GPTQModel) format"
        ),
        shape_limits=GPTQ_SHAPE_LIMITS,
    )

    def storage_bits(self, config: GPTQConfig, name: str, out_features: int, in_features: int) -> int:
        return gptq_storage_bits(config.bits, config.group_size, out_features, in_features)

    def quantize(self, model: nn.Module, config: GPTQConfig, *, calibration, device) -> nn.Module:
        targets = self.targets(model, config)
        quantize_layerwise(
            model, targets, calibration, device, _GPTQLayerQuantizer(config), description="GPTQ", data_parallel=True
        )
        return model

    def empty_module(self, name: str, linear: nn.Linear, config: GPTQConfig) -> GPTQLinear:
        return GPTQLinear.empty_like(linear, config.bits, config.group_size)
