"""GGUF backend: llama.cpp tensor types and mixes, run in torch, saved as safetensors or ``.gguf``."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from quantkit.core.backend import Backend
from quantkit.core.capabilities import Capabilities
from .config import GGUFConfig, PRESETS
from quantkit.core.capabilities import ALL_HARDWARE
from .config import ggml_code_bits

from .mixes import ModelShape, bound_shape, row_bytes


class GGUFBackend(Backend):
    name = "gguf"
    config_class = GGUFConfig
    presets = PRESETS
    file_suffixes = (".gguf",)
    capabilities = Capabilities(
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=True,
        requires=("gguf",),
        description="llama.cpp GGUF tensor types and mixes in torch; .gguf export and import",
    )

    def storage_bits(self, config: GGUFConfig, name: str, out_features: int, in_features: int) -> int:
        """Bits of the ggml blocks llama.cpp's rules give linear ``name`` (fallbacks included).

        Mixes give ``attn_v``/``ffn_down`` types by layer position: call it for those inside
        :meth:`storage_context` (the estimator does).
        """
        return out_features * row_bytes(_linear_type(config, name, in_features), in_features) * 8

    def code_bits(self, config: GGUFConfig, name: str, out_features: int, in_features: int) -> float:
        """The width of the ggml type llama.cpp's rules give linear ``name``: a fallback such as
        Q4_0 for Q2_K rows that 256-weight super-blocks do not divide counts as 4 bits."""
        return ggml_code_bits(_linear_type(config, name, in_features))

    def other_bits(self, config: GGUFConfig, model: nn.Module, name: str, parameter: torch.Tensor, float_bits: int) -> int:
        """The token embedding is packed too, in the type llama.cpp gives it (``output``'s when tied)."""
        from .convert import embedding_plan

        plan = embedding_plan(model, config, ModelShape.of(getattr(model, "config", None)))
        if plan is None or name != f"{plan.name}.weight":
            return super().other_bits(config, model, name, parameter, float_bits)
        return plan.module.num_embeddings * row_bytes(plan.qtype, plan.module.embedding_dim) * 8

    def storage_context(self, model: nn.Module) -> AbstractContextManager:
        """Make :meth:`storage_bits` see ``model``'s layer count and attention groups."""
        return bound_shape(ModelShape.of(getattr(model, "config", None)))

    def quantize(self, model: nn.Module, config: GGUFConfig, *, calibration, device) -> nn.Module:
        from .convert import quantize_model

        return quantize_model(model, config, torch.device(device))

    def prepare_for_loading(self, model: nn.Module, config: GGUFConfig) -> nn.Module:
        from .convert import prepare_model

        return prepare_model(model, config)

    def save_file(self, model: nn.Module, path: Path, *, tokenizer=None) -> None:
        """A complete llama.cpp ``.gguf``: hyperparameters, tokenizer, every tensor."""
        from .export import write_gguf

        write_gguf(model, path, tokenizer)

    def load_file(self, path: Path, device: torch.device) -> nn.Module:
        """A quantized Llama ``.gguf`` as a model whose quantized tensors stay GGUF modules."""
        from .reader import read_gguf

        return read_gguf(path, device)


def _linear_type(config: GGUFConfig, name: str, in_features: int) -> str:
    """The ggml type of linear ``name`` (``""``: unknown) under its effective config, with the
    model shape bound by :meth:`GGUFBackend.storage_context`."""
    from .convert import linear_type

    return linear_type(config.for_module(name) if name else config, name, in_features, None)
