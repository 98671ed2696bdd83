"""Round-to-nearest backend: min/max group quantization, the calibration-free reference point,
stored in the GPTQ v1 format (:class:`~quantkit.builtin_backends.gptq.qlinear.GPTQLinear`)."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.builtin_backends.gptq.backend import GPTQ_SHAPE_LIMITS, gptq_storage_bits, packed_module
from quantkit.builtin_backends.gptq.gptq import rtn_quantize
from quantkit.builtin_backends.gptq.qlinear import GPTQLinear
from quantkit.core.backend import Backend
from quantkit.core.capabilities import ALL_HARDWARE, Capabilities

from .config import PRESETS, RTNConfig


class RTNBackend(Backend):
    name = "rtn"
    layer_classes = (GPTQLinear,)
    streams_modules = True
    config_class = RTNConfig
    presets = PRESETS
    capabilities = Capabilities(
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=True,
        description="round-to-nearest min/max group quantization (reference baseline); GPTQ v1 checkpoint format",
        shape_limits=GPTQ_SHAPE_LIMITS,
    )

    def storage_bits(self, config: RTNConfig, name: str, out_features: int, in_features: int) -> int:
        return gptq_storage_bits(config.bits, config.group_size, out_features, in_features)

    def working_bytes(self, config: RTNConfig, out_features: int, in_features: int) -> int:
        """The weight in float32, then its codes in float32 and as int32 (measured 7.5 bytes per
        weight besides the quantized copy at 2048 x 1024)."""
        return 2 * 4 * out_features * in_features

    def quantize_linear(self, name: str, linear: nn.Linear, config: RTNConfig, device: torch.device) -> GPTQLinear:
        weight = linear.weight.detach().to(device)
        result = rtn_quantize(weight, bits=config.bits, group_size=config.group_size, sym=config.sym)
        return packed_module(linear, result)

    def place(self, model: nn.Module, config: RTNConfig, device: torch.device) -> nn.Module:
        """The model stays where it was (``device`` only computes), as GPTQ's does."""
        return model

    def empty_module(self, name: str, linear: nn.Linear, config: RTNConfig) -> GPTQLinear:
        return GPTQLinear.empty_like(linear, config.bits, config.group_size)
