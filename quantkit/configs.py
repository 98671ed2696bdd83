"""Quantization config dataclasses: one per method, keyed by ``quant_method``.

Configs are plain data: they validate themselves in ``__post_init__``, round-trip
exactly through dicts and JSON, and never import their backend's library.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import (
    ConfigTypeError,
    ConfigValueError,
    ModelFormatError,
    UnknownFieldError,
    UnknownMethodError,
)

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
) -> Any:
    """Declare a config field: its default and the values it accepts.

    ``choices`` lists every allowed value; ``valid`` is a predicate with
    ``allowed`` describing it in words for error messages.
    """
    metadata = {"choices": choices, "valid": valid, "allowed": allowed, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def positive(value: Any) -> bool:
    return value > 0


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

    modules_to_not_convert: list[str] = spec(
        ["lm_head"], allowed="a list of module names or glob patterns"
    )
    module_overrides: dict[str, dict[str, Any]] = spec(
        {}, allowed="a mapping from module-name pattern to a partial config dict"
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
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
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
            raise ConfigValueError(
                type(self).__name__, f.name, value, ", ".join(map(repr, choices))
            )
        if valid is not None and not valid(value):
            raise ConfigValueError(type(self).__name__, f.name, value, f.metadata["allowed"])

    def _check_override(self, pattern: str, partial: Any) -> None:
        name = type(self).__name__
        if not isinstance(partial, Mapping):
            raise ConfigTypeError(name, f"module_overrides[{pattern!r}]", partial, "dict")
        for key in partial:
            if key in _NOT_OVERRIDABLE:
                raise ConfigValueError(
                    name, f"module_overrides[{pattern!r}]", key,
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
        data = dict(data)
        method = data.pop("quant_method", cls.quant_method)
        if method != cls.quant_method:
            raise ConfigValueError(cls.__name__, "quant_method", method, repr(cls.quant_method))
        version = data.pop("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
            raise ConfigValueError(
                cls.__name__, "schema_version", version, f"1..{SCHEMA_VERSION}"
            )
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
        data = _read_json(path)
        if cls is QuantConfig:
            return config_from_dict(data)
        return cls.from_dict(data)

    # -- transformers' ``quantization_config`` block ------------------------

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` block transformers writes for this method."""
        raise ConfigValueError(
            type(self).__name__, "quant_method", self.quant_method,
            "bitsandbytes, gptq or awq (the methods transformers serializes)",
        )

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        raise ConfigValueError(
            cls.__name__, "quant_method", data.get("quant_method"),
            "bitsandbytes, gptq or awq (the methods transformers serializes)",
        )


@dataclass
class BnbConfig(QuantConfig):
    """bitsandbytes: 4-bit NF4/FP4 (optionally double-quantized) or 8-bit LLM.int8."""

    quant_method: ClassVar[str] = "bitsandbytes"

    load_in_4bit: bool = spec(True)
    load_in_8bit: bool = spec(False)
    quant_type: str = spec("nf4", choices=("nf4", "fp4"))
    use_double_quant: bool = spec(False)
    compute_dtype: str = spec("float32", choices=COMPUTE_DTYPES)
    blocksize: int = spec(
        64, choices=(32, 64, 128, 256, 512, 1024, 2048, 4096), doc="4-bit quantization block"
    )
    llm_int8_threshold: float = spec(
        6.0, valid=lambda v: v >= 0, allowed=">= 0 (0 disables the outlier path)"
    )

    def __post_init__(self) -> None:
        if not isinstance(self.compute_dtype, str) and hasattr(self.compute_dtype, "is_floating_point"):
            self.compute_dtype = str(self.compute_dtype).removeprefix("torch.")
        super().__post_init__()

    def validate(self) -> None:
        if self.load_in_4bit == self.load_in_8bit:
            raise ConfigValueError(
                "BnbConfig", "load_in_4bit", self.load_in_4bit,
                "exactly one of load_in_4bit and load_in_8bit set to True",
            )

    @property
    def bits(self) -> int:
        return 4 if self.load_in_4bit else 8

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.use_double_quant,
            "bnb_4bit_compute_dtype": self.compute_dtype,
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": list(self.modules_to_not_convert),
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
        }

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any]) -> BnbConfig:
        if isinstance(data.get(HF_EXACT_CONFIG_KEY), Mapping):  # quantkit's own save: the exact config
            return cls.from_dict(data[HF_EXACT_CONFIG_KEY])
        eight = bool(data.get("load_in_8bit", False))
        return cls(
            load_in_4bit=bool(data.get("load_in_4bit", not eight)),
            load_in_8bit=eight,
            quant_type=data.get("bnb_4bit_quant_type", "fp4"),
            use_double_quant=bool(data.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=data.get("bnb_4bit_compute_dtype") or "float32",
            llm_int8_threshold=data.get("llm_int8_threshold", 6.0),
            modules_to_not_convert=list(data.get("llm_int8_skip_modules") or ["lm_head"]),
        )


_GROUP_SIZE = dict(valid=lambda v: v == -1 or v > 0, allowed="-1 (one group per row) or a positive int")


@dataclass
class GPTQConfig(QuantConfig):
    """GPTQ: second-order weight quantization calibrated on sample text."""

    quant_method: ClassVar[str] = "gptq"

    bits: int = spec(4, choices=(2, 3, 4, 8))
    group_size: int = spec(128, **_GROUP_SIZE)
    desc_act: bool = spec(False, doc="act-order: quantize columns by descending Hessian diagonal")
    sym: bool = spec(True)
    damp_percent: float = spec(0.01, valid=lambda v: 0 < v < 1, allowed="0 < damp_percent < 1")
    static_groups: bool = spec(False)
    true_sequential: bool = spec(True)
    dataset: str | None = spec(None, doc="calibration dataset name or file; None: built-in text")
    nsamples: int = spec(128, valid=positive, allowed="a positive int")
    seqlen: int = spec(512, valid=positive, allowed="a positive int")

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "damp_percent": self.damp_percent,
            "static_groups": self.static_groups,
            "true_sequential": self.true_sequential,
            "dataset": self.dataset,
            "format": "gptq",
            "checkpoint_format": "gptq",
            "modules_in_block_to_quantize": None,
            "use_exllama": True,
            # quantkit's own keys (transformers ignores them): which linears are stored how.
            "modules_to_not_convert": list(self.modules_to_not_convert),
            **_overrides_block(self),
        }

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any]) -> GPTQConfig:
        fmt = data.get("format", data.get("checkpoint_format", "gptq"))
        if fmt != "gptq":
            raise ConfigValueError("GPTQConfig", "format", fmt, "'gptq'")
        return cls(
            bits=data.get("bits", 4),
            group_size=data.get("group_size", 128),
            desc_act=data.get("desc_act", False),
            sym=data.get("sym", True),
            damp_percent=data.get("damp_percent", 0.01),
            static_groups=data.get("static_groups", False),
            true_sequential=data.get("true_sequential", True),
            dataset=data.get("dataset") if isinstance(data.get("dataset"), str) else None,
            modules_to_not_convert=list(data.get("modules_to_not_convert") or ["lm_head"]),
            module_overrides=dict(data.get("module_overrides") or {}),
        )


@dataclass
class AWQConfig(QuantConfig):
    """AWQ: activation-aware scaling and clipping, then 4-bit group quantization."""

    quant_method: ClassVar[str] = "awq"

    bits: int = spec(4, choices=(4,))
    group_size: int = spec(128, choices=(32, 64, 128))
    zero_point: bool = spec(True)
    version: str = spec("gemm", choices=("gemm", "gemv"))
    dataset: str | None = spec(None, doc="calibration dataset name or file; None: built-in text")
    nsamples: int = spec(128, valid=positive, allowed="a positive int")
    seqlen: int = spec(512, valid=positive, allowed="a positive int")

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "quant_method": "awq",
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": self.zero_point,
            "version": self.version,
            "modules_to_not_convert": list(self.modules_to_not_convert),
            **_overrides_block(self),
        }

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any]) -> AWQConfig:
        return cls(
            bits=data.get("bits", data.get("w_bit", 4)),
            group_size=data.get("group_size", data.get("q_group_size", 128)),
            zero_point=data.get("zero_point", True),
            version=str(data.get("version", "gemm")).lower(),
            modules_to_not_convert=list(data.get("modules_to_not_convert") or ["lm_head"]),
            module_overrides=dict(data.get("module_overrides") or {}),
        )


def _overrides_block(config: QuantConfig) -> dict[str, Any]:
    """``module_overrides`` for a transformers block, only when set (quantkit's own key)."""
    return {"module_overrides": copy.deepcopy(config.module_overrides)} if config.module_overrides else {}


@dataclass
class HQQConfig(QuantConfig):
    """HQQ: calibration-free half-quadratic quantization (1 to 8 bits)."""

    quant_method: ClassVar[str] = "hqq"

    nbits: int = spec(4, choices=(1, 2, 3, 4, 8))
    group_size: int = spec(64, valid=positive, allowed="a positive int")
    axis: int = spec(1, choices=(0, 1))
    quant_zero: bool = spec(False)
    quant_scale: bool = spec(False)
    optimize: bool = spec(True)
    compute_dtype: str = spec("float32", choices=COMPUTE_DTYPES)

    @property
    def code_bits(self) -> float:
        return float(self.nbits)


GGUF_TENSOR_TYPES = (
    "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0",
    "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K",
)
GGUF_MIXES = ("Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S", "Q3_K_L", "Q2_K")


@dataclass
class GGUFConfig(QuantConfig):
    """GGUF (llama.cpp): one tensor type for every linear, or a llama.cpp mix."""

    quant_method: ClassVar[str] = "gguf"

    quant_type: str = spec("Q4_K_M", choices=tuple(dict.fromkeys(GGUF_TENSOR_TYPES + GGUF_MIXES)))

    @property
    def code_bits(self) -> float:
        """The width the type or mix is named for; the GGUF backend's per-tensor
        :meth:`~quantkit.backend.Backend.code_bits` follows llama.cpp's mix rules and fallbacks."""
        return ggml_code_bits(self.quant_type)


def ggml_code_bits(ggml_type: str) -> float:
    """Code width a ggml type's name states: ``Q4_K_M`` 4, ``IQ4_NL`` 4, ``BF16`` 16."""
    return float(re.search(r"(\d+)", ggml_type).group(1))


@dataclass
class RTNConfig(QuantConfig):
    """Round-to-nearest group quantization: the calibration-free reference point."""

    quant_method: ClassVar[str] = "rtn"

    bits: int = spec(4, choices=(2, 3, 4, 8))
    group_size: int = spec(128, **_GROUP_SIZE)
    sym: bool = spec(False)


BUILTIN_CONFIGS: tuple[type[QuantConfig], ...] = (
    BnbConfig, GPTQConfig, AWQConfig, HQQConfig, GGUFConfig, RTNConfig,
)


def config_classes() -> dict[str, type[QuantConfig]]:
    """Every known config class by ``quant_method``: built-ins and plugins'."""
    from .registry import get_registry

    classes = {c.quant_method: c for c in BUILTIN_CONFIGS}
    classes.update(get_registry().config_classes())
    return classes


def config_from_dict(data: Mapping[str, Any]) -> QuantConfig:
    """Build the config that ``data["quant_method"]`` names (built-in or plugin)."""
    if not isinstance(data, Mapping):
        raise ConfigTypeError("QuantConfig", "(config)", data, "a dict with a 'quant_method' key")
    method = data.get("quant_method")
    classes = config_classes()
    if method not in classes:
        raise UnknownMethodError(method, classes)
    return classes[method].from_dict(data)


def config_from_hf_dict(data: Mapping[str, Any]) -> QuantConfig:
    """Read a transformers ``quantization_config`` block (bitsandbytes, gptq, awq)
    or one quantkit wrote for another method."""
    data = dict(data)
    method = str(data.get("quant_method", "")).lower()
    if not method and (data.get("load_in_4bit") or data.get("load_in_8bit")):
        method = "bitsandbytes"  # the legacy form without quant_method
    hf = {"bitsandbytes": BnbConfig, "gptq": GPTQConfig, "awq": AWQConfig}
    if method in hf and "schema_version" not in data:
        return hf[method].from_hf_dict(data)
    return config_from_dict({**data, "quant_method": method})


def as_config(value: QuantConfig | Mapping[str, Any] | bool | str) -> QuantConfig:
    """Normalize every accepted way of naming a config.

    - a :class:`QuantConfig`: returned as is;
    - ``True``: 4-bit NF4 with double quantization and bfloat16 compute (QLoRA's);
    - a dict with ``quant_method``: that config; without it: the ``True`` form
      with these fields overridden;
    - a string: a preset name (see :mod:`quantkit.presets`).
    """
    from .presets import preset

    if isinstance(value, QuantConfig):
        return value
    if value is True:
        return BnbConfig(load_in_4bit=True, quant_type="nf4", use_double_quant=True, compute_dtype="bfloat16")
    if isinstance(value, Mapping):
        if "quant_method" in value:
            return config_from_dict(value)
        return dataclasses.replace(as_config(True), **_known_fields(BnbConfig, value))
    if isinstance(value, str):
        return preset(value)
    raise ConfigTypeError(
        "quantize", "config", value, "a QuantConfig, a dict, True or a preset name"
    )


def _known_fields(cls: type[QuantConfig], data: Mapping[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise UnknownFieldError(cls.__name__, key, known)
    return dict(data)


def _read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as exc:
        raise ModelFormatError(f"config file {os.fspath(path)!r} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"config file {os.fspath(path)!r} is not valid JSON: {exc}") from exc


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if not typing.get_args(hint) else str(hint).replace("typing.", "")
