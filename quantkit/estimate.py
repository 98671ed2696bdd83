"""Memory estimator: exact bits per parameter from each format's stored layout.

Popular rounded figures ("a 7B model takes 3.5 GB in 4-bit") count 4 bits per
weight and nothing else. Real formats also store scales, zero points and
indices: bitsandbytes NF4 with 64-element blocks stores a float32 absmax per
block (4 + 32/64 = 4.5 bits), double quantization shrinks that to
4 + 8/64 + 32/(64*256) = 4.127 bits, GPTQ 4-bit group 128 stores a float16
scale and a packed 4-bit zero per group plus an int32 ``g_idx`` per input
column. Sizes are reported in both GB (1e9) and GiB (2**30), which the rounded
figures also mix up.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .core.config import QuantConfig
from .core.errors import ConfigValueError

FLOAT_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}
TYPICAL_SHAPE = (4096, 4096)
"""Layer shape assumed when only a parameter count is known (Llama-7B's attention)."""


@dataclass(frozen=True)
class Estimate:
    """Predicted storage of a model: quantized linears plus everything else."""

    params: int
    quantized_params: int
    quantized_bits: int
    other_bits: int
    code_bits: float | None = None
    """Mean width of the weight codes over the quantized linears (scales and zeros left out)."""

    @property
    def bits_per_param(self) -> float:
        """Bits per parameter of the quantized linears as stored."""
        return self.quantized_bits / self.quantized_params if self.quantized_params else 0.0

    @property
    def total_bytes(self) -> int:
        return (self.quantized_bits + self.other_bits + 7) // 8

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "quantized_params": self.quantized_params,
            "bits_per_param": self.bits_per_param,
            "total_bytes": self.total_bytes,
            "total_gb": self.total_bytes / 1e9,
            "total_gib": self.total_bytes / 2**30,
            "code_bits": self.code_bits,
        }


def parse_params(value: int | float | str) -> int:
    """``7B``, ``13b``, ``135M``, ``70e9`` or a plain number of parameters."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", value.lower())
    if not match:
        raise ConfigValueError("estimate", "params", value, "a number with an optional K/M/B/T suffix, e.g. 7B")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2)]
    return int(float(match.group(1)) * scale)


def layer_bits(config: QuantConfig | None, name: str, out_features: int, in_features: int, float_bits: int) -> int:
    """Stored bits of one linear under ``config`` (``None``: unquantized)."""
    if config is None:
        return out_features * in_features * float_bits
    from .core.registry import get_registry

    backends = get_registry().backends_for_method(config.quant_method)
    if not backends:
        from .core.errors import UnknownMethodError

        raise UnknownMethodError(config.quant_method, get_registry().config_classes())
    return backends[0].storage_bits(config, name, out_features, in_features)


def estimate(
    params: int | str | None = None,
    config: QuantConfig | None = None,
    *,
    model_config: str | os.PathLike | dict | None = None,
    dtype: str = "float16",
) -> Estimate:
    """Predict the stored size of a model quantized with ``config``.

    With ``model_config`` (a ``config.json`` path, folder or dict), every
    linear is counted at its real shape and the rest (embeddings, norms,
    skipped modules) at ``dtype``. With only ``params``, all parameters are
    taken as linears of :data:`TYPICAL_SHAPE`.
    """
    if dtype not in FLOAT_BITS:
        raise ConfigValueError("estimate", "dtype", dtype, ", ".join(FLOAT_BITS))
    float_bits = FLOAT_BITS[dtype]
    if model_config is not None:
        return _estimate_model(_read_model_config(model_config), config, float_bits)
    if params is None:
        raise ConfigValueError("estimate", "params", None, "a parameter count or a model_config")
    count = parse_params(params)
    out_f, in_f = TYPICAL_SHAPE
    bits = layer_bits(config, "", out_f, in_f, float_bits) * count / (out_f * in_f)
    return Estimate(count, count, round(bits), 0)


def _read_model_config(source: str | os.PathLike | dict) -> dict:
    if isinstance(source, dict):
        return source
    path = Path(source)
    path = path / "config.json" if path.is_dir() else path
    return json.loads(path.read_text())


def _estimate_model(raw: dict, config: QuantConfig | None, float_bits: int) -> Estimate:
    import torch
    import transformers
    from torch import nn

    from .core.linears import quantizable_linears

    raw = {k: v for k, v in raw.items() if k != "quantization_config"}
    hf_config = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    total = sum(p.numel() for p in model.parameters())
    targets = quantizable_linears(model, config) if config is not None else [
        (n, m, None) for n, m in model.named_modules() if isinstance(m, nn.Linear)
    ]
    quantized_params = sum(m.weight.numel() for _, m, _ in targets)
    from contextlib import nullcontext

    from .core.registry import get_registry

    backends = get_registry().backends_for_method(config.quant_method) if config is not None else []
    with backends[0].storage_context(model) if backends else nullcontext():
        quantized_bits = sum(layer_bits(c, n, m.out_features, m.in_features, float_bits) for n, m, c in targets)
        widths = [(backends[0].code_bits(c, n, m.out_features, m.in_features), m.weight.numel())
                  for n, m, c in targets] if backends else []
        quantized_weights = {id(m.weight) for _, m, _ in targets}  # by identity: a tied head is the embedding
        other_bits = sum(
            backends[0].other_bits(config, model, n, p, float_bits) if backends else p.numel() * float_bits
            for n, p in model.named_parameters() if id(p) not in quantized_weights
        )
    code_bits = None
    if widths and quantized_params and all(w is not None for w, _ in widths):
        code_bits = sum(w * count for w, count in widths) / quantized_params
    return Estimate(total, quantized_params, quantized_bits, other_bits, code_bits)
