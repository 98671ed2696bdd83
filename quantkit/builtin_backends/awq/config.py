"""AWQ's config and presets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from quantkit.core.config import CalibratedConfig, spec
from quantkit.core.presets import Preset


@dataclass
class AWQConfig(CalibratedConfig):
    """AWQ: activation-aware scaling and clipping, then 4-bit group quantization."""

    quant_method: ClassVar[str] = "awq"
    hf_quant_method: ClassVar[str] = "awq"

    bits: int = spec(4, choices=(4,), hf=("bits", "w_bit"))
    group_size: int = spec(128, choices=(32, 64, 128), hf=("group_size", "q_group_size"))
    zero_point: bool = spec(True, hf="zero_point")
    version: str = spec("gemm", choices=("gemm", "gemv"), hf="version")

    @classmethod
    def hf_values(cls, values: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
        """AutoAWQ writes ``version`` as ``GEMM``/``GEMV``."""
        if "version" in values:
            values["version"] = str(values["version"]).lower()
        return values

    @property
    def symmetric(self) -> bool:
        return not self.zero_point


PRESETS = (
    Preset("awq-4bit-g128", {"bits": 4, "group_size": 128}, 42, "AWQ's common 4-bit setting"),
    Preset("awq-4bit-g64", {"bits": 4, "group_size": 64}, 44, "AWQ for models whose rows 128 does not divide"),
)
