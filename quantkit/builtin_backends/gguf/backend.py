"""GGUF backend: llama.cpp tensor types and mixes, run in torch, saved as safetensors or ``.gguf``.

With ``GGUFConfig.imatrix`` the linears are quantized with llama.cpp's importance-matrix
quantizers (:mod:`.imatrix`): the matrix is read from its file or collected from calibration
text first, on the float model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.core.backend import Backend
from quantkit.core.capabilities import ALL_HARDWARE, Capabilities
from quantkit.core.errors import ConfigValueError
from quantkit.core.linears import Target, check_finite
from quantkit.core.streamed_checkpoints import StreamedCheckpoint

from .config import PRESETS, GGUFConfig, ggml_code_bits
from .convert import EmbeddingPlan, embedding_plan, empty_embedding, install_embedding, linear_type, type_counts
from .export import write_gguf
from .imatrix import imatrix_values, resolve_imatrix
from .imatrix_files import ImportanceMatrix
from .mixes import ModelShape, bound_shape, row_bytes
from .qlinear import GGUFEmbedding, GGUFLinear
from .reader import read_gguf
from .stream_export import write_gguf_streamed
from .streamed_input import GGUFCheckpoint

log = logging.getLogger("quantkit")

CHUNK_WORKING_BYTES = 64 * 2**20
"""What quantizing one weight holds besides it and its quantized copy: the chunk threads' float32
pieces and their temporaries (measured 40-58 MiB at Q4_K and Q6_K for 2048 x 8192, two threads)."""


class GGUFBackend(Backend):
    name = "gguf"
    config_class = GGUFConfig
    presets = PRESETS
    streams_modules = True
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

    def other_bits(
        self, config: GGUFConfig, model: nn.Module, name: str, parameter: torch.Tensor, float_bits: int
    ) -> int:
        """The token embedding is packed too, in the type llama.cpp gives it (``output``'s when tied)."""
        plan = _embedding_plan(model, config)
        if plan is None or name != f"{plan.name}.weight":
            return super().other_bits(config, model, name, parameter, float_bits)
        return plan.module.num_embeddings * row_bytes(plan.qtype, plan.module.embedding_dim) * 8

    def storage_context(self, model: nn.Module) -> AbstractContextManager:
        """Make :meth:`storage_bits` (and the linears' types) see ``model``'s layer count and attention groups."""
        return bound_shape(ModelShape.of(getattr(model, "config", None)))

    def targets(self, model: nn.Module, config: GGUFConfig, *, check_weights: bool = True) -> list[Target]:
        """The template's targets; the token embedding's weights are checked with theirs."""
        targets = super().targets(model, config, check_weights=check_weights)
        plan = _embedding_plan(model, config)
        if check_weights and plan is not None:
            check_finite(plan.name, plan.module.weight)
        return targets

    def needs_calibration(self, config: GGUFConfig) -> bool:
        """Calibration tokens are needed to collect an importance matrix from text."""
        return config.dataset is not None

    def check_streaming(self, config: GGUFConfig) -> None:
        """An importance matrix collected from calibration text needs the float model in memory."""
        if config.dataset is not None:
            raise ConfigValueError(
                "GGUFConfig",
                "imatrix",
                config.imatrix,
                "None or a llama.cpp importance-matrix file (.gguf, .dat) when streaming: collect one "
                "from text first (`quantkit imatrix`) and pass its file",
            )

    def quantize(self, model: nn.Module, config: GGUFConfig, *, calibration, device) -> nn.Module:
        """The template's (every target linear, then the token embedding), with the types it gave logged."""
        model = super().quantize(model, config, calibration=calibration, device=device)
        log.info("GGUF %s tensor types: %s", config.quant_type, type_counts(model))
        return model

    def linear_quantizer(
        self,
        model: nn.Module,
        config: GGUFConfig,
        targets: list[Target],
        calibration: torch.Tensor | None,
        device: torch.device,
    ) -> Callable[[str, nn.Linear, GGUFConfig], GGUFLinear]:
        """Each linear in the type its role and position in ``model`` get, weighted by its entry of
        the importance matrix ``config`` asks for (read or collected here, once)."""
        shape = ModelShape.of(getattr(model, "config", None))
        matrix = resolve_imatrix(model, config, targets, calibration, device)

        def quantize(name: str, linear: nn.Linear, cfg: GGUFConfig) -> GGUFLinear:
            with bound_shape(shape):
                return self.quantize_linear(name, linear, cfg, device, matrix, shape)

        return quantize

    def other_quantizers(
        self, model: nn.Module, config: GGUFConfig, device: torch.device
    ) -> dict[str, Callable[[nn.Module], dict[str, nn.Module]]]:
        """The token embedding, in the type llama.cpp gives it (``output``'s when the head is tied
        to it, the head then sharing its packed table)."""
        plan = _embedding_plan(model, config)
        if plan is None:
            return {}

        def quantize(quantized: nn.Module) -> dict[str, nn.Module]:
            check_finite(plan.name, plan.module.weight)
            install_embedding(quantized, plan, GGUFEmbedding.from_embedding(plan.module, plan.qtype, device))
            names = [plan.name] if plan.tied_head is None else [plan.name, plan.tied_head]
            return {name: quantized.get_submodule(name) for name in names}

        return {plan.name: quantize}

    def working_bytes(self, config: GGUFConfig, out_features: int, in_features: int) -> int:
        """The quantizer converts and quantizes a chunk of rows at a time on each thread
        (:func:`~.quants.quantize`): :data:`CHUNK_WORKING_BYTES`, whatever the weight's size."""
        return CHUNK_WORKING_BYTES

    def quantize_linear(
        self,
        name: str,
        linear: nn.Linear,
        config: GGUFConfig,
        device: torch.device,
        imatrix: ImportanceMatrix | None = None,
        shape: ModelShape | None = None,
    ) -> GGUFLinear:
        """``linear`` in the ggml type its role gets, weighted by its entry of ``imatrix`` if any
        (``shape``: the model's, for the matrix's tensor names)."""
        values = imatrix_values(imatrix, name, linear.in_features, shape.n_layer if shape else None)
        return GGUFLinear.from_linear(linear, _linear_type(config, name, linear.in_features), device, imatrix=values)

    def empty_module(self, name: str, linear: nn.Linear, config: GGUFConfig) -> GGUFLinear:
        return GGUFLinear(
            linear.in_features,
            linear.out_features,
            _linear_type(config, name, linear.in_features),
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )

    def prepare_for_loading(self, model: nn.Module, config: GGUFConfig) -> nn.Module:
        """Empty GGUF modules of the types ``config`` gives, the token embedding included (saved
        ``ggml_type`` buffers win on load)."""
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # an empty transformers model is not tied yet: tie it as quantize() saw it
        with self.storage_context(model):
            super().prepare_for_loading(model, config)
        plan = _embedding_plan(model, config)
        if plan is not None:
            install_embedding(model, plan, empty_embedding(plan))
        return model

    def save_file(self, model: nn.Module, path: Path, *, tokenizer=None) -> None:
        """A complete llama.cpp ``.gguf``: hyperparameters, tokenizer, every tensor."""
        write_gguf(model, path, tokenizer)

    def stream_file(
        self,
        checkpoint: StreamedCheckpoint,
        config: GGUFConfig,
        path: Path,
        *,
        tokenizer=None,
        device: torch.device,
        resumed: Mapping[str, Any] | None = None,
        record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        r"""A complete llama.cpp ``.gguf``, its header planned before the first tensor is quantized;
        ``record``\ ed after each module (its tensors and the file's length)."""
        write_gguf_streamed(checkpoint, config, path, tokenizer, device, resumed=resumed, record=record)

    def input_files(self, config: GGUFConfig) -> tuple[Path, ...]:
        """The importance-matrix file, when ``config`` names one."""
        return (Path(config.imatrix),) if config.imatrix_is_file else ()

    def stream_source(self, path: Path) -> GGUFCheckpoint:
        """A llama ``.gguf`` (float or quantized tensors) as a float checkpoint to stream."""
        return GGUFCheckpoint(path)

    def load_file(self, path: Path, device: torch.device) -> nn.Module:
        """A quantized Llama ``.gguf`` as a model whose quantized tensors stay GGUF modules."""
        return read_gguf(path, device)


def _embedding_plan(model: nn.Module, config: GGUFConfig) -> EmbeddingPlan | None:
    return embedding_plan(model, config, ModelShape.of(getattr(model, "config", None)))


def _linear_type(config: GGUFConfig, name: str, in_features: int) -> str:
    """The ggml type of linear ``name`` (``""``: unknown) under its effective config, with the
    model shape bound by :meth:`GGUFBackend.storage_context`."""
    return linear_type(config, name, in_features, None)
