"""Reading a quantized llama ``.gguf`` (checked by :mod:`.header` and :mod:`.metadata`) into a model with GGUF modules.

Quantized tensors keep their ggml bytes (``attn_q``/``attn_k`` rows put back in
transformers' order); F32 tensors become ordinary float parameters. The model gets the
:class:`GGUFConfig` that describes the file: ``general.file_type``'s mix, its float
linears in ``modules_to_not_convert`` and every tensor whose type the mix would not
give in ``module_overrides``. A malformed file raises :class:`ModelFormatError`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from quantkit.builtin_backends.gguf.config import GGUF_MIXES, GGUF_TENSOR_TYPES, GGUFConfig
from quantkit.core.errors import ModelFormatError
from quantkit.core.linears import set_submodule
from quantkit.core.serialization import CONFIG_ATTR, empty_model

from . import quants
from .convert import linear_type
from .export import head_counts, rope_permutation
from .header import GGUFHeader, read_header
from .metadata import LLAMA, LlamaShape, check_key_types, llama_shape
from .mixes import FILE_TYPES, FLOAT_TYPES, ModelShape, Role, gguf_name, tensor_type
from .qlinear import GGUFEmbedding, GGUFLinear
from .rope import ROPE_FREQS, apply_freq_factors

_QUANT_TYPES_OF_FILE = {file_type: quant_type for quant_type, file_type in FILE_TYPES.items()}
# A "_S" file type is the mix of that name, not the pure K type it is closest to.
_QUANT_TYPES_OF_FILE.update({FILE_TYPES[mix]: mix for mix in ("Q3_K_S", "Q4_K_S", "Q5_K_S")})

_TOKEN_IDS = {"bos": "bos_token_id", "eos": "eos_token_id", "unknown": "unk_token_id", "padding": "pad_token_id"}


def read_gguf(path: Path, device: torch.device) -> nn.Module:
    """The quantized model in ``path``, on ``device``, with ``quantkit_config`` set.

    The header, the known keys' types and the hyperparameters are checked against the
    tensors present (:func:`read_llama`) before any model is built.
    """
    header, shape = read_llama(path)
    model = empty_llama(header, shape)
    file_type = header.fields.get("general.file_type")
    try:
        config = _fill(model, header, _QUANT_TYPES_OF_FILE.get(None if file_type is None else file_type.value))
    except ModelFormatError:
        raise
    except (ValueError, RuntimeError) as exc:  # torch/numpy on tensors the checks above let through
        raise ModelFormatError(f"{str(path)!r} does not hold a consistent llama model: {exc}") from exc
    factors = rope_freqs(header)
    if factors is not None:  # a llama3 rope (Llama 3.1+), as llama.cpp's converter writes it
        apply_freq_factors(model, factors)
    setattr(model, CONFIG_ATTR, config)
    return model.to(device).eval()


def read_llama(path: Path) -> tuple[GGUFHeader, LlamaShape]:
    """The checked header of the llama ``.gguf`` at ``path`` and its hyperparameters, checked against
    its tensors (:func:`~.metadata.llama_shape`); another architecture raises :class:`ModelFormatError`."""
    header = read_header(path)
    check_key_types(header)
    architecture = header.fields["general.architecture"].value
    if architecture != LLAMA:
        raise ModelFormatError(
            f"{str(path)!r} holds a {architecture!r} model; quantkit reads and streams llama GGUF files "
            "(quantkit.models.load_model reads other architectures as float models)"
        )
    return header, llama_shape(header)


def empty_llama(header: GGUFHeader, shape: LlamaShape, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The transformers llama of ``header``'s checked ``shape`` on the meta device, its parameters of ``dtype``
    (the output head tied to the embedding when the file has no ``output.weight``)."""
    raw = _hf_config(shape, tied="output.weight" not in header.tensors, dtype=dtype)
    try:
        return empty_model(raw, source=str(header.path))
    except ModelFormatError:
        raise
    except (ValueError, TypeError, StrictDataclassError) as exc:  # transformers' config validation
        raise ModelFormatError(f"{str(header.path)!r}: transformers refuses its llama hyperparameters: {exc}") from exc


def rope_freqs(header: GGUFHeader) -> torch.Tensor | None:
    """The file's llama3 rope divisors (:data:`~.rope.ROPE_FREQS`, float32), or None when it has none."""
    info = header.tensors.get(ROPE_FREQS)
    if info is None:
        return None
    if info.qtype != "F32":
        raise ModelFormatError(f"{str(header.path)!r}: {ROPE_FREQS} is {info.qtype}, expected F32")
    return torch.from_numpy(header.tensor_bytes(info).view(np.float32).copy())


def hf_names(model: nn.Module) -> dict[str, str]:
    """GGUF tensor name -> the name of that tensor in the transformers llama ``model``."""
    return {gguf_name(key, model.config.num_hidden_layers): key for key in model.state_dict()}


def hf_row_order(name: str, rows: int, hf: Any) -> torch.Tensor | None:
    """The row order that puts GGUF tensor ``name``'s ``rows`` back in transformers' order (``attn_q``,
    ``attn_k``: llama.cpp's converter interleaves their rotary halves); None for other tensors."""
    heads = head_counts(hf)
    kind = name.split(".")[-2]
    return torch.argsort(rope_permutation(rows, heads[kind])) if kind in heads else None


def _hf_config(shape: LlamaShape, *, tied: bool, dtype: torch.dtype) -> dict:
    """A transformers ``config.json`` dict of the checked hyperparameters, as transformers' GGUF loader reads them."""
    raw: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "dtype": str(dtype).removeprefix("torch."),
        "num_hidden_layers": shape.layers,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "tie_word_embeddings": tied,
    }
    optional = {
        "max_position_embeddings": shape.context,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
    }
    raw.update({key: value for key, value in optional.items() if value is not None})
    raw.update({_TOKEN_IDS[name]: token for name, token in shape.token_ids.items()})
    return raw


def _fill(model: nn.Module, header: GGUFHeader, file_quant_type: str | None) -> GGUFConfig:
    """Put the file's tensors into the empty ``model``; return the config describing them."""
    hf = model.config
    modules = dict(model.named_modules())
    by_gguf = hf_names(model)
    floats: dict[str, torch.Tensor] = {}
    packed: dict[str, tuple[str, torch.Tensor]] = {}
    for name, tensor in header.tensors.items():
        if name == ROPE_FREQS:
            continue  # not a parameter: read_gguf applies it to the rotary embedding
        key = by_gguf.get(name)
        if key is None:
            raise ModelFormatError(f"{str(header.path)!r}: tensor {name!r} is not part of a llama model")
        qtype = tensor.qtype
        expected = tuple(model.get_parameter(key).shape)
        if tensor.shape[::-1] != expected:
            raise ModelFormatError(
                f"{str(header.path)!r}: tensor {name!r} has shape {list(tensor.shape[::-1])}, expected {list(expected)}"
            )
        data = header.tensor_bytes(tensor)
        order = hf_row_order(name, expected[0], hf)
        module_name, _, leaf = key.rpartition(".")
        if qtype != "F32" and leaf == "weight" and isinstance(modules[module_name], (nn.Linear, nn.Embedding)):
            if qtype not in quants.QUANT_TYPES:
                raise ModelFormatError(
                    f"tensor {name!r} is {qtype}, a type quantkit's GGUF backend does not implement; "
                    "quantkit.models.load_model reads the file as a float model"
                )
            value = torch.from_numpy(data.reshape(expected[0], -1))
            packed[module_name] = (qtype, value if order is None else value[order])
        elif qtype in FLOAT_TYPES:
            value = quants.dequantize(torch.from_numpy(data), qtype, expected)
            floats[key] = value if order is None else value[order]
        else:
            raise ModelFormatError(
                f"tensor {name!r} is {qtype}; quantkit expects F32, F16 or BF16 for a tensor that is not "
                "a linear or embedding weight"
            )
    config = _describe(model, packed, floats, file_quant_type)
    for module_name, (qtype, value) in packed.items():
        module = modules[module_name]
        if isinstance(module, nn.Embedding):
            replacement = GGUFEmbedding(
                module.num_embeddings, module.embedding_dim, qtype, padding_idx=module.padding_idx
            )
        else:
            replacement = GGUFLinear(module.in_features, module.out_features, qtype)
        replacement.load_bytes(value, qtype)
        set_submodule(model, module_name, replacement)
    result = model.load_state_dict(floats, strict=False, assign=True)
    if hf.tie_word_embeddings:
        embedding = model.get_input_embeddings()
        if isinstance(embedding, GGUFEmbedding):
            set_submodule(model, _name_of(model, model.get_output_embeddings()), GGUFLinear.tied_to(embedding))
        else:
            model.tie_weights()
    missing = [k for k in result.missing_keys if k.rpartition(".")[0] not in packed]
    if hf.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise ModelFormatError(f"the file lacks tensors for {missing[:5]}")
    return config


def _describe(
    model: nn.Module, packed: dict[str, tuple[str, torch.Tensor]], floats: dict, file_quant_type: str | None
) -> GGUFConfig:
    """The GGUFConfig under which quantkit would produce exactly these tensor types."""
    if not packed:
        raise ModelFormatError(
            "the file holds no quantized tensor; quantkit.models.load_model reads it as a float model"
        )
    quant_type = file_quant_type or Counter(qtype for qtype, _ in packed.values()).most_common(1)[0][0]
    if quant_type not in GGUF_TENSOR_TYPES + GGUF_MIXES:
        raise ModelFormatError(f"the file's main type {quant_type} is not a GGUFConfig.quant_type")
    embedding = _name_of(model, model.get_input_embeddings())
    convertible = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)} | {embedding}
    float_modules = sorted(name for name in (k.removesuffix(".weight") for k in floats) if name in convertible)
    base = GGUFConfig(quant_type=quant_type, modules_to_not_convert=float_modules)
    shape = ModelShape.of(model.config)
    overrides = {}
    for name, (qtype, _) in packed.items():
        if name == embedding:
            role = Role("output") if model.config.tie_word_embeddings else Role("token_embd")
            expected = tensor_type(quant_type, role, model.get_input_embeddings().embedding_dim, shape)
        else:
            expected = linear_type(base, name, model.get_submodule(name).in_features, shape)
        if expected != qtype:
            overrides[name] = {"quant_type": qtype}
    return GGUFConfig(quant_type=quant_type, modules_to_not_convert=float_modules, module_overrides=overrides)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)
