"""The methods of a comparison: quantization configs or float dtypes, resolved from names,
presets and method files with the protocol's calibration."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.backend import Backend
from ..core.config import QuantConfig
from ..core.config_files import read_config_file
from ..core.errors import ConfigValueError, QuantkitError
from ..core.hardware import hardware_of
from ..core.registry import get_registry
from ..core.resolve import config_from_dict, default_comparison, preset
from ..estimate import FLOAT_BITS
from .protocol import Protocol, digest

BASELINE = "fp32"


FLOAT_DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Unquantized methods by name: the model stored in a float dtype (of :data:`~quantkit.estimate.FLOAT_BITS`)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Method:
    """One row of the comparison: a quantization config, or the model in a float dtype."""

    name: str
    config: QuantConfig | None = None
    dtype: str = "float32"
    """Storage dtype of an unquantized method (``config is None``)."""
    evaluations: int | None = None
    """How many times the worker evaluates it when its backend is not deterministic (the result
    is the median one, with their spread); ``None``: once, the numbers reproduce exactly."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigValueError("Method", "name", self.name, "letters, digits, '.', '_' and '-'")
        if self.config is None and self.dtype not in FLOAT_DTYPES.values():
            raise ConfigValueError("Method", "dtype", self.dtype, ", ".join(FLOAT_DTYPES.values()))
        if self.evaluations is not None and (not isinstance(self.evaluations, int) or self.evaluations < 1):
            raise ConfigValueError("Method", "evaluations", self.evaluations, "None or a positive int")

    @property
    def is_float(self) -> bool:
        """Whether this is the model in a float dtype, not a quantization config."""
        return self.config is None

    def to_dict(self) -> dict[str, Any]:
        """Name, config dict and dtype (and :attr:`evaluations` when set): what the worker gets."""
        data = {
            "name": self.name,
            "config": None if self.config is None else self.config.to_dict(),
            "dtype": self.dtype,
        }
        if self.evaluations is not None:  # absent for deterministic methods: their keys predate it
            data["evaluations"] = self.evaluations
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Method:
        """The method :meth:`to_dict` wrote."""
        config = data.get("config")
        return cls(
            data["name"],
            None if config is None else config_from_dict(config),
            data.get("dtype", "float32"),
            data.get("evaluations"),
        )

    def key(self) -> str:
        """A short hash: a result counts for this method only when measured with the same key."""
        return digest(self.to_dict())

    @property
    def nominal_bits(self) -> float | None:
        """The bit width the method is named for (4 for NF4 and Q4_K_M, 16 for bf16)."""
        if self.config is None:
            return float(FLOAT_BITS[self.dtype])
        return self.config.code_bits


def backend_for(method: Method, protocol: Protocol) -> Backend | None:
    """The backend that runs ``method`` on the protocol's device (``None`` for a float method);
    raises a :class:`QuantkitError` saying why when none can."""
    if method.is_float:
        return None
    return get_registry().backend_for(method.config, hardware_of(protocol.device))


def quantized_method(name: str, config: QuantConfig, protocol: Protocol) -> Method:
    """``config`` as the method ``name``, evaluated ``protocol.repeats`` times when its backend
    declares it is not deterministic (once when no backend can run it: it is reported unavailable)."""
    method = Method(name, config)
    try:
        deterministic = backend_for(method, protocol).deterministic(config)
    except QuantkitError:
        return method
    return method if deterministic else dataclasses.replace(method, evaluations=protocol.repeats)


def method_from_name(
    name: str, protocol: Protocol, overrides: Mapping[str, Any] | None = None, label: str | None = None
) -> Method:
    """``fp32``/``bf16``/``fp16``, a preset or a ``quant_method``, with the protocol's calibration."""
    if name in FLOAT_DTYPES:
        return Method(label or name, None, FLOAT_DTYPES[name])
    config = with_protocol(preset(name, overrides), protocol, explicit=set(overrides or ()))
    return quantized_method(label or name, config, protocol)


def with_protocol(config: QuantConfig, protocol: Protocol, explicit: Iterable[str] = ()) -> QuantConfig:
    """``config`` with the protocol's calibration samples, length and text, unless set explicitly."""
    explicit = set(explicit)
    fields = {f.name for f in dataclasses.fields(config)}
    wanted = {
        "nsamples": protocol.calibration_samples,
        "seqlen": protocol.calibration_seqlen,
        "dataset": protocol.dataset,
    }
    changes = {k: v for k, v in wanted.items() if k in fields and k not in explicit}
    return dataclasses.replace(config, **changes) if changes else config


def methods_from_file(path: Path, protocol: Protocol) -> list[Method]:
    """Methods from a YAML/JSON file: a list (or ``{"methods": [...]}``) whose entries are
    preset names or dicts with a ``name`` and either ``preset`` (plus field overrides)
    or a full config (``quant_method`` and fields)."""
    data = read_config_file(path)
    entries = data.get("methods") if isinstance(data, Mapping) else data
    if not isinstance(entries, list):
        raise ConfigValueError(str(path), "methods", type(entries).__name__, "a list of method entries")
    methods = []
    for entry in entries:
        if isinstance(entry, str):
            methods.append(method_from_name(entry, protocol))
            continue
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise ConfigValueError(str(path), "entry", entry, "a preset name or a dict with a 'name'")
        fields = {k: v for k, v in entry.items() if k not in ("name", "preset")}
        if "quant_method" in entry:
            config = with_protocol(config_from_dict(fields), protocol, explicit=fields)
            methods.append(quantized_method(entry["name"], config, protocol))
        else:
            methods.append(method_from_name(entry.get("preset", entry["name"]), protocol, fields, entry["name"]))
    return methods


def resolve_methods(names: Sequence[str] | None, protocol: Protocol, config_file: Path | None = None) -> list[Method]:
    """The methods to compare, the float baseline first (added when missing).

    ``names`` may include ``default`` (the presets' default comparison) and ``all``
    (every float dtype and preset).
    """
    methods = methods_from_file(config_file, protocol) if config_file else []
    groups = {"default": (BASELINE, *default_comparison()), "all": (*FLOAT_DTYPES, *get_registry().presets)}
    if names or not config_file:
        expanded = [n for name in (names or ["default"]) for n in groups.get(name, (name,))]
        methods += [method_from_name(n, protocol) for n in dict.fromkeys(expanded)]
    seen: set[str] = set()
    for m in methods:
        if m.name in seen:
            raise ConfigValueError("compare", "methods", m.name, "unique method names")
        seen.add(m.name)
    baseline = [m for m in methods if m.name == BASELINE] or [method_from_name(BASELINE, protocol)]
    return baseline + [m for m in methods if m.name != BASELINE]
