"""Round-to-nearest's config and presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from quantkit.builtin_backends.gptq.config import GROUP_SIZE
from quantkit.core.config import QuantConfig, spec
from quantkit.core.presets import Preset


@dataclass
class RTNConfig(QuantConfig):
    """Round-to-nearest group quantization: the calibration-free reference point."""

    quant_method: ClassVar[str] = "rtn"

    bits: int = spec(4, choices=(2, 3, 4, 8))
    group_size: int = spec(128, **GROUP_SIZE)
    sym: bool = spec(False)

    @property
    def symmetric(self) -> bool:
        return self.sym


# On the grids of the calibrated presets: symmetric like GPTQ's, with zero points like AWQ's,
# so that each comparison isolates what the calibration adds.
PRESETS = (
    Preset("rtn-4bit-g128", {"bits": 4, "group_size": 128, "sym": True}, 40, "GPTQ's grid without calibration"),
    Preset("rtn-4bit-g64", {"bits": 4, "group_size": 64, "sym": False}, 43, "AWQ's g64 grid without calibration"),
)
