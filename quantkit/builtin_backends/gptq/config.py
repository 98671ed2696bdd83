"""GPTQ's config and presets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from quantkit.core.config import CalibratedConfig, spec
from quantkit.core.errors import ConfigValueError
from quantkit.core.presets import Preset

GROUP_SIZE = dict(valid=lambda v: v == -1 or v > 0, allowed="-1 (one group per row) or a positive int")
"""A row-group size field: ``-1`` is one group per row; others need not divide the row."""


@dataclass
class GPTQConfig(CalibratedConfig):
    """GPTQ: second-order weight quantization calibrated on sample text."""

    quant_method: ClassVar[str] = "gptq"
    hf_quant_method: ClassVar[str] = "gptq"
    hf_constants: ClassVar[dict[str, Any]] = {
        "format": "gptq",
        "checkpoint_format": "gptq",
        "modules_in_block_to_quantize": None,
        "use_exllama": True,
    }

    dataset: str | None = spec(None, doc="calibration dataset name or file; None: built-in text", hf="dataset")
    bits: int = spec(4, choices=(2, 3, 4, 8), hf="bits")
    group_size: int = spec(128, **GROUP_SIZE, hf="group_size")
    desc_act: bool = spec(False, doc="act-order: quantize columns by descending Hessian diagonal", hf="desc_act")
    sym: bool = spec(True, hf="sym")
    damp_percent: float = spec(0.05, valid=lambda v: 0 < v < 1, allowed="0 < damp_percent < 1", hf="damp_percent")
    static_groups: bool = spec(False, hf="static_groups")
    true_sequential: bool = spec(True, hf="true_sequential")
    act_group_aware: bool = spec(
        True,
        doc="group-aware reordering (GAR): groups and their columns by descending Hessian diagonal, "
        "groups kept contiguous; desc_act turns it off",
    )
    damp_auto_increment: float = spec(
        0.01,
        valid=lambda v: 0 <= v < 1,
        allowed="0 <= damp_auto_increment < 1",
        doc="added to damp_percent until the Hessian factorizes (0: fail instead)",
    )
    mse: float = spec(
        2.4,
        valid=lambda v: v >= 0,
        allowed="0 (min/max range) or a positive norm exponent, e.g. 2.4",
        doc="search each group's range for the least sum |w - q|**mse (GPTQModel's grid and norm, "
        "searched coarse to fine); 0: min/max, GPTQModel's default",
    )

    hf_meta_fields: ClassVar[tuple[str, ...]] = (
        "act_group_aware",
        "damp_percent",
        "damp_auto_increment",
        "mse",
        "static_groups",
        "true_sequential",
    )
    """Fields GPTQModel writes under the block's ``meta`` key (some also at the top, as transformers does)."""

    def validate(self) -> None:
        """Act-order orders every column itself: it turns GAR off, as in GPTQModel (which refuses both)."""
        if self.desc_act:
            object.__setattr__(self, "act_group_aware", False)

    def to_hf_dict(self) -> dict[str, Any]:
        """transformers' block, with GPTQModel's ``meta`` keys."""
        block = super().to_hf_dict()
        block["meta"] = {name: getattr(self, name) for name in self.hf_meta_fields}
        return block

    @classmethod
    def hf_values(cls, values: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
        """Only the ``gptq`` checkpoint format is read; a dataset given as a list of texts is dropped;
        GPTQModel's ``meta`` keys are read where the top level lacks them."""
        fmt = data.get("format", data.get("checkpoint_format", "gptq"))
        if fmt != "gptq":
            raise ConfigValueError("GPTQConfig", "format", fmt, "'gptq'")
        if not isinstance(values.get("dataset"), str):
            values.pop("dataset", None)
        meta = data.get("meta")
        if isinstance(meta, Mapping):
            for name in cls.hf_meta_fields:
                if meta.get(name) is not None and name not in data:
                    values[name] = meta[name]
        return values

    @property
    def symmetric(self) -> bool:
        return self.sym


PRESETS = (Preset("gptq-4bit-g128", {"bits": 4, "group_size": 128}, 41, "GPTQ's common 4-bit setting"),)
