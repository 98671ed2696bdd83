"""HQQ backend (being implemented)."""

from __future__ import annotations

import math

from quantkit import Backend, Capabilities, Hardware, HQQConfig
from quantkit.capabilities import Availability

HQQ_HARDWARE = frozenset({Hardware.CUDA, Hardware.CPU})


class HQQBackend(Backend):
    name = "hqq"
    config_class = HQQConfig
    capabilities = Capabilities(
        methods=("hqq",),
        bits=(1, 2, 3, 4, 8),
        quantize_hardware=HQQ_HARDWARE,
        inference_hardware=HQQ_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=True,
        requires=("hqq",),
        description="half-quadratic quantization through the hqq library",
    )

    def is_available(self) -> Availability:
        return Availability(False, "not implemented yet")

    def storage_bits(self, config: HQQConfig, name: str, out_features: int, in_features: int) -> int:
        n = out_features * in_features
        groups = math.ceil(n / config.group_size)
        return math.ceil(n * config.nbits / 8) * 8 + groups * 2 * 16

    def quantize(self, model, config, *, calibration, device):
        raise NotImplementedError
