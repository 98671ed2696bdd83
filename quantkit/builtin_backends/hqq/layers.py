"""hqq's ``HQQLinear``: built from a float linear, or from tensors saved in quantkit's layout.

Always with an explicit device: hqq defaults to ``cuda``. The modules stay real
``HQQLinear`` so that PEFT's HQQ LoRA layers wrap them; quantkit routes their forward through
the kernels registered for :class:`HQQLayer` (:mod:`.kernels`), with ``bits`` and
``group_size`` read from hqq's meta-data for the kernels' declarations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from quantkit.core.dispatch import route_through_kernels, third_party_class

from .config import HQQConfig
from .quantizer import quantize_weight

if TYPE_CHECKING:
    from hqq.core.quantize import HQQLinear


HQQLayer = third_party_class(
    "hqq.core.quantize.HQQLinear",
    "HQQLayer",
    "hqq's ``HQQLinear`` (and its subclasses) as a class quantkit can name without importing hqq: "
    "``isinstance(module, HQQLayer)``, the layer class hqq's kernels declare.",
)


def _through_kernels(module: HQQLinear) -> HQQLinear:
    """``module`` with the attributes kernels read and its forward routed through them."""
    module.bits = module.meta["nbits"]
    module.group_size = module.meta["group_size"] or module.in_features
    return route_through_kernels(module)


def hqq_quant_config(config: HQQConfig) -> dict:
    """hqq's ``quant_config`` dict for ``config`` (hqq's defaults, e.g. zero rounding at 4 bits)."""
    from hqq.core.quantize import BaseQuantizeConfig

    quant_config = BaseQuantizeConfig(nbits=config.nbits, group_size=config.group_size, axis=config.axis)
    quant_config["weight_quant_params"]["optimize"] = config.optimize
    return quant_config


def quantize_linear(linear: nn.Linear, config: HQQConfig, device: torch.device) -> HQQLinear:
    """``linear`` quantized on ``device`` as hqq's ``HQQLinear`` quantizes it: on the CPU by
    :mod:`.quantizer` (the optimizer's temporaries a slab at a time) and bit-packed by hqq; on a GPU
    by hqq itself (what ``benchmarks/gpu_check.py`` checked on an H200)."""
    from hqq.core.quantize import HQQLinear, Quantizer

    if torch.device(device).type != "cpu":
        linear = linear.to(device)
        dtype = getattr(torch, config.compute_dtype)
        module = HQQLinear(linear, hqq_quant_config(config), del_orig=True, compute_dtype=dtype, device=str(device))
        return _through_kernels(module.train(linear.training))
    weight = linear.weight.detach()
    params = hqq_quant_config(config)["weight_quant_params"]
    codes, scale, zero = quantize_weight(
        weight, config.nbits, config.group_size, config.axis, config.optimize, params["round_zero"]
    )
    meta = {
        "nbits": config.nbits,
        "group_size": config.group_size,
        "shape": weight.shape,
        "scale": scale,
        "zero": zero,
        "axis": config.axis,
    }
    codes = Quantizer.pack[Quantizer.bit_to_packing[config.nbits]](codes)
    bias = None if linear.bias is None else linear.bias.detach()
    return saved_linear(config, codes, meta, bias, device).train(linear.training)


def saved_linear(
    config: HQQConfig, W_q: torch.Tensor, meta: dict, bias: torch.Tensor | None, device: torch.device
) -> HQQLinear:
    """An ``HQQLinear`` on ``device`` holding saved codes and hqq ``meta`` fields
    (``nbits``, ``group_size``, ``axis``, ``shape``, ``scale``, ``zero``)."""
    from hqq.core.quantize import HQQLinear, Quantizer

    module = HQQLinear(
        None,
        hqq_quant_config(config),
        compute_dtype=getattr(torch, config.compute_dtype),
        device=str(device),
        initialize=False,
    )
    packing = Quantizer.bit_to_packing[meta["nbits"]]
    module.W_q = W_q
    module.meta = {
        **meta,
        "packing": packing,
        "unpack_view_dtype": Quantizer.unpack_view_dtype[packing],
        "view_as_float": False,
        "quant_scale": False,
        "quant_zero": False,
    }
    module.bias = bias
    module.cuda(str(device))  # hqq's move to any device: casts meta and bias to the compute dtype
    module.out_features, module.in_features = meta["shape"]
    module.ready = True
    return _through_kernels(module)
