"""What a backend can do, declared as data."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from .hardware import Hardware


@dataclass(frozen=True)
class Capabilities:
    """A backend's declaration of what it supports, read by generic code.

    ``quantize_hardware`` and ``inference_hardware`` are separate: some formats
    are produced on one kind of machine and run on others. The method and its bit
    widths are not repeated here: they are the config class's (``quant_method``,
    ``bit_widths()``).
    """

    quantize_hardware: frozenset[Hardware]
    inference_hardware: frozenset[Hardware]
    requires_calibration: bool
    serializable: bool
    trainable: bool
    requires: tuple[str, ...] = ()
    """Importable module names the backend needs at run time."""
    description: str = ""
    merges_adapters: bool = False
    """``quantkit.finetune.merge_adapter`` can fold a LoRA adapter into this format
    (dequantize, add, quantize again); refused with the reason when False."""
    peft_native: bool = False
    """peft wraps this backend's layers with its own LoRA classes (bitsandbytes, hqq);
    otherwise quantkit's ``QuantizedLoraLinear`` does."""

    def missing_requirements(self) -> list[str]:
        return [name for name in self.requires if importlib.util.find_spec(name) is None]

    def to_dict(self) -> dict:
        order = [h.value for h in Hardware]
        return {
            "quantize_hardware": sorted((h.value for h in self.quantize_hardware), key=order.index),
            "inference_hardware": sorted((h.value for h in self.inference_hardware), key=order.index),
            "requires_calibration": self.requires_calibration,
            "serializable": self.serializable,
            "trainable": self.trainable,
            "requires": list(self.requires),
            "description": self.description,
            "merges_adapters": self.merges_adapters,
            "peft_native": self.peft_native,
        }


ALL_HARDWARE = frozenset(Hardware)


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; falsy with a ``reason`` when not."""

    ok: bool
    reason: str = field(default="")

    def __bool__(self) -> bool:
        return self.ok
