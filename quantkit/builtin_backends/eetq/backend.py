"""EETQ backend: symmetric per-output-channel int8 weights quantized in torch on any device,
saved in the layout transformers' EETQ integration loads (see :mod:`.layout`, :mod:`.qlinear`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from quantkit.core.backend import Backend
from quantkit.core.capabilities import ALL_HARDWARE, Capabilities, ShapeLimit

from .config import PRESETS, EETQConfig
from .layout import TILE
from .qlinear import EETQ_MODULE, EetqLinear

EETQ_SHAPE_LIMITS = (
    ShapeLimit("in_features", TILE, "EETQ's kernel layout interleaves the weight in tiles of 64 inputs"),
    ShapeLimit("out_features", TILE, "EETQ's kernel layout interleaves pairs of output channels, 64 at a time"),
)


class EetqBackend(Backend):
    name = "eetq"
    config_class = EETQConfig
    presets = PRESETS
    capabilities = Capabilities(
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=True,
        description=(
            "EETQ int8 weight-only (per output channel, symmetric) in torch; transformers' EETQ layout; CPU: "
            "bfloat16 activations through torch's _weight_int8pack_mm (a GEMM on the codes for many rows); "
            "CUDA: eetq's w8_a16_gemm when installed"
        ),
        shape_limits=EETQ_SHAPE_LIMITS,
    )

    def storage_bits(self, config: EETQConfig, name: str, out_features: int, in_features: int) -> int:
        """int8 weight + float16 scale per output channel."""
        return out_features * in_features * 8 + out_features * 16

    def quantize_linear(self, name: str, linear: nn.Linear, config: EETQConfig, device: torch.device) -> EetqLinear:
        return EetqLinear.from_linear(linear, device)

    def place(self, model: nn.Module, config: EETQConfig, device: torch.device) -> nn.Module:
        return use_eetq_kernels(model.to(device))

    def empty_module(self, name: str, linear: nn.Linear, config: EETQConfig) -> EetqLinear:
        return EetqLinear.empty_like(linear)

    def load_pretrained(self, directory: Path, config: EETQConfig, device: torch.device) -> nn.Module:
        return use_eetq_kernels(super().load_pretrained(directory, config, device))


EETQ_CAPABILITIES = ((7, 5), (9, 0))
"""The CUDA compute capabilities (from, up to) whose kernel layout :mod:`.layout` writes; EETQ's
preprocessing refuses the others."""


def use_eetq_kernels(model: nn.Module) -> nn.Module:
    """Turn ``model``'s EETQ linears on CUDA GPUs of :data:`EETQ_CAPABILITIES` to eetq's own kernel
    when the ``eetq`` package is installed."""
    if importlib.util.find_spec(EETQ_MODULE) is None:
        return model
    low, high = EETQ_CAPABILITIES
    for module in model.modules():
        on_cuda = isinstance(module, EetqLinear) and module.weight.is_cuda
        if on_cuda and low <= torch.cuda.get_device_capability(module.weight.device) < high:
            module.use_eetq_kernel()
    return model
