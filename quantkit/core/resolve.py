"""From what a user writes to a config: method names, presets, dicts, transformers blocks.

Sits above the registry: every name is looked up among what the plugins registered.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from .config import QuantConfig
from .config_files import read_json
from .errors import ConfigTypeError, UnknownFieldError
from .registry import get_registry

SHORT_FORM_PRESET = "qlora"
"""The preset ``True`` names (and a dict without ``quant_method`` overrides): QLoRA's 4-bit base."""


def config_from_dict(data: Mapping[str, Any]) -> QuantConfig:
    """Build the config that ``data["quant_method"]`` names (a built-in's or a plugin's)."""
    if not isinstance(data, Mapping):
        raise ConfigTypeError("QuantConfig", "(config)", data, "a dict with a 'quant_method' key")
    method = data.get("quant_method")
    registry = get_registry()
    method = registry.method_name(method)
    return registry.config_class(method).from_dict({**data, "quant_method": method})


def config_from_json_file(path: str | os.PathLike) -> QuantConfig:
    """Read a config written by :meth:`QuantConfig.to_json_file`, whatever its method."""
    return config_from_dict(read_json(path))


def config_from_hf_dict(data: Mapping[str, Any]) -> QuantConfig:
    """Read a ``quantization_config`` block: transformers' own (bitsandbytes, gptq, awq) or
    one quantkit wrote for another method."""
    if not isinstance(data, Mapping):
        raise ConfigTypeError("quantization_config", "(block)", data, "a dict")
    data = dict(data)
    method = str(data.get("quant_method", "")).lower()
    registry = get_registry()
    if "schema_version" not in data:
        cls = registry.config_class_for_hf(method, data)
        if cls is not None:
            return cls.from_hf_dict(data)
    return config_from_dict({**data, "quant_method": method})


def preset(name: str, overrides: Mapping[str, Any] | None = None) -> QuantConfig:
    """The config a preset, a ``quant_method`` or an alias names (case ignored), with ``overrides`` applied."""
    registry = get_registry()
    if not isinstance(name, str):
        raise ConfigTypeError("method", "name", name, "a preset or method name (str)")
    method, fields = registry.lookup(name)
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigTypeError(name, "overrides", overrides, "a dict of config fields")
    return config_from_dict({**fields, **(overrides or {}), "quant_method": method})


def as_config(value: QuantConfig | Mapping[str, Any] | bool | str) -> QuantConfig:
    """Normalize every accepted way of naming a config.

    - a :class:`QuantConfig`: returned as is;
    - ``True``: QLoRA's 4-bit base (NF4, double quantization, bfloat16 compute);
    - a dict with ``quant_method``: that config; without it: the ``True`` form with
      these fields overridden;
    - a string: a preset, method name or alias (``quantkit backends`` lists them).
    """
    if isinstance(value, QuantConfig):
        return value
    if value is True:
        return preset(SHORT_FORM_PRESET)
    if isinstance(value, Mapping):
        if "quant_method" in value:
            return config_from_dict(value)
        base = preset(SHORT_FORM_PRESET)
        known = {f.name for f in dataclasses.fields(base)}
        for key in value:
            if key not in known:
                raise UnknownFieldError(type(base).__name__, str(key), known)
        return dataclasses.replace(base, **value)
    if isinstance(value, str):
        return preset(value)
    raise ConfigTypeError("quantize", "config", value, "a QuantConfig, a dict, True or a preset name")


def default_comparison() -> tuple[str, ...]:
    """The presets of ``quantkit compare``'s default run, in the order the backends rank them."""
    ranked = [
        (p.preset.comparison_rank, name)
        for name, p in get_registry().presets.items()
        if p.preset.comparison_rank is not None
    ]
    return tuple(name for _, name in sorted(ranked))
