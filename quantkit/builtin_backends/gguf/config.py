"""GGUF's config, llama.cpp's type names, and presets."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from quantkit.core.config import QuantConfig, spec
from quantkit.core.errors import ConfigValueError
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
    "IQ4_XS",
    "IQ4_NL",
)
GGUF_MIXES = ("Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S", "Q3_K_L", "Q2_K")
IMATRIX_FILE_SUFFIXES = (".gguf", ".dat")
"""Suffixes that make ``GGUFConfig.imatrix`` a llama.cpp importance-matrix file rather than calibration text."""
_WHOLE_MODEL_FIELDS = ("imatrix", "nsamples", "seqlen")


def ggml_code_bits(ggml_type: str) -> float:
    """Code width a ggml type's name states: ``Q4_K_M`` 4, ``IQ4_NL`` 4, ``BF16`` 16."""
    return float(re.search(r"(\d+)", ggml_type).group(1))


@dataclass
class GGUFConfig(QuantConfig):
    """GGUF (llama.cpp): one tensor type for every linear, or a llama.cpp mix.

    ``imatrix`` weights the K-quant and legacy quantizers' errors per input column, as
    llama-quantize's ``--imatrix``: a llama.cpp importance-matrix file (``.gguf`` or ``.dat``,
    from ``llama-imatrix`` or :meth:`ImportanceMatrix.save`), or calibration text (a dataset
    name such as ``"pydoc"``, or a text file) from which ``nsamples`` windows of ``seqlen``
    tokens are drawn and a matrix is collected on the float model before quantizing.

    As llama-quantize, every linear is quantized by default, the output matrix too (Q6_K in the
    mixes): ``modules_to_not_convert`` is empty unless given.
    """

    quant_method: ClassVar[str] = "gguf"

    modules_to_not_convert: list[str] = spec([], allowed="a list of module names or glob patterns")

    quant_type: str = spec("Q4_K_M", choices=tuple(dict.fromkeys(GGUF_TENSOR_TYPES + GGUF_MIXES)))
    imatrix: str | None = spec(
        None,
        valid=lambda v: bool(v.strip()),
        allowed="None, a llama.cpp imatrix file (.gguf or .dat) or calibration text (a dataset name or text file)",
        doc="importance matrix: a llama.cpp imatrix file (.gguf, .dat), or calibration text to collect one from",
    )
    nsamples: int = spec(128, valid=lambda v: v > 0, allowed="a positive int", doc="calibration windows (imatrix)")
    seqlen: int = spec(512, valid=lambda v: v > 0, allowed="a positive int", doc="tokens per window (imatrix)")

    def validate(self) -> None:
        for pattern, partial in self.module_overrides.items():
            fixed = [key for key in partial if key in _WHOLE_MODEL_FIELDS] if isinstance(partial, dict) else []
            if fixed:
                raise ConfigValueError(
                    type(self).__name__,
                    f"module_overrides[{pattern!r}]",
                    fixed[0],
                    "quant_type (the importance matrix and its calibration are the whole model's)",
                )

    @property
    def imatrix_is_file(self) -> bool:
        """Whether ``imatrix`` names a llama.cpp imatrix file (``.gguf``/``.dat``), not calibration text."""
        return self.imatrix is not None and self.imatrix.lower().endswith(IMATRIX_FILE_SUFFIXES)

    @property
    def dataset(self) -> str | None:
        """The calibration text an importance matrix is collected from (``None`` when none is)."""
        return None if self.imatrix is None or self.imatrix_is_file else self.imatrix

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
