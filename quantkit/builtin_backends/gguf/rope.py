"""Llama 3 rotary scaling in GGUF files.

llama.cpp has no hyperparameters for the ``llama3`` rope type (Llama 3.1-3.3): its converter
writes the per-frequency divisors as a float32 tensor, ``rope_freqs.weight`` of ``head_dim / 2``
values, and llama.cpp divides each rotary frequency by its factor. :func:`rope_freq_factors`
computes them from a transformers config as that converter does; :func:`apply_freq_factors`
gives a model read from a file the frequencies llama.cpp runs it with.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from quantkit.core.errors import ModelFormatError

ROPE_FREQS = "rope_freqs.weight"
"""The GGUF name of the divisors."""
ROPE_TYPES = ("default", "llama3")
"""The ``rope_type``\\ s a GGUF llama file can hold."""


def rope_parameters(hf: Any) -> dict:
    """``hf``'s rope parameters (transformers 5 ``rope_parameters``, or 4's ``rope_scaling``)."""
    return dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})


def rope_freq_factors(hf: Any) -> torch.Tensor | None:
    """The ``rope_freqs`` divisors (float32, ``head_dim / 2``) of a ``llama3`` rope; None for the default one.

    Frequencies whose wavelength is below ``original_max_position_embeddings / high_freq_factor``
    keep theirs (1), those above ``... / low_freq_factor`` are divided by ``factor``, and the ones
    between by a factor interpolated on the context-to-wavelength ratio: transformers'
    ``_compute_llama3_parameters`` as divisors, in float32 as llama.cpp's converter computes them.
    """
    rope = rope_parameters(hf)
    if rope.get("rope_type", "default") != "llama3":
        return None
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None))
    dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelength = 2 * math.pi / freqs
    smooth = (context / wavelength - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelength > context / low, torch.tensor(float(factor)), between)
    return torch.where(wavelength < context / high, torch.tensor(1.0), factors)


FACTORS_ATTR = "gguf_freq_factors"
"""Attribute of a read model's rotary embedding holding its file's ``rope_freqs``."""


def freq_factors(model: nn.Module) -> torch.Tensor | None:
    """The ``rope_freqs`` divisors ``model`` runs with: those its file gave it (:func:`apply_freq_factors`),
    else its config's (:func:`rope_freq_factors`)."""
    given = getattr(model.get_submodule("model.rotary_emb"), FACTORS_ATTR, None)
    return given if given is not None else rope_freq_factors(model.config)


def apply_freq_factors(model: nn.Module, factors: torch.Tensor) -> None:
    """Divide the rotary frequencies of ``model`` (a transformers llama) by a file's ``rope_freqs``."""
    rotary = model.get_submodule("model.rotary_emb")
    if factors.shape != rotary.inv_freq.shape:
        raise ModelFormatError(
            f"{ROPE_FREQS} has {factors.numel()} values, expected {rotary.inv_freq.numel()} (head_dim / 2)"
        )
    if not torch.isfinite(factors).all() or not (factors > 0).all():
        raise ModelFormatError(f"{ROPE_FREQS} holds values that are not finite and positive")
    for name in ("inv_freq", "original_inv_freq"):
        setattr(rotary, name, getattr(rotary, name) / factors.to(rotary.inv_freq.dtype))
    setattr(rotary, FACTORS_ATTR, factors.float().clone())
