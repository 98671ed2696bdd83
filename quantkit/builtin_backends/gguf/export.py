"""Writing a quantized Llama-family model as a complete llama.cpp ``.gguf`` (gguf-py's GGUFWriter).

What llama.cpp's converter writes: ``general.architecture = llama``, the ``llama.*``
hyperparameters, ``general.file_type`` of the mix, the tokenizer, and every tensor under
its GGUF name with its shape reversed (gguf-py reverses it). Quantized tensors are the
modules' ggml bytes as they are; norms and biases are F32; other float tensors keep their
dtype. ``attn_q``/``attn_k`` rows are permuted as llama.cpp's converter does (transformers'
GGUF loader undoes it). A tied output matrix is written once, as ``token_embd``. A llama3 rope
(Llama 3.1+) is written as llama.cpp's converter writes it, a ``rope_freqs`` tensor (:mod:`.rope`).

:func:`open_writer` (metadata, tokenizer) and :func:`file_tensors` / :func:`file_tensor` (names,
permutation, types) are shared with :mod:`.stream_export`, which writes the same file from a
checkpoint streamed from disk.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter
from torch import nn

from quantkit.core.errors import QuantkitError
from quantkit.core.serialization import quant_config_of

from .mixes import FILE_TYPES, gguf_name
from .qlinear import GGUFWeight
from .rope import ROPE_FREQS, ROPE_TYPES, freq_factors, rope_parameters
from .vocab import add_tokenizer

log = logging.getLogger("quantkit")

ARCHITECTURE = "llama"
ROPE_KEY = "rope_freqs"
"""The :class:`FileTensor` key of the rope divisors, computed from the config: no module holds them."""
PERMUTED = ("attn_q", "attn_k")
"""Tensors whose rows llama.cpp's converter reorders (rotary pairs interleaved per head)."""


class FileTensor(NamedTuple):
    """One tensor as the ``.gguf`` holds it: its state-dict key, GGUF name, data laid out for the
    file (a meta tensor when planned) and ggml type (``None``: the dtype's F32/F16)."""

    key: str
    name: str
    data: torch.Tensor
    raw_dtype: GGMLQuantizationType | None

    def array(self) -> np.ndarray:
        """The data as the numpy array the writer takes."""
        return self.data.detach().cpu().contiguous().numpy()

    def add_info(self, writer: GGUFWriter) -> None:
        """Declare the tensor (name, shape, type, size) to ``writer`` without its data."""
        dtype = np.dtype(str(self.data.dtype).removeprefix("torch."))
        nbytes = self.data.numel() * self.data.element_size()
        writer.add_tensor_info(self.name, tuple(self.data.shape), dtype, nbytes, raw_dtype=self.raw_dtype)


def write_gguf(model: nn.Module, path: Path, tokenizer: Any = None) -> None:
    """Write ``model`` (quantized by the GGUF backend) and ``tokenizer`` to ``path``."""
    writer = open_writer(path, model.config, quant_config_of(model).quant_type, tokenizer)
    try:
        for tensor in file_tensors(model):
            writer.add_tensor(tensor.name, tensor.array(), raw_dtype=tensor.raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def open_writer(path: Path, hf: Any, quant_type: str, tokenizer: Any) -> GGUFWriter:
    """A writer for ``path`` holding the hyperparameters of ``hf`` (a transformers config), the
    file type of ``quant_type`` and ``tokenizer``; the model's support is checked first."""
    _check_supported(hf)
    writer = GGUFWriter(path, ARCHITECTURE)
    _add_hyperparameters(writer, hf, FILE_TYPES[quant_type])
    if tokenizer is None:
        log.warning("GGUF export without a tokenizer: llama.cpp cannot run %s", path.name)
    else:
        add_tokenizer(writer, tokenizer, hf.vocab_size)
    return writer


def _check_supported(hf: Any) -> None:
    problems = []
    if getattr(hf, "model_type", None) != "llama":
        problems.append(f"model_type={getattr(hf, 'model_type', None)!r} (only 'llama' is written)")
    rope_type = rope_parameters(hf).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        problems.append(f"rope_type={rope_type!r} (written: {', '.join(ROPE_TYPES)})")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        problems.append("attention/MLP biases")
    if getattr(hf, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf.hidden_act!r}")
    if problems:
        raise QuantkitError("GGUF export supports Llama-family models; this one has " + ", ".join(problems))


def _add_hyperparameters(writer: GGUFWriter, hf: Any, file_type: int) -> None:
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    rope = getattr(hf, "rope_parameters", None) or {}
    writer.add_name(Path(str(getattr(hf, "_name_or_path", "") or "model")).name)
    writer.add_context_length(hf.max_position_embeddings)
    writer.add_embedding_length(hf.hidden_size)
    writer.add_block_count(hf.num_hidden_layers)
    writer.add_feed_forward_length(hf.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(hf, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(hf.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hf.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(hf.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(GGML_QUANT_VERSION)


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives q/k: per head, halves interleaved (new[i] = old[perm[i]])."""
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def head_counts(hf: Any) -> dict[str, int]:
    """Heads whose rows :func:`rope_permutation` reorders, for ``attn_q`` and ``attn_k``."""
    heads = hf.num_attention_heads
    return {"attn_q": heads, "attn_k": getattr(hf, "num_key_value_heads", None) or heads}


def file_tensors(model: nn.Module) -> Iterator[FileTensor]:
    """Every tensor of ``model`` (quantized by the GGUF backend, or its empty form on the meta
    device) in the order and layout the ``.gguf`` holds them, a llama3 rope's divisors first
    (:data:`~.rope.ROPE_FREQS`, as llama.cpp's converter writes them); a tied head is left out."""
    factors = freq_factors(model)
    if factors is not None:
        yield FileTensor(ROPE_KEY, ROPE_FREQS, factors.float(), None)
    heads = head_counts(model.config)
    modules = dict(model.named_modules())
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embedding.weight
    for key, tensor in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        module = modules[module_name]
        if leaf == "ggml_type" or (tied and module is head):
            continue
        yield file_tensor(key, tensor, module, model.config.num_hidden_layers, heads)


def file_tensor(key: str, tensor: torch.Tensor, module: nn.Module, n_layer: int, heads: dict[str, int]) -> FileTensor:
    """State-dict entry ``key`` of ``module`` as the ``.gguf`` holds it: GGUF name, q/k rows
    permuted, quantized bytes as they are, norms and biases F32, other floats in their dtype."""
    name = gguf_name(key, n_layer)
    if name is None:
        raise QuantkitError(f"GGUF export: {key} has no llama.cpp tensor name")
    kind = name.split(".")[-2]
    if kind in heads:
        tensor = tensor[rope_permutation(tensor.shape[0], heads[kind]).to(tensor.device)]
    tensor = tensor.detach()
    if isinstance(module, GGUFWeight) and key.endswith(".weight"):
        return FileTensor(key, name, tensor, GGMLQuantizationType[module.qtype])
    if tensor.dim() == 1 or tensor.dtype == torch.float32:
        return FileTensor(key, name, tensor.float(), None)
    if tensor.dtype == torch.bfloat16:
        return FileTensor(key, name, tensor.contiguous().view(torch.uint8), GGMLQuantizationType.BF16)
    return FileTensor(key, name, tensor.to(torch.float16), None)
