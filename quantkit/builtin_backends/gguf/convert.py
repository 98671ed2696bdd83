"""Which ggml type each linear of a transformers model gets, and its token embedding's.

Linears are the ones :func:`quantkit.core.linears.quantizable_linears` selects. Like
llama.cpp, GGUF also quantizes the token embedding (unless its module is listed in
``modules_to_not_convert``); an output head tied to it is the same matrix, so it
takes llama.cpp's output rule and shares the packed table.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantkit.core.linears import set_submodule

from .config import GGUFConfig
from .mixes import ModelShape, Role, role_of, tensor_type
from .qlinear import GGUFEmbedding, GGUFLinear


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


def install_embedding(model: nn.Module, plan: EmbeddingPlan, embedding: GGUFEmbedding) -> None:
    """Swap ``embedding`` in for the planned token embedding (and a head tied to it)."""
    set_submodule(model, plan.name, embedding)
    if plan.tied_head is not None:
        set_submodule(model, plan.tied_head, GGUFLinear.tied_to(embedding))


def empty_embedding(plan: EmbeddingPlan) -> GGUFEmbedding:
    """An empty GGUF embedding of the planned type that a saved state dict fills."""
    weight = plan.module.weight
    return GGUFEmbedding(
        plan.module.num_embeddings,
        plan.module.embedding_dim,
        plan.qtype,
        padding_idx=plan.module.padding_idx,
        device=weight.device,
        dtype=weight.dtype,
    )


def type_counts(model: nn.Module) -> dict[str, int]:
    """How many packed tensors hold each ggml type (a tied head shares its embedding's)."""
    packed = {id(m.weight): m.qtype for m in model.modules() if isinstance(m, (GGUFEmbedding, GGUFLinear))}
    counts: dict[str, int] = {}
    for qtype in packed.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    return dict(sorted(counts.items()))
