"""EETQ backend: symmetric per-output-channel int8 weights quantized in torch on any device,
saved in the layout transformers' EETQ integration loads (see :mod:`.layout`, :mod:`.qlinear`)."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.core.backend import Backend
from quantkit.core.capabilities import ALL_HARDWARE, Capabilities, ShapeLimit

from .config import PRESETS, EETQConfig
from .layout import TILE
from .qlinear import EetqLinear

EETQ_SHAPE_LIMITS = (
    ShapeLimit("in_features", TILE, "EETQ's kernel layout interleaves the weight in tiles of 64 inputs"),
    ShapeLimit("out_features", TILE, "EETQ's kernel layout interleaves pairs of output channels, 64 at a time"),
)


class EetqBackend(Backend):
    name = "eetq"
    layer_classes = (EetqLinear,)
    streams_modules = True
    config_class = EETQConfig
    presets = PRESETS
    capabilities = Capabilities(
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=True,
        description=(
            "EETQ int8 weight-only (per output channel, symmetric) in torch; transformers' EETQ layout; "
            "kernels: int8-cpu (torch's _weight_int8pack_mm), eetq (eetq's w8_a16_gemm on CUDA when installed)"
        ),
        shape_limits=EETQ_SHAPE_LIMITS,
    )

    def storage_bits(self, config: EETQConfig, name: str, out_features: int, in_features: int) -> int:
        """int8 weight + float16 scale per output channel."""
        return out_features * in_features * 8 + out_features * 16

    def working_bytes(self, config: EETQConfig, out_features: int, in_features: int) -> int:
        """Five float32 copies of the weight: the weight, its quotient, truncation and rounding, and a
        temporary (measured 19.7 bytes per weight besides the int8 codes at 2048 x 1024)."""
        return 5 * 4 * out_features * in_features

    def quantize_linear(self, name: str, linear: nn.Linear, config: EETQConfig, device: torch.device) -> EetqLinear:
        return EetqLinear.from_linear(linear, device)

    def empty_module(self, name: str, linear: nn.Linear, config: EETQConfig) -> EetqLinear:
        return EetqLinear.empty_like(linear)
