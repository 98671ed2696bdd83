"""GGUF's config, llama.cpp's type names, and presets."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from quantkit.core.config import QuantConfig, spec
from quantkit.core.presets import Preset

GGUF_TENSOR_TYPES = (
    "F16",
    "BF16",
    "Q8_0",
    "Q5_1",
    "Q5_0",
    "Q4_1",
    "Q4_0",
    "Q6_K",
    "Q5_K",
    "Q4_K",
    "Q3_K",
    "Q2_K",
)
GGUF_MIXES = ("Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S", "Q3_K_L", "Q2_K")


def ggml_code_bits(ggml_type: str) -> float:
    """Code width a ggml type's name states: ``Q4_K_M`` 4, ``IQ4_NL`` 4, ``BF16`` 16."""
    return float(re.search(r"(\d+)", ggml_type).group(1))


@dataclass
class GGUFConfig(QuantConfig):
    """GGUF (llama.cpp): one tensor type for every linear, or a llama.cpp mix."""

    quant_method: ClassVar[str] = "gguf"

    quant_type: str = spec("Q4_K_M", choices=tuple(dict.fromkeys(GGUF_TENSOR_TYPES + GGUF_MIXES)))

    @property
    def code_bits(self) -> float:
        """The width the type or mix is named for; the GGUF backend's per-tensor
        :meth:`~quantkit.core.backend.Backend.code_bits` follows llama.cpp's mix rules and fallbacks."""
        return ggml_code_bits(self.quant_type)

    @classmethod
    def bit_widths(cls) -> tuple[float, ...]:
        return tuple(sorted({ggml_code_bits(t) for t in GGUF_TENSOR_TYPES}))


PRESETS = tuple(
    Preset(f"gguf-{t.lower()}", {"quant_type": t}, rank, f"llama.cpp's {t}")
    for t, rank in (
        ("Q8_0", 20),
        ("Q6_K", 21),
        ("Q5_K_M", 22),
        ("Q4_K_M", 50),
        ("Q4_0", 51),
        ("Q3_K_M", 52),
        ("Q2_K", 53),
    )
)
