"""Which ggml type each tensor gets: llama.cpp's quantization mixes and its row-size fallbacks.

``GGUFConfig.quant_type`` is either a single ggml type or a llama.cpp mix:

* a **single type** (``Q4_0`` ... ``Q6_K``, ``IQ4_NL``, ``IQ4_XS``, ``F16``, ``BF16``) is used for every tensor
  quantkit quantizes (llama-quantize's ``--pure``), the token embedding included;
* a **mix** (``Q2_K``, ``Q3_K_S/M/L``, ``Q4_K_S/M``, ``Q5_K_S/M``) follows llama.cpp's
  ``llama_tensor_get_type`` (src/llama-quant.cpp) for a dense Llama-family model: more bits
  for ``attn_v`` and ``ffn_down`` in chosen layers, for ``attn_output`` in some mixes,
  ``Q6_K`` (or ``Q8_0``) for the output matrix — and for the token embedding when the
  output is tied to it. ``Q2_K`` names the mix (as in llama-quantize), not a pure type.

Either way a type whose block does not divide the row length falls back like llama.cpp:
``Q4_K -> Q5_0``, ``Q5_K -> Q5_1``, ``Q6_K -> Q8_0`` and, if even that block does not fit,
``F16`` (``IQ4_XS -> IQ4_NL``). For ``Q2_K``/``Q3_K`` llama.cpp has used ``IQ4_NL`` since early 2024; quantkit uses
the earlier ``Q4_0``, which has the same size (18 bytes per 32 weights) and is supported by
every GGUF reader. SmolLM2's hidden size 576 = 2.25 x 256, so every matrix reading the
hidden state falls back there.
"""

from __future__ import annotations

import contextvars
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from gguf import MODEL_ARCH, LlamaFileType, get_tensor_name_map

from quantkit.core.errors import QuantkitError

from .quants import block_size, type_size

FLOAT_TYPES = ("F32", "F16", "BF16")

MIX_BASE_TYPES: dict[str, str] = {
    "Q2_K": "Q2_K",
    "Q3_K_S": "Q3_K",
    "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K",
    "Q5_K_M": "Q5_K",
}
"""Each llama.cpp mix and its default ggml type."""

FILE_TYPES: dict[str, LlamaFileType] = {
    "F16": LlamaFileType.MOSTLY_F16,
    "BF16": LlamaFileType.MOSTLY_BF16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q5_1": LlamaFileType.MOSTLY_Q5_1,
    "Q5_0": LlamaFileType.MOSTLY_Q5_0,
    "Q4_1": LlamaFileType.MOSTLY_Q4_1,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K,
    # pure K types have no ftype of their own: the "_S" mixes are the closest (mostly that type)
    "Q5_K": LlamaFileType.MOSTLY_Q5_K_S,
    "Q4_K": LlamaFileType.MOSTLY_Q4_K_S,
    "Q3_K": LlamaFileType.MOSTLY_Q3_K_S,
    "Q2_K": LlamaFileType.MOSTLY_Q2_K,
    "IQ4_XS": LlamaFileType.MOSTLY_IQ4_XS,
    "IQ4_NL": LlamaFileType.MOSTLY_IQ4_NL,
    "Q3_K_S": LlamaFileType.MOSTLY_Q3_K_S,
    "Q3_K_M": LlamaFileType.MOSTLY_Q3_K_M,
    "Q3_K_L": LlamaFileType.MOSTLY_Q3_K_L,
    "Q4_K_S": LlamaFileType.MOSTLY_Q4_K_S,
    "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M,
    "Q5_K_S": LlamaFileType.MOSTLY_Q5_K_S,
    "Q5_K_M": LlamaFileType.MOSTLY_Q5_K_M,
}
"""``general.file_type`` written for each ``quant_type``."""

_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters llama.cpp's mix rules look at."""

    n_layer: int
    n_gqa: int = 1

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B for the llama architecture: 80 layers with grouped-query attention."""
        return self.n_layer == 80 and self.n_gqa > 1

    @classmethod
    def of(cls, model_config: Any) -> ModelShape | None:
        """Read from a transformers config; ``None`` when it has no layer count."""
        n_layer = getattr(model_config, "num_hidden_layers", None)
        if not isinstance(n_layer, int):
            return None
        heads = getattr(model_config, "num_attention_heads", None) or 1
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        return cls(n_layer, max(1, heads // kv_heads))


_bound_shape: contextvars.ContextVar[ModelShape | None] = contextvars.ContextVar("gguf_model_shape", default=None)


@contextmanager
def bound_shape(shape: ModelShape | None):
    """Let :func:`tensor_type` calls without an explicit shape see ``shape`` (the estimator's model)."""
    token = _bound_shape.set(shape)
    try:
        yield
    finally:
        _bound_shape.reset(token)


@dataclass(frozen=True)
class Role:
    """What llama.cpp calls a tensor: ``kind`` such as ``attn_v`` or ``token_embd``, and its block."""

    kind: str
    layer: int | None = None


_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@lru_cache(maxsize=8)
def _name_map(n_blocks: int):
    return get_tensor_name_map(MODEL_ARCH.LLAMA, n_blocks)


def gguf_name(hf_name: str, n_layer: int | None = None) -> str | None:
    """The GGUF name (``blk.3.attn_v``) of a transformers module or tensor name, or ``None``."""
    if n_layer is None:  # enough blocks for the name's own index, rounded up so that maps get reused
        n_layer = 32 * (max((int(i) for i in _LAYER.findall(hf_name)), default=0) // 32 + 1)
    found = _name_map(n_layer).get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
    return None if found is None else found[1]


def role_of(hf_name: str, n_layer: int | None = None) -> Role | None:
    """The llama.cpp role of a transformers module name; ``None`` when it has none."""
    name = gguf_name(hf_name, n_layer) if hf_name else None
    if name is None:
        return None
    parts = name.removesuffix(".weight").removesuffix(".bias").split(".")
    if parts[0] == "blk":
        return Role(parts[2], int(parts[1]))
    return Role(parts[0])


def with_fallback(qtype: str, n_cols: int) -> str:
    """``qtype``, or llama.cpp's replacement when its block does not divide a row of ``n_cols``."""
    if n_cols % block_size(qtype) == 0:
        return qtype
    replacement = _FALLBACK.get(qtype, "F16")
    return replacement if n_cols % block_size(replacement) == 0 else "F16"


def row_bytes(qtype: str, n_cols: int) -> int:
    """Bytes of one stored row of ``n_cols`` weights."""
    return n_cols // block_size(qtype) * type_size(qtype)


def tensor_type(quant_type: str, role: Role | None, n_cols: int, shape: ModelShape | None = None) -> str:
    """The ggml type llama.cpp would store this tensor in (fallback included).

    ``role`` of ``output`` also stands for a token embedding tied to the output. ``shape``
    defaults to the one bound with :func:`bound_shape`; mixes need it for ``attn_v`` and
    ``ffn_down``, whose type depends on the layer's position in the model.
    """
    if quant_type not in MIX_BASE_TYPES:
        return with_fallback(quant_type, n_cols)
    base = MIX_BASE_TYPES[quant_type]
    if role is None:
        return with_fallback(base, n_cols)
    if role.kind == "output":
        if n_cols % block_size(base):
            return with_fallback("Q8_0", n_cols)
        return with_fallback("Q6_K", n_cols)
    if role.kind in ("attn_v", "ffn_down"):
        shape = shape or _bound_shape.get()
        if shape is None or role.layer is None:
            raise QuantkitError(
                f"the type of {role.kind} in a {quant_type} mix depends on the model's layer count; "
                "call storage_bits inside GGUFBackend().storage_context(model)"
            )
        rule = _attn_v if role.kind == "attn_v" else _ffn_down
        return with_fallback(rule(quant_type, base, role.layer, shape), n_cols)
    if role.kind == "attn_output":
        return with_fallback({"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(quant_type, base), n_cols)
    return with_fallback(base, n_cols)


def _use_more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's pick of layers that get more bits: the first and last eighth, and every third between."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def _attn_v(quant_type: str, base: str, layer: int, shape: ModelShape) -> str:
    qtype = base
    if quant_type == "Q2_K":
        qtype = "Q4_K" if shape.n_gqa >= 4 else "Q3_K"
    elif quant_type == "Q3_K_M":
        qtype = "Q5_K" if layer < 2 else "Q4_K"
    elif quant_type == "Q3_K_L":
        qtype = "Q5_K"
    elif quant_type in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, shape.n_layer):
        qtype = "Q6_K"
    elif quant_type == "Q4_K_S" and layer < 4:
        qtype = "Q5_K"
    if shape.is_70b and qtype in ("Q3_K", "Q4_K"):
        qtype = "Q5_K"
    return qtype


def _ffn_down(quant_type: str, base: str, layer: int, shape: ModelShape) -> str:
    n = shape.n_layer
    if quant_type == "Q2_K":
        return "Q3_K"
    if quant_type == "Q3_K_M":
        return "Q5_K" if layer < n // 16 else "Q4_K"
    if quant_type == "Q3_K_L":
        return "Q5_K"
    if quant_type in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n):
        return "Q6_K"
    if quant_type == "Q4_K_S" and layer < n // 8:
        return "Q5_K"
    return base
