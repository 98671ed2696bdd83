"""AWQ backend (being implemented)."""

from __future__ import annotations

import math

from quantkit import AWQConfig, Backend, Capabilities
from quantkit.capabilities import ALL_HARDWARE, Availability


class AWQBackend(Backend):
    name = "awq"
    config_class = AWQConfig
    capabilities = Capabilities(
        methods=("awq",),
        bits=(4,),
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=True,
        serializable=True,
        trainable=False,
        description="AWQ in plain torch; checkpoints in the AutoAWQ GEMM format",
    )

    def is_available(self) -> Availability:
        return Availability(False, "not implemented yet")

    def storage_bits(self, config: AWQConfig, name: str, out_features: int, in_features: int) -> int:
        groups = math.ceil(in_features / config.group_size)
        return in_features * out_features * 4 + groups * out_features * (4 + 16)

    def quantize(self, model, config, *, calibration, device):
        raise NotImplementedError
