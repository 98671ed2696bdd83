"""The base of every quantization config: fields declared as data, validated, serialized.

Configs are plain data: they validate themselves in ``__post_init__``, round-trip
exactly through dicts and JSON, and never import their backend's library.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .config_files import read_json
from .errors import ConfigTypeError, ConfigValueError, UnknownFieldError

SCHEMA_VERSION = 1
"""Version of the dict layout written by :meth:`QuantConfig.to_dict`."""

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
HF_EXACT_CONFIG_KEY = "quantkit_config"
"""Key of a ``quantization_config`` block under which quantkit also saves its exact config
(fields transformers has no key for, e.g. module overrides); transformers ignores it."""


def spec(
    default: Any,
    *,
    choices: tuple | None = None,
    valid: Callable[[Any], bool] | None = None,
    allowed: str | None = None,
    doc: str = "",
    hf: str | tuple[str, ...] | None = None,
) -> Any:
    """Declare a config field: its default and the values it accepts.

    ``choices`` lists every allowed value; ``valid`` is a predicate with
    ``allowed`` describing it in words for error messages. ``hf`` names the
    key of transformers' ``quantization_config`` block that holds this field
    (a tuple: the key written first, then older names also read).
    """
    metadata = {"choices": choices, "valid": valid, "allowed": allowed, "doc": doc, "hf": hf}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def module_matches(name: str, pattern: str) -> bool:
    """True when module ``name`` is ``pattern``, lies under it, ends with it, or globs it.

    ``"lm_head"`` matches ``"lm_head"`` and ``"model.lm_head"``;
    ``"model.layers.0"`` matches every module inside layer 0;
    ``"*.mlp.down_proj"`` matches every down projection.
    """
    return (
        name == pattern
        or name.endswith("." + pattern)
        or name.startswith(pattern + ".")
        or fnmatch.fnmatchcase(name, pattern)
    )


_NOT_OVERRIDABLE = ("module_overrides", "modules_to_not_convert")


@dataclass
class QuantConfig:
    """Base of every quantization config.

    Subclasses set the class attribute ``quant_method`` and declare their
    fields with :func:`spec`. Shared fields:

    - ``modules_to_not_convert``: module names or glob patterns kept in full
      precision (``lm_head`` by default).
    - ``module_overrides``: ``{pattern: {field: value}}``; the first matching
      pattern's fields replace this config's for that module, e.g.
      ``{"*.down_proj": {"bits": 8}}``.
    """

    quant_method: ClassVar[str] = ""

    hf_quant_method: ClassVar[str | None] = None
    """transformers' ``quant_method`` for this method; ``None`` when transformers has no block
    for it (the saved ``quantization_config`` is then quantkit's :meth:`to_dict`)."""
    hf_constants: ClassVar[Mapping[str, Any]] = {}
    """Keys of transformers' block that quantkit always writes with these values."""
    hf_read_defaults: ClassVar[Mapping[str, Any]] = {}
    """Values transformers assumes for keys missing from its block, where not this config's defaults."""

    modules_to_not_convert: list[str] = spec(
        ["lm_head"], allowed="a list of module names or glob patterns", hf="modules_to_not_convert"
    )
    module_overrides: dict[str, dict[str, Any]] = spec(
        {}, allowed="a mapping from module-name pattern to a partial config dict", hf="module_overrides"
    )

    # -- validation -------------------------------------------------------

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            value = self._check_type(f.name, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            self._check_allowed(f, value)
        self.validate()
        for pattern, partial in self.module_overrides.items():
            self._check_override(pattern, partial)

    def validate(self) -> None:
        """Cross-field rules; subclasses override and raise ConfigValueError."""

    def _check_type(self, name: str, value: Any, hint: Any) -> Any:
        config = type(self).__name__
        is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        if value is None:
            if is_union and type(None) in typing.get_args(hint):
                return None
            raise ConfigTypeError(config, name, value, _hint_name(hint))
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if is_union else hint
        origin = typing.get_origin(base) or base
        if origin is bool:
            ok = isinstance(value, bool)
        elif origin is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif origin is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        elif origin is str:
            ok = isinstance(value, str)
        elif origin is list:
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            value = list(value) if ok else value
        elif origin is dict:
            ok = isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
            value = {k: dict(v) if isinstance(v, Mapping) else v for k, v in value.items()} if ok else value
        else:  # pragma: no cover - a config declared a type this base cannot check
            raise TypeError(f"{config}.{name}: unsupported annotation {hint!r}")
        if not ok:
            raise ConfigTypeError(config, name, value, _hint_name(hint))
        return value

    def _check_allowed(self, f: dataclasses.Field, value: Any) -> None:
        if value is None:
            return
        choices, valid = f.metadata.get("choices"), f.metadata.get("valid")
        if choices is not None and value not in choices:
            raise ConfigValueError(type(self).__name__, f.name, value, ", ".join(map(repr, choices)))
        if valid is not None and not valid(value):
            raise ConfigValueError(type(self).__name__, f.name, value, f.metadata["allowed"])

    def _check_override(self, pattern: str, partial: Any) -> None:
        name = type(self).__name__
        if not isinstance(partial, Mapping):
            raise ConfigTypeError(name, f"module_overrides[{pattern!r}]", partial, "dict")
        for key in partial:
            if key in _NOT_OVERRIDABLE:
                raise ConfigValueError(
                    name,
                    f"module_overrides[{pattern!r}]",
                    key,
                    "any field except " + ", ".join(_NOT_OVERRIDABLE),
                )
        self._replace(partial)

    # -- per-module configs -----------------------------------------------

    @property
    def code_bits(self) -> float | None:
        """Bits of each weight's code, scales and zeros left out (4 for NF4, GPTQ 4-bit and
        Q4_K_M): the config's ``bits`` where it has one (field or property); ``None`` for a
        method without one width. Configs naming their width otherwise override it."""
        bits = getattr(self, "bits", None)
        return None if bits is None else float(bits)

    @property
    def symmetric(self) -> bool | None:
        """Whether the grid has no zero point (``None``: the method has no such choice); the
        comparison pairs calibrated methods with round-to-nearest on the same grid by it."""
        return None

    def skips(self, module_name: str) -> bool:
        """True when ``module_name`` is listed in ``modules_to_not_convert``."""
        return any(module_matches(module_name, p) for p in self.modules_to_not_convert)

    def for_module(self, module_name: str) -> QuantConfig:
        """The effective config of one module: the first matching override applied."""
        for pattern, partial in self.module_overrides.items():
            if module_matches(module_name, pattern):
                return self._replace(partial)
        return self

    def _replace(self, partial: Mapping[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(self)}
        for key in partial:
            if key not in known:
                raise UnknownFieldError(type(self).__name__, key, known)
        return dataclasses.replace(self, **partial, module_overrides={})

    # -- serialization ----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field, plus ``quant_method`` and ``schema_version``."""
        data = {"quant_method": self.quant_method, "schema_version": SCHEMA_VERSION}
        data.update(copy.deepcopy({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}))
        return data

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the fields that differ from the defaults, plus ``quant_method``."""
        default = type(self)()
        diff = {"quant_method": self.quant_method}
        for f in dataclasses.fields(self):
            if getattr(self, f.name) != getattr(default, f.name):
                diff[f.name] = copy.deepcopy(getattr(self, f.name))
        return diff

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise ConfigTypeError(cls.__name__, "(config)", data, "a dict of config fields")
        data = dict(data)
        method = data.pop("quant_method", cls.quant_method)
        if method != cls.quant_method:
            raise ConfigValueError(cls.__name__, "quant_method", method, repr(cls.quant_method))
        version = data.pop("schema_version", SCHEMA_VERSION)
        if type(version) is not int or not 1 <= version <= SCHEMA_VERSION:
            raise ConfigValueError(cls.__name__, "schema_version", version, f"1..{SCHEMA_VERSION}")
        data = cls.migrate(data, version)
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise UnknownFieldError(cls.__name__, key, known)
        return cls(**data)

    @classmethod
    def migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """Upgrade a dict written with an older ``schema_version`` (none so far)."""
        return data

    def to_json_string(self, *, diff: bool = False) -> str:
        return json.dumps(self.to_diff_dict() if diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> QuantConfig:
        """Read a file written by :meth:`to_json_file`; on :class:`QuantConfig` itself, use
        ``quantkit.config_from_json_file``, which reads any registered method's."""
        return cls.from_dict(read_json(path))

    # -- transformers' ``quantization_config`` block ------------------------

    @classmethod
    def bit_widths(cls) -> tuple[float, ...]:
        """Every code width this config can ask for (``quantkit backends`` shows them): the
        choices of its ``bits`` field; configs without one override this."""
        bits = next((f for f in dataclasses.fields(cls) if f.name == "bits"), None)
        choices = bits.metadata.get("choices") if bits is not None else None
        return tuple(sorted(float(b) for b in choices)) if choices else ()

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` block transformers writes for this method: every field
        declared with ``spec(hf=...)`` under its transformers key, plus :attr:`hf_constants`.
        ``module_overrides`` (quantkit's own key, ignored by transformers) only when set."""
        if self.hf_quant_method is None:
            raise ConfigValueError(
                type(self).__name__,
                "quant_method",
                self.quant_method,
                "a method transformers serializes (bitsandbytes, gptq, awq)",
            )
        block: dict[str, Any] = {"quant_method": self.hf_quant_method, **copy.deepcopy(dict(self.hf_constants))}
        for f, keys in _hf_fields(type(self)):
            value = copy.deepcopy(getattr(self, f.name))
            if f.name == "module_overrides" and not value:
                continue
            block[keys[0]] = value
        return block

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """Read transformers' block (or quantkit's exact config saved under
        ``quantkit_config`` beside it). Missing or empty keys take the defaults."""
        if not isinstance(data, Mapping):
            raise ConfigTypeError(cls.__name__, "quantization_config", data, "a dict")
        if cls.hf_quant_method is None:
            raise ConfigValueError(
                cls.__name__,
                "quant_method",
                data.get("quant_method"),
                "a method transformers serializes (bitsandbytes, gptq, awq)",
            )
        if isinstance(data.get(HF_EXACT_CONFIG_KEY), Mapping):
            return cls.from_dict(data[HF_EXACT_CONFIG_KEY])
        values: dict[str, Any] = {}
        for f, keys in _hf_fields(cls):
            key = next((k for k in keys if k in data), None)
            value = data[key] if key is not None else cls.hf_read_defaults.get(f.name)
            if value is not None and value != [] and value != {}:
                values[f.name] = value
        return cls(**cls.hf_values(values, data))

    @classmethod
    def hf_reads_legacy(cls, block: Mapping[str, Any]) -> bool:
        """True when a transformers block without ``quant_method`` is this method's (the
        legacy bitsandbytes form); the default: never."""
        return False

    @classmethod
    def hf_values(cls, values: dict[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
        """Adjust the field values read from transformers' block ``data`` before the config is
        built (formats transformers spells differently); the default keeps them."""
        return values


def _hf_fields(cls: type[QuantConfig]) -> list[tuple[dataclasses.Field, tuple[str, ...]]]:
    """The fields of ``cls`` that transformers' block holds, with their keys (written, then read)."""
    found = []
    for f in dataclasses.fields(cls):
        hf = f.metadata.get("hf")
        if hf:
            found.append((f, (hf,) if isinstance(hf, str) else tuple(hf)))
    return found


@dataclass
class CalibratedConfig(QuantConfig):
    """Base of the configs of methods that calibrate on sample text (GPTQ, AWQ, plugins')."""

    dataset: str | None = spec(None, doc="calibration dataset name or file; None: built-in text")
    nsamples: int = spec(128, valid=lambda v: v > 0, allowed="a positive int")
    seqlen: int = spec(512, valid=lambda v: v > 0, allowed="a positive int")


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint).replace("typing.", "")
