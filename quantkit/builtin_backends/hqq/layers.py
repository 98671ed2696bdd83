"""hqq's ``HQQLinear``: built from a float linear, or from tensors saved in quantkit's layout.

Always with an explicit device: hqq defaults to ``cuda``. The modules stay real
``HQQLinear`` so that PEFT's HQQ LoRA layers wrap them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import HQQConfig

if TYPE_CHECKING:
    from hqq.core.quantize import HQQLinear


def hqq_quant_config(config: HQQConfig) -> dict:
    """hqq's ``quant_config`` dict for ``config`` (hqq's defaults, e.g. zero rounding at 4 bits)."""
    from hqq.core.quantize import BaseQuantizeConfig

    quant_config = BaseQuantizeConfig(nbits=config.nbits, group_size=config.group_size, axis=config.axis)
    quant_config["weight_quant_params"]["optimize"] = config.optimize
    return quant_config


def quantize_linear(linear: nn.Linear, config: HQQConfig, device: torch.device) -> HQQLinear:
    """``linear`` quantized by hqq on ``device`` (the optimizer, when on, runs there too)."""
    from hqq.core.quantize import HQQLinear

    linear = linear.to(device)
    module = HQQLinear(
        linear,
        hqq_quant_config(config),
        del_orig=True,
        compute_dtype=getattr(torch, config.compute_dtype),
        device=str(device),
    )
    return module.train(linear.training)


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
    return module


def hqq_linears(model: nn.Module) -> dict[str, HQQLinear]:
    """``model``'s ``HQQLinear`` modules by name."""
    from hqq.core.quantize import HQQLinear

    return {name: module for name, module in model.named_modules() if isinstance(module, HQQLinear)}
