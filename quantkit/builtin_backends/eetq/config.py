"""EETQ's config and presets (importable without the eetq library)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from quantkit.core.config import QuantConfig, spec
from quantkit.core.presets import Preset


@dataclass
class EETQConfig(QuantConfig):
    """EETQ: symmetric int8 weights with one float16 scale per output channel, activations in float.

    transformers' ``EetqConfig(weights="int8", modules_to_not_convert=...)`` block, field for field.
    """

    quant_method: ClassVar[str] = "eetq"
    hf_quant_method: ClassVar[str] = "eetq"

    weights: str = spec("int8", choices=("int8",), doc="weight type (EETQ stores int8 only)", hf="weights")

    @property
    def bits(self) -> int:
        return 8

    @property
    def symmetric(self) -> bool:
        return True

    @classmethod
    def bit_widths(cls) -> tuple[float, ...]:
        return (8.0,)


# beside the other int8 rows (LLM.int8 at 10 and 11, GGUF Q8_0 at 20)
PRESETS = (Preset("eetq-int8", {}, 12, "EETQ int8 weight-only, one scale per output channel"),)
