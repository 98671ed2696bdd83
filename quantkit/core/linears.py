"""Walking a model: which linears to quantize, with which config, and swapping them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .config import QuantConfig
from .errors import QuantizationError
from .progress import track


class Target(NamedTuple):
    """A linear to quantize: its full name in the model, the module and its effective config."""

    name: str
    linear: nn.Linear
    config: QuantConfig


def quantizable_linears(model: nn.Module, config: QuantConfig) -> list[Target]:
    """Every ``nn.Linear`` not skipped by the config, with its effective config.

    Output heads tied to the input embedding are skipped too: quantizing them
    would quantize the embedding.
    """
    tied = _tied_output_names(model)
    found = [
        Target(name, module, config.for_module(name))
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not config.skips(name) and name not in tied
    ]
    if not found:
        raise QuantizationError(
            f"{type(model).__name__} has no nn.Linear to quantize with {config.quant_method} "
            f"(modules_to_not_convert={config.modules_to_not_convert})"
        )
    return found


FINITE_CHECK_ELEMENTS = 2**24
"""Weights whose NaN/Inf values are counted at a time once a weight failed its check
(``torch.isfinite`` of a 16-bit piece makes a float32 copy and a bool result: 80 MiB at this size)."""


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN or infinity: its minimum and maximum are finite (a NaN
    propagates to both). No tensor-sized temporary; ~35x faster than ``isfinite(t).all()`` on a
    16-bit weight on the CPU."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(low.isfinite() & high.isfinite())


def check_finite(name: str, weight: torch.Tensor) -> None:
    """Refuse NaN/Inf weights: they would poison every scale of their group. Weights on the meta
    device (a streamed checkpoint, not read yet) are checked when they are read; the bad values
    are counted a :data:`FINITE_CHECK_ELEMENTS` piece at a time."""
    if weight.is_meta or all_finite(weight):
        return
    pieces = weight.detach().reshape(-1).split(FINITE_CHECK_ELEMENTS)
    bad = sum(int((~torch.isfinite(piece)).sum()) for piece in pieces)
    raise QuantizationError(f"{name}.weight holds {bad} NaN/Inf values; quantizing it would be meaningless")


ROW_BLOCK_ELEMENTS = 2**20
"""Values per block of :func:`row_blocks` (4 MiB in float32)."""


def row_blocks(weight: torch.Tensor, max_elements: int = ROW_BLOCK_ELEMENTS, multiple: int = 1) -> list[slice]:
    """Slices of ``weight``'s rows (its first dim) of about ``max_elements`` values each, a
    ``multiple`` of rows (at least one): a weight worked through block by block in float32 holds a
    few blocks, not a copy."""
    rows, width = weight.shape[0], max(1, weight[:1].numel())
    step = max(1, max_elements // width // multiple) * multiple
    return [slice(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def replace_linears(
    model: nn.Module,
    targets: Sequence[Target],
    build: Callable[[str, nn.Linear, QuantConfig], nn.Module],
    *,
    description: str,
) -> nn.Module:
    """Replace each target by ``build(name, linear, effective_config)``, behind a progress bar."""
    for name, linear, config in track(targets, description):
        set_submodule(model, name, build(name, linear, config))
    return model


def _tied_output_names(model: nn.Module) -> set[str]:
    get_input, get_output = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (get_input and get_output):
        return set()
    try:
        embedding, head = get_input(), get_output()
    except NotImplementedError:  # transformers' abstract *PreTrainedModel classes
        return set()
    if embedding is None or head is None or head.weight is not embedding.weight:
        return set()
    return {name for name, module in model.named_modules() if module is head}
