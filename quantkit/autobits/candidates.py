"""The settings each method may give one linear, and the weight each setting stores.

A setting is a dict of config fields, written as a ``module_overrides`` entry:

* ``gguf``: one ggml type per linear, ``{"quant_type": "Q4_K"}``, among Q3_K ... Q8_0 and the
  legacy Q4_0 ... Q5_1. A type whose block does not divide the rows is listed as the type
  llama.cpp stores instead (:func:`~quantkit.builtin_backends.gguf.mixes.with_fallback`), so
  the config says what is stored, and duplicates are dropped. Q2_K is offered only where an
  override ``{"quant_type": "Q2_K"}`` stores it: ``GGUFConfig`` reads that name as llama.cpp's
  Q2_K *mix*, which stores ``ffn_down`` and ``attn_v`` in Q3_K or more.
* ``rtn`` and ``gptq``: ``{"bits": b, "group_size": g}`` for bits 2, 3, 4, 8 and groups of 32,
  64, 128 (other fields stay the base config's), where the GPTQ format's shape limits allow them.

:func:`dequantized` is the weight a setting stores, from the backend's own quantizer: GGUF's
:mod:`~quantkit.builtin_backends.gguf.quants`, and round-to-nearest's ``rtn_quantize``. For GPTQ it
is round-to-nearest on the same grid and range search (``mse``), a proxy: GPTQ's solve lowers
every setting's error, by a similar factor for neighbouring settings, and running it for every
setting would cost a full calibration each.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..builtin_backends.gguf import quants
from ..builtin_backends.gguf.convert import linear_type
from ..builtin_backends.gguf.mixes import with_fallback
from ..builtin_backends.gptq.backend import GPTQ_SHAPE_LIMITS
from ..builtin_backends.gptq.gptq import rtn_quantize
from ..core.config import QuantConfig

GGUF_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
GROUPED_BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
METHODS = ("gguf", "gptq", "rtn")
"""The methods whose configs can hold a per-layer choice this module enumerates."""


def candidate_settings(config: QuantConfig, name: str, linear: nn.Linear) -> list[dict[str, Any]]:
    """The distinct settings ``config``'s method can store linear ``name`` in (GGUF: call it
    inside the backend's ``storage_context``)."""
    if config.quant_method == "gguf":
        types = dict.fromkeys(with_fallback(t, linear.in_features) for t in GGUF_TYPES)
        # "Q2_K" also names llama.cpp's Q2_K mix, whose rules store some roles otherwise: keep
        # only the types a module override stores as named
        stored = {t: linear_type(apply(config, {"quant_type": t}), name, linear.in_features, None) for t in types}
        return [{"quant_type": t} for t in types if stored[t] == t]
    settings = [{"bits": b, "group_size": g} for b in GROUPED_BITS for g in GROUP_SIZES]
    return [s for s in settings if all(limit.holds(linear, apply(config, s)) for limit in GPTQ_SHAPE_LIMITS)]


def apply(config: QuantConfig, setting: dict[str, Any]) -> QuantConfig:
    """``config`` with ``setting``'s fields (and no overrides): one linear's effective config."""
    return dataclasses.replace(config, **setting, module_overrides={})


@torch.no_grad()
def dequantized(config: QuantConfig, weight: Tensor) -> Tensor:
    """``weight`` (float32) as the effective ``config`` stores it, decoded."""
    if config.quant_method == "gguf":
        return quants.dequantize(quants.quantize(weight, config.quant_type), config.quant_type, weight.shape)
    mse = getattr(config, "mse", 0.0)
    return rtn_quantize(weight, bits=config.bits, group_size=config.group_size, sym=config.sym, mse=mse).dequantized
