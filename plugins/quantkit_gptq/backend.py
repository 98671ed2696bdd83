"""GPTQ and round-to-nearest backends (being implemented)."""

from __future__ import annotations

import math

from quantkit import Backend, Capabilities, GPTQConfig, RTNConfig
from quantkit.capabilities import ALL_HARDWARE, Availability


def gptq_storage_bits(bits: int, group_size: int, out_features: int, in_features: int) -> int:
    """qweight + qzeros (packed along the output dim) + float16 scales + int32 g_idx."""
    groups = 1 if group_size == -1 else math.ceil(in_features / group_size)
    qweight = math.ceil(in_features * bits / 32) * out_features * 32
    qzeros = groups * math.ceil(out_features * bits / 32) * 32
    return qweight + qzeros + groups * out_features * 16 + in_features * 32


class GPTQBackend(Backend):
    name = "gptq"
    config_class = GPTQConfig
    capabilities = Capabilities(
        methods=("gptq",),
        bits=(2, 3, 4, 8),
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=True,
        serializable=True,
        trainable=False,
        description="GPTQ in plain torch; checkpoints in the GPTQ (auto-gptq/GPTQModel) format",
    )

    def is_available(self) -> Availability:
        return Availability(False, "not implemented yet")

    def storage_bits(self, config: GPTQConfig, name: str, out_features: int, in_features: int) -> int:
        return gptq_storage_bits(config.bits, config.group_size, out_features, in_features)

    def quantize(self, model, config, *, calibration, device):
        raise NotImplementedError


class RTNBackend(Backend):
    name = "rtn"
    config_class = RTNConfig
    capabilities = Capabilities(
        methods=("rtn",),
        bits=(2, 3, 4, 8),
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=False,
        description="round-to-nearest group quantization (reference); GPTQ checkpoint format",
    )

    def is_available(self) -> Availability:
        return Availability(False, "not implemented yet")

    def storage_bits(self, config: RTNConfig, name: str, out_features: int, in_features: int) -> int:
        return gptq_storage_bits(config.bits, config.group_size, out_features, in_features)

    def quantize(self, model, config, *, calibration, device):
        raise NotImplementedError
