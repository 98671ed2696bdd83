"""Walking a model: which linears to quantize, with which config, and swapping them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import QuantConfig
from .errors import QuantizationError
from .progress import track


def quantizable_linears(model: nn.Module, config: QuantConfig) -> list[tuple[str, nn.Linear, QuantConfig]]:
    """Every ``nn.Linear`` not skipped by the config, with its effective config.

    Output heads tied to the input embedding are skipped too: quantizing them
    would quantize the embedding.
    """
    tied = _tied_output_names(model)
    found = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not config.skips(name) and name not in tied:
            found.append((name, module, config.for_module(name)))
    if not found:
        raise QuantizationError(
            f"{type(model).__name__} has no nn.Linear to quantize with {config.quant_method} "
            f"(modules_to_not_convert={config.modules_to_not_convert})"
        )
    return found


def check_finite(name: str, weight: torch.Tensor) -> None:
    """Refuse NaN/Inf weights: they would poison every scale of their group."""
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise QuantizationError(f"{name}.weight holds {bad} NaN/Inf values; quantizing it would be meaningless")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def replace_linears(
    model: nn.Module,
    config: QuantConfig,
    build: Callable[[str, nn.Linear, QuantConfig], nn.Module],
    *,
    description: str,
    check_weights: bool = True,
) -> nn.Module:
    """Replace each quantizable linear by ``build(name, linear, effective_config)``."""
    targets = quantizable_linears(model, config)
    if check_weights:
        for name, linear, _ in targets:
            check_finite(name, linear.weight)
    for name, linear, module_config in track(targets, description):
        set_submodule(model, name, build(name, linear, module_config))
    return model


def _tied_output_names(model: nn.Module) -> set[str]:
    get_input, get_output = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (get_input and get_output):
        return set()
    embedding, head = get_input(), get_output()
    if embedding is None or head is None or head.weight is not embedding.weight:
        return set()
    return {name for name, module in model.named_modules() if module is head}
