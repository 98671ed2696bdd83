"""HQQ's config and presets (importable without hqq)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from quantkit.core.config import COMPUTE_DTYPES, QuantConfig, spec
from quantkit.core.presets import Preset


@dataclass
class HQQConfig(QuantConfig):
    """HQQ: calibration-free half-quadratic quantization (1 to 8 bits)."""

    quant_method: ClassVar[str] = "hqq"

    nbits: int = spec(4, choices=(1, 2, 3, 4, 8))
    group_size: int = spec(64, valid=lambda v: v > 0, allowed="a positive int")
    axis: int = spec(1, choices=(0, 1))
    quant_zero: bool = spec(False)
    quant_scale: bool = spec(False)
    optimize: bool = spec(True)
    compute_dtype: str = spec("float32", choices=COMPUTE_DTYPES)

    @property
    def code_bits(self) -> float:
        return float(self.nbits)

    @classmethod
    def bit_widths(cls) -> tuple[float, ...]:
        return (1.0, 2.0, 3.0, 4.0, 8.0)


PRESETS = (
    Preset("hqq-4bit-g64", {"nbits": 4, "group_size": 64}, 45, "HQQ's common 4-bit setting"),
    Preset(
        "hqq-2bit-g16", {"nbits": 2, "group_size": 16, "axis": 0}, 70, "HQQ 2-bit on axis 0, hqq's advice for low bits"
    ),
)
