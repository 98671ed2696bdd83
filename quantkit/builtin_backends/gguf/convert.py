"""Swapping a transformers model's linears and token embedding for GGUF modules.

Linears are the ones :func:`quantkit.core.linears.quantizable_linears` selects. Like
llama.cpp, GGUF also quantizes the token embedding (unless its module is listed in
``modules_to_not_convert``); an output head tied to it is the same matrix, so it
takes llama.cpp's output rule and shares the packed table.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.builtin_backends.gguf.config import GGUFConfig
from quantkit.core.linears import check_finite, replace_linears, set_submodule

from .mixes import ModelShape, Role, role_of, tensor_type
from .qlinear import GGUFEmbedding, GGUFLinear

log = logging.getLogger("quantkit")


@dataclass(frozen=True)
class EmbeddingPlan:
    """The token embedding to quantize, its type, and the name of a head tied to it."""

    name: str
    module: nn.Embedding
    qtype: str
    tied_head: str | None


def linear_type(config: GGUFConfig, name: str, in_features: int, shape: ModelShape | None) -> str:
    """The ggml type of linear ``name`` under its effective ``config``."""
    role = role_of(name, shape.n_layer if shape else None)
    return tensor_type(config.quant_type, role, in_features, shape)


def embedding_plan(model: nn.Module, config: GGUFConfig, shape: ModelShape | None) -> EmbeddingPlan | None:
    """How the token embedding is quantized; ``None`` when it stays in float."""
    embedding, head = _call(model, "get_input_embeddings"), _call(model, "get_output_embeddings")
    if type(embedding) is not nn.Embedding:
        return None
    names = {module: name for name, module in model.named_modules()}
    name = names[embedding]
    if config.skips(name):
        return None
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    role = Role("output") if tied else Role("token_embd")
    qtype = tensor_type(config.for_module(name).quant_type, role, embedding.embedding_dim, shape)
    return EmbeddingPlan(name, embedding, qtype, names[head] if tied else None)


def _call(model: nn.Module, method: str) -> nn.Module | None:
    """``model.<method>()`` (a transformers accessor), or ``None`` where the model has none."""
    try:
        return getattr(model, method)()
    except (AttributeError, NotImplementedError):
        return None


def quantize_model(model: nn.Module, config: GGUFConfig, device: torch.device) -> nn.Module:
    """Quantize ``model``'s linears and token embedding in place, on ``device``."""
    shape = ModelShape.of(model.config)
    plan = embedding_plan(model, config, shape)
    if plan is not None:
        check_finite(plan.name, plan.module.weight)

    def build(name: str, linear: nn.Linear, module_config: GGUFConfig) -> nn.Module:
        return GGUFLinear.from_linear(linear, linear_type(module_config, name, linear.in_features, shape), device)

    with torch.no_grad():
        _convert(model, config, build, plan, lambda: GGUFEmbedding.from_embedding(plan.module, plan.qtype, device),
                 description=f"GGUF {config.quant_type}", check_weights=True)
    log.info("GGUF %s tensor types: %s", config.quant_type, type_counts(model))
    return model.to(device)


def prepare_model(model: nn.Module, config: GGUFConfig) -> nn.Module:
    """Swap in empty GGUF modules of the types ``config`` gives (saved ``ggml_type`` buffers win on load)."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # an empty transformers model is not tied yet: tie it as quantize() saw it
    shape = ModelShape.of(model.config)
    plan = embedding_plan(model, config, shape)

    def build(name: str, linear: nn.Linear, module_config: GGUFConfig) -> nn.Module:
        qtype = linear_type(module_config, name, linear.in_features, shape)
        return GGUFLinear(linear.in_features, linear.out_features, qtype, bias=linear.bias is not None,
                          device=linear.weight.device, dtype=linear.weight.dtype)

    def build_embedding() -> GGUFEmbedding:
        weight = plan.module.weight
        return GGUFEmbedding(plan.module.num_embeddings, plan.module.embedding_dim, plan.qtype,
                             padding_idx=plan.module.padding_idx, device=weight.device, dtype=weight.dtype)

    return _convert(model, config, build, plan, build_embedding, description="GGUF (loading)", check_weights=False)


def _convert(
    model: nn.Module,
    config: GGUFConfig,
    build: Callable[[str, nn.Linear, GGUFConfig], nn.Module],
    plan: EmbeddingPlan | None,
    build_embedding: Callable[[], GGUFEmbedding],
    *,
    description: str,
    check_weights: bool,
) -> nn.Module:
    replace_linears(model, config, build, description=description, check_weights=check_weights)
    if plan is not None:
        embedding = build_embedding()
        set_submodule(model, plan.name, embedding)
        if plan.tied_head is not None:
            set_submodule(model, plan.tied_head, GGUFLinear.tied_to(embedding))
    return model


def type_counts(model: nn.Module) -> dict[str, int]:
    """How many packed tensors hold each ggml type (a tied head shares its embedding's)."""
    packed = {id(m.weight): m.qtype for m in model.modules() if isinstance(m, (GGUFEmbedding, GGUFLinear))}
    counts: dict[str, int] = {}
    for qtype in packed.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    return dict(sorted(counts.items()))
