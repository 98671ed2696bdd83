"""bitsandbytes backend (being implemented)."""

from __future__ import annotations

import math

from quantkit import Backend, BnbConfig, Capabilities, Hardware
from quantkit.capabilities import Availability

BNB_HARDWARE = frozenset({Hardware.CUDA, Hardware.ROCM, Hardware.CPU})


class BnbBackend(Backend):
    name = "bitsandbytes"
    config_class = BnbConfig
    capabilities = Capabilities(
        methods=("bitsandbytes",),
        bits=(4, 8),
        quantize_hardware=BNB_HARDWARE,
        inference_hardware=BNB_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=True,
        requires=("bitsandbytes",),
        description="NF4/FP4 (optionally double-quantized) and LLM.int8 through bitsandbytes",
    )

    def is_available(self) -> Availability:
        return Availability(False, "not implemented yet")

    def storage_bits(self, config: BnbConfig, name: str, out_features: int, in_features: int) -> int:
        n = out_features * in_features
        if config.load_in_8bit:
            return n * 8 + out_features * 32  # int8 weight + float32 row scale (SCB)
        blocks = math.ceil(n / config.blocksize)
        code = 16 * 32  # the 16-entry NF4/FP4 code book, float32
        if config.use_double_quant:
            absmax = blocks * 8 + math.ceil(blocks / 256) * 32 + 256 * 32 + 32
        else:
            absmax = blocks * 32
        return math.ceil(n / 2) * 8 + absmax + code

    def quantize(self, model, config, *, calibration, device):
        raise NotImplementedError
