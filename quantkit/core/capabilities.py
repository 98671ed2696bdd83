"""What a backend can do, declared as data, and the one check of the shape limits it declares."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import QuantConfig
from .errors import ConfigValueError, QuantizationError, QuantkitError
from .hardware import Hardware
from .linears import Target

LAYER_DIMENSIONS = ("in_features", "out_features")

Factor = str | int
"""A factor of a :class:`ShapeLimit`: a layer dimension, a config field name or an int."""


@dataclass(frozen=True)
class ShapeLimit:
    """A limit of a format on the linears it stores: the product of ``of`` must be a multiple
    of the product of ``by`` (as GPTQModel's kernels declare the widths they take).

    A factor is a linear's ``in_features`` or ``out_features``, a field of the layer's
    effective config (``bits``, ``group_size``) or an int; a lone factor needs no tuple.
    ``when`` restricts the limit to configs with these field values (AWQ's two layouts);
    ``reason`` says why the format needs it. E.g. GPTQ's
    ``ShapeLimit(("in_features", "bits"), 32, "GPTQ packs the codes into 32-bit words")``.
    """

    of: tuple[Factor, ...]
    by: tuple[Factor, ...]
    reason: str
    when: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("of", "by"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, (getattr(self, name),))

    def __str__(self) -> str:
        when = ", ".join(f"{k}={v!r}" for k, v in self.when.items())
        return self.rule + (f" when {when}" if when else "")

    @property
    def rule(self) -> str:
        """The limit in words: ``in_features * bits must be a multiple of 32``."""
        return f"{' * '.join(map(str, self.of))} must be a multiple of {' * '.join(map(str, self.by))}"

    @property
    def factor_fields(self) -> tuple[str, ...]:
        """The config fields among the factors."""
        factors = (*self.of, *self.by)
        return tuple(dict.fromkeys(f for f in factors if isinstance(f, str) and f not in LAYER_DIMENSIONS))

    def applies(self, config: QuantConfig) -> bool:
        return all(getattr(config, key, None) == value for key, value in self.when.items())

    def holds(self, linear: nn.Module, config: QuantConfig) -> bool:
        if not self.applies(config):
            return True
        return self._product(self.of, linear, config) % self._product(self.by, linear, config) == 0

    def describe_layer(self, target: Target) -> str:
        """One offending layer with its numbers: ``q_proj (in_features=96, 96 % 64 = 32)``."""
        name, linear, config = target
        dims = [f"{f}={getattr(linear, f)}" for f in dict.fromkeys((*self.of, *self.by)) if f in LAYER_DIMENSIONS]
        quantity, divisor = self._product(self.of, linear, config), self._product(self.by, linear, config)
        steps = [f"{quantity} % {divisor} = {quantity % divisor}"]
        if len(self.of) > 1:
            steps.insert(0, f"{' * '.join(str(self._value(f, linear, config)) for f in self.of)} = {quantity}")
        return f"{name} ({', '.join([*dims, *steps])})"

    @staticmethod
    def _value(factor: Factor, linear: nn.Module, config: QuantConfig) -> int:
        if isinstance(factor, int):
            return factor
        return getattr(linear if factor in LAYER_DIMENSIONS else config, factor)

    @classmethod
    def _product(cls, factors: tuple[Factor, ...], linear: nn.Module, config: QuantConfig) -> int:
        result = 1
        for factor in factors:
            result *= cls._value(factor, linear, config)
        return result


class ShapeLimitError(QuantizationError, ConfigValueError):
    """Layers of the model break a :class:`ShapeLimit` of their backend. Also a
    :class:`ConfigValueError`: the config's ``field`` does not fit this model."""

    def __init__(self, limit: ShapeLimit, bad: Sequence[Target], fitting: Sequence[str]):
        config = bad[0].config
        fields = (*limit.factor_fields, *(k for k in limit.when if k not in limit.factor_fields))
        self.config, self.allowed = type(config).__name__, limit.rule
        self.field = fields[0] if fields else str(limit.of[0])
        self.value = getattr(config if fields else bad[0].linear, self.field)
        settings = ", ".join(f"{f}={getattr(config, f)!r}" for f in fields)
        layers = "; ".join(limit.describe_layer(t) for t in bad[:3])
        if len(bad) > 3:
            layers += f"; and {len(bad) - 3} more"
        remedy = "Change the config"
        if fitting:
            remedy = f"Every layer fits {' or '.join(fitting)}: use {'it' if len(fitting) == 1 else 'one'},"
        Exception.__init__(
            self,
            f"{' '.join(filter(None, (self.config, settings)))} does not fit {len(bad)} layer(s): {limit.rule} "
            f"({limit.reason}); {layers}. {remedy} or add those layers to modules_to_not_convert",
        )


def check_shape_limits(targets: Sequence[Target], limits: Sequence[ShapeLimit]) -> None:
    """Refuse, before anything is quantized, targets breaking one of ``limits``: the
    :class:`ShapeLimitError` names the layers and offers the values of the limit's config
    fields (among their declared ``choices``) that would fit every layer."""
    for limit in limits:
        bad = [t for t in targets if not limit.holds(t.linear, t.config)]
        if bad:
            raise ShapeLimitError(limit, bad, _fitting_values(limit, bad[0].config, targets, limits))


def _fitting_values(
    limit: ShapeLimit, config: QuantConfig, targets: Sequence[Target], limits: Sequence[ShapeLimit]
) -> list[str]:
    """``field=value`` for each declared choice of the limit's config fields that every target
    would satisfy, with every limit."""
    choices = {f.name: f.metadata.get("choices") or () for f in dataclasses.fields(config)}
    fitting = []
    for name in limit.factor_fields:
        for value in choices.get(name, ()):
            if value == getattr(config, name):
                continue
            try:
                changed = [(t.linear, dataclasses.replace(t.config, **{name: value})) for t in targets]
            except QuantkitError:  # the value does not combine with the config's other fields
                continue
            if all(other.holds(linear, cfg) for other in limits for linear, cfg in changed):
                fitting.append(f"{name}={value!r}")
    return fitting


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
    shape_limits: tuple[ShapeLimit, ...] = ()
    """What the format needs of every linear it stores, checked on all of them before any is
    quantized (:func:`check_shape_limits`)."""
    quality_floor_bits: float = 3.0
    """The fewest nominal bits per weight at which the method keeps usable quality on typical
    LLMs (scalar codes collapse below ~3; additive codebooks hold at 2); ``quantkit recommend``'s
    ``smallest`` goes no lower without measurements."""

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
            "shape_limits": [str(limit) for limit in self.shape_limits],
            "quality_floor_bits": self.quality_floor_bits,
        }


ALL_HARDWARE = frozenset(Hardware)


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; falsy with a ``reason`` when not."""

    ok: bool
    reason: str = field(default="")

    def __bool__(self) -> bool:
        return self.ok
