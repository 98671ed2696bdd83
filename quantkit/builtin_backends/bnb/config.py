"""bitsandbytes' config and presets (importable without bitsandbytes)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from quantkit.core.config import COMPUTE_DTYPES, QuantConfig, spec
from quantkit.core.errors import ConfigValueError
from quantkit.core.presets import Preset


@dataclass
class BnbConfig(QuantConfig):
    """bitsandbytes: 4-bit NF4/FP4 (optionally double-quantized) or 8-bit LLM.int8."""

    quant_method: ClassVar[str] = "bitsandbytes"
    hf_quant_method: ClassVar[str] = "bitsandbytes"
    hf_constants: ClassVar[dict[str, Any]] = {
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
    }
    hf_read_defaults: ClassVar[dict[str, Any]] = {"quant_type": "fp4"}  # transformers' default

    modules_to_not_convert: list[str] = spec(
        ["lm_head"], allowed="a list of module names or glob patterns", hf="llm_int8_skip_modules"
    )
    module_overrides: dict[str, dict[str, Any]] = spec(
        {}, allowed="a mapping from module-name pattern to a partial config dict"
    )
    load_in_4bit: bool = spec(True, hf="load_in_4bit")
    load_in_8bit: bool = spec(False, hf="load_in_8bit")
    quant_type: str = spec("nf4", choices=("nf4", "fp4"), hf="bnb_4bit_quant_type")
    use_double_quant: bool = spec(False, hf="bnb_4bit_use_double_quant")
    compute_dtype: str = spec("float32", choices=COMPUTE_DTYPES, hf="bnb_4bit_compute_dtype")
    blocksize: int = spec(64, choices=(32, 64, 128, 256, 512, 1024, 2048, 4096), doc="4-bit quantization block")
    llm_int8_threshold: float = spec(
        6.0, valid=lambda v: v >= 0, allowed=">= 0 (0 disables the outlier path)", hf="llm_int8_threshold"
    )

    def __post_init__(self) -> None:
        if not isinstance(self.compute_dtype, str) and hasattr(self.compute_dtype, "is_floating_point"):
            self.compute_dtype = str(self.compute_dtype).removeprefix("torch.")
        super().__post_init__()

    def validate(self) -> None:
        if self.load_in_4bit == self.load_in_8bit:
            raise ConfigValueError(
                "BnbConfig",
                "load_in_4bit",
                self.load_in_4bit,
                "exactly one of load_in_4bit and load_in_8bit set to True",
            )

    @property
    def bits(self) -> int:
        return 4 if self.load_in_4bit else 8

    @classmethod
    def bit_widths(cls) -> tuple[float, ...]:
        return (4.0, 8.0)

    @classmethod
    def hf_reads_legacy(cls, block: Mapping[str, Any]) -> bool:
        return bool(block.get("load_in_4bit") or block.get("load_in_8bit"))

    @classmethod
    def hf_values(cls, values: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
        """transformers' legacy blocks set only one of ``load_in_4bit``/``load_in_8bit``."""
        eight = bool(values.get("load_in_8bit", False))
        return {**values, "load_in_8bit": eight, "load_in_4bit": bool(values.get("load_in_4bit", not eight))}


PRESETS = (
    Preset("int8", {"load_in_4bit": False, "load_in_8bit": True}, 10, "LLM.int8 at its default outlier threshold 6"),
    # small models' activation outliers are milder: 1.5 keeps ~11 % of SmolLM2's input columns in float
    Preset(
        "int8-t1.5",
        {"load_in_4bit": False, "load_in_8bit": True, "llm_int8_threshold": 1.5},
        11,
        "LLM.int8 with activations above 1.5 kept in float",
    ),
    Preset("nf4", {"quant_type": "nf4"}, 30, "4-bit NormalFloat, blocks of 64"),
    Preset("nf4-dq", {"quant_type": "nf4", "use_double_quant": True}, 31, "NF4 with double quantization (QLoRA's)"),
    Preset("fp4", {"quant_type": "fp4"}, 32, "4-bit float, blocks of 64"),
)

QLORA = Preset(
    "qlora",
    {"quant_type": "nf4", "use_double_quant": True, "compute_dtype": "bfloat16"},
    doc="QLoRA's base: NF4 with double quantization and bfloat16 compute (what quantize=True means)",
)
PRESETS = (*PRESETS, QLORA)
