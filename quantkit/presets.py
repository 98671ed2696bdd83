"""Named configs: the short method names of the CLI and of ``quantkit compare``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .configs import QuantConfig, config_from_dict
from .errors import UnknownMethodError

PRESETS: dict[str, dict[str, Any]] = {
    "nf4": {"quant_method": "bitsandbytes", "quant_type": "nf4"},
    "nf4-dq": {"quant_method": "bitsandbytes", "quant_type": "nf4", "use_double_quant": True},
    "fp4": {"quant_method": "bitsandbytes", "quant_type": "fp4"},
    "int8": {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True},
    # LLM.int8 with activations above 1.5 (not 6) kept in float: small models' outliers are milder
    "int8-t1.5": {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True,
                  "llm_int8_threshold": 1.5},
    "gptq-4bit-g128": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "awq-4bit-g128": {"quant_method": "awq", "bits": 4, "group_size": 128},
    "hqq-4bit-g64": {"quant_method": "hqq", "nbits": 4, "group_size": 64},
    "hqq-2bit-g16": {"quant_method": "hqq", "nbits": 2, "group_size": 16, "axis": 0},  # hqq's advice for low bits
    "awq-4bit-g64": {"quant_method": "awq", "bits": 4, "group_size": 64},
    # round-to-nearest on the grids of the calibrated presets: symmetric like GPTQ's, with
    # zero points like AWQ's, so that each comparison isolates what the calibration adds
    "rtn-4bit-g128": {"quant_method": "rtn", "bits": 4, "group_size": 128, "sym": True},
    "rtn-4bit-g64": {"quant_method": "rtn", "bits": 4, "group_size": 64, "sym": False},
    **{
        f"gguf-{t.lower()}": {"quant_method": "gguf", "quant_type": t}
        for t in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
    },
}
"""Preset name -> config dict. Every ``quant_method`` is a preset of its defaults too."""


def preset(name: str, overrides: Mapping[str, Any] | None = None) -> QuantConfig:
    """The config a preset or ``quant_method`` names, with ``overrides`` applied."""
    from .configs import config_classes

    if name in PRESETS:
        data = dict(PRESETS[name])
    elif name in config_classes():
        data = {"quant_method": name}
    else:
        raise UnknownMethodError(name, [*PRESETS, *config_classes()])
    data.update(overrides or {})
    return config_from_dict(data)
