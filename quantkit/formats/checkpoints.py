"""A quantized model's checkpoint in another format than its backend's own, and compressed-tensors
checkpoints read back into quantkit's GPTQ layers.

:func:`checkpoint_of` turns the integer layers of a GPTQ, AWQ or round-to-nearest model
(:class:`~quantkit.builtin_backends.gptq.qlinear.GPTQLinear`,
:class:`~quantkit.builtin_backends.awq.qlinear.AWQLinear`) into the tensors and ``quantization_config``
block of ``gptq`` (GPTQ v1), ``awq`` (AutoAWQ GEMM) or ``compressed-tensors`` (``pack-quantized``),
each layer through :func:`~quantkit.formats.grid.fit`: exact, or refused with the reason unless a
lossy conversion is allowed. The model itself is not changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.builtin_backends.awq.config import AWQConfig
from quantkit.builtin_backends.awq.packing import pack_awq
from quantkit.builtin_backends.awq.qlinear import AWQLinear
from quantkit.builtin_backends.gptq.config import GPTQConfig
from quantkit.builtin_backends.gptq.packing import pack_gptq
from quantkit.builtin_backends.gptq.qlinear import GPTQLinear
from quantkit.core.config import QuantConfig
from quantkit.core.errors import ConfigValueError, QuantkitError
from quantkit.core.safetensors_files import load_tensors
from quantkit.core.serialization import fill, read_checkpoint, unique_state_dict

from . import compressed_tensors
from .grid import GridWeight, fit, schemes

FORMATS = ("gptq", "awq", compressed_tensors.QUANT_METHOD)
"""The formats :func:`checkpoint_of` writes."""


def check_format(fmt: object, caller: str = "save", argument: str = "format") -> str:
    """``fmt`` if it names a format quantkit converts to, else a :class:`ConfigValueError` naming
    ``caller``'s ``argument`` and listing them."""
    if fmt not in FORMATS:
        raise ConfigValueError(caller, argument, fmt, ", ".join(map(repr, FORMATS)))
    return fmt


def integer_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The GPTQ/RTN and AWQ layers of ``model`` by name; a model without one cannot be converted."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (GPTQLinear, AWQLinear))}
    if not layers:
        raise QuantkitError(
            f"{type(model).__name__} has no GPTQ, AWQ or round-to-nearest layer: only those convert between formats"
        )
    return layers


def checkpoint_of(model: nn.Module, fmt: str, *, allow_lossy: bool = False) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The ``quantization_config`` block and the tensors of ``model`` stored in format ``fmt``."""
    check_format(fmt)
    layers = integer_layers(model)
    tensors = unique_state_dict(model)
    grids = {}
    for name, module in layers.items():
        for key in module.state_dict():
            tensors.pop(f"{name}.{key}", None)
        weight = fit(GridWeight.of(module), fmt, name, allow_lossy=allow_lossy)
        tensors.update({f"{name}.{key}": t.to("cpu") for key, t in _layer_tensors(weight, fmt, model.dtype).items()})
        grids[name] = weight
    ignore = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    if fmt == compressed_tensors.QUANT_METHOD:
        return compressed_tensors.quantization_config_block(grids, ignore), tensors
    return _config_of(grids, fmt, ignore).to_hf_dict(), tensors


def _layer_tensors(weight: GridWeight, fmt: str, dtype: torch.dtype) -> dict[str, Tensor]:
    if fmt == compressed_tensors.QUANT_METHOD:
        return compressed_tensors.layer_tensors(weight, dtype)
    if fmt == "gptq":
        packed = pack_gptq(weight.codes, weight.zeros, weight.scales, weight.g_idx, weight.bits)
    else:
        packed = pack_awq(weight.codes, weight.zeros, weight.scales)
    return packed if weight.bias is None else {**packed, "bias": weight.bias.detach()}


def _config_of(grids: dict[str, GridWeight], fmt: str, ignore: list[str]) -> QuantConfig:
    """The GPTQ or AWQ config every layer of ``grids`` shares (their blocks hold one scheme)."""
    found = set(schemes(grids).values())
    if len(found) > 1:
        raise QuantkitError(
            f"the {fmt} quantization_config holds one scheme; these layers have {len(found)} "
            f"({', '.join(map(str, found))}): save them as compressed-tensors"
        )
    (grid,) = found
    if fmt == "awq":
        return AWQConfig(
            bits=grid.bits, group_size=grid.group_size, zero_point=not grid.symmetric, modules_to_not_convert=ignore
        )
    return GPTQConfig(
        bits=grid.bits,
        group_size=grid.group_size,
        sym=grid.symmetric,
        desc_act=grid.act_order,
        modules_to_not_convert=ignore,
    )


def load_compressed_tensors(directory: Path, block: dict[str, Any]) -> tuple[nn.Module, GPTQConfig]:
    """A compressed-tensors ``pack-quantized`` folder as a model of GPTQ layers (on the CPU), with the
    GPTQ config it then has; a layer GPTQ v1 cannot hold exactly is refused with the reason."""
    stored, model = read_checkpoint(directory)
    layers = compressed_tensors.targeted_layers(model, block)
    if not layers:
        raise QuantkitError(f"{str(directory)!r}: its quantization_config quantizes none of the model's linears")
    tensors = load_tensors(stored)
    grids, replaced = {}, {}
    for name, (linear, grid) in layers.items():
        weight = compressed_tensors.read_layer(name, linear, grid, tensors, directory)
        weight = fit(weight, "gptq", name, allow_lossy=False)
        packed = pack_gptq(weight.codes, weight.zeros, weight.scales, weight.g_idx, weight.bits)
        grids[name], replaced[name] = weight, GPTQLinear.from_packed(packed, weight.bits, weight.bias)
    model = fill(model, tensors, directory, replaced)
    ignore = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    return model.eval(), _config_of(grids, "gptq", ignore)
