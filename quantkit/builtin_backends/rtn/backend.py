"""Round-to-nearest backend: min/max group quantization, the calibration-free reference point,
stored in the GPTQ v1 format (:class:`~quantkit.builtin_backends.gptq.qlinear.GPTQLinear`)."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.builtin_backends.gptq.backend import check_packable, gptq_storage_bits, packed_module, prepare_gptq_linears
from quantkit.builtin_backends.gptq.gptq import rtn_quantize
from quantkit.builtin_backends.gptq.qlinear import GPTQLinear
from quantkit.core.backend import Backend
from quantkit.core.capabilities import ALL_HARDWARE, Capabilities
from quantkit.core.linears import replace_linears

from .config import PRESETS, RTNConfig


class RTNBackend(Backend):
    name = "rtn"
    config_class = RTNConfig
    presets = PRESETS
    capabilities = Capabilities(
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=True,
        description="round-to-nearest min/max group quantization (reference baseline); GPTQ v1 checkpoint format",
    )

    def storage_bits(self, config: RTNConfig, name: str, out_features: int, in_features: int) -> int:
        module_config = config.for_module(name) if name else config
        return gptq_storage_bits(module_config.bits, module_config.group_size, out_features, in_features)

    def quantize(self, model: nn.Module, config: RTNConfig, *, calibration, device) -> nn.Module:
        check_packable(model, config)
        device = torch.device(device)

        def build(name: str, linear: nn.Linear, cfg: RTNConfig) -> GPTQLinear:
            result = rtn_quantize(linear.weight.detach().to(device), bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym)
            return packed_module(linear, result)

        with torch.no_grad():
            return replace_linears(model, config, build, description="RTN")

    def prepare_for_loading(self, model: nn.Module, config: RTNConfig) -> nn.Module:
        return prepare_gptq_linears(model, config)
