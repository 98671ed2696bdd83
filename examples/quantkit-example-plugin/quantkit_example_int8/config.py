"""The plugin's config: a dataclass keyed by its own ``quant_method``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from quantkit import QuantConfig, spec


@dataclass
class AbsmaxInt8Config(QuantConfig):
    """Symmetric int8 weights with one float scale per output channel."""

    quant_method: ClassVar[str] = "absmax-int8"

    scale_dtype: str = spec("float32", choices=("float32", "float16"))

    @classmethod
    def bit_widths(cls) -> tuple[float, ...]:
        return (8.0,)
