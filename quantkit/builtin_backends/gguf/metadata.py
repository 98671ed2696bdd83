"""What a ``.gguf`` file's known keys must hold, and a llama model's hyperparameters checked against its tensors.

Key types follow llama.cpp's GGUF spec (``docs/gguf.md`` in ggml): counts and lengths are
unsigned integers (the spec says uint64, llama.cpp's writers use uint32: any non-negative
integer type is read), epsilons and frequencies floats, token lists ``array[string]``,
token types ``array[int32]``, scores ``array[float32]``, token ids uint32. A llama file's
hyperparameters must agree with each other and with the tensors present (the exact set
and shapes llama.cpp's loader expects), so that a model built from them holds exactly the
file's tensors: its size is bounded by the file's, and nothing is allocated for a count
the file does not back. Everything raises :class:`ModelFormatError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from gguf import GGUFValueType, LlamaFileType, TokenType

from quantkit.core.errors import ModelFormatError

from .header import GGUFHeader, KeyValue, read_header
from .rope import ROPE_FREQS

LLAMA = "llama"
MAX_CONTEXT = 2**31 - 1

_INTEGERS = frozenset(
    {
        GGUFValueType.UINT8,
        GGUFValueType.INT8,
        GGUFValueType.UINT16,
        GGUFValueType.INT16,
        GGUFValueType.UINT32,
        GGUFValueType.INT32,
        GGUFValueType.UINT64,
        GGUFValueType.INT64,
    }
)
_FLOATS = frozenset({GGUFValueType.FLOAT32, GGUFValueType.FLOAT64})

COUNT, FLOAT, STRING, BOOL, TOKEN_ID = "count", "float", "string", "bool", "token id"
_GENERAL_KEYS = {
    "general.architecture": STRING,
    "general.name": STRING,
    "general.type": STRING,
    "general.basename": STRING,
    "general.finetune": STRING,
    "general.size_label": STRING,
    "general.organization": STRING,
    "general.author": STRING,
    "general.description": STRING,
    "general.license": STRING,
    "general.url": STRING,
    "general.file_type": COUNT,
    "general.quantization_version": COUNT,
    "tokenizer.ggml.model": STRING,
    "tokenizer.ggml.pre": STRING,
    "tokenizer.ggml.bos_token_id": TOKEN_ID,
    "tokenizer.ggml.eos_token_id": TOKEN_ID,
    "tokenizer.ggml.unknown_token_id": TOKEN_ID,
    "tokenizer.ggml.separator_token_id": TOKEN_ID,
    "tokenizer.ggml.padding_token_id": TOKEN_ID,
    "tokenizer.ggml.add_bos_token": BOOL,
    "tokenizer.ggml.add_eos_token": BOOL,
    "tokenizer.ggml.add_space_prefix": BOOL,
    "tokenizer.chat_template": STRING,
}
_ARRAYS = {
    "tokenizer.ggml.tokens": GGUFValueType.STRING,
    "tokenizer.ggml.merges": GGUFValueType.STRING,
    "tokenizer.ggml.token_type": GGUFValueType.INT32,
    "tokenizer.ggml.scores": GGUFValueType.FLOAT32,
}
_LLAMA_KEYS = {
    "context_length": COUNT,
    "embedding_length": COUNT,
    "block_count": COUNT,
    "feed_forward_length": COUNT,
    "attention.head_count": COUNT,
    "attention.head_count_kv": COUNT,
    "attention.key_length": COUNT,
    "attention.value_length": COUNT,
    "rope.dimension_count": COUNT,
    "vocab_size": COUNT,
    "attention.layer_norm_rms_epsilon": FLOAT,
    "rope.freq_base": FLOAT,
}
_EXPECTED = {
    COUNT: "a non-negative integer (uint32, or uint64 as the GGUF spec has it)",
    FLOAT: "a float (float32 in the GGUF spec)",
    STRING: "a string",
    BOOL: "a bool",
    TOKEN_ID: "a uint32 token id",
}
OPTIONAL = ("output.weight", ROPE_FREQS)
"""Tensors a llama file may lack: the output head (tied to ``token_embd``), llama3 rope divisors."""
_BLOCK = re.compile(r"blk\.(\d+)\.")
_ANY_BLOCK = re.compile(r"(?:^|\.)blk\.(\d+)\.")


@dataclass(frozen=True)
class LlamaShape:
    """A llama file's checked hyperparameters."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int | None
    rms_norm_eps: float | None
    rope_theta: float | None
    token_ids: dict[str, int]
    """``bos``/``eos``/``unknown``/``padding`` -> id, those the file gives."""


def check_gguf(path) -> GGUFHeader:
    """The checked header of ``path``: its structure, the types of its known keys and, for a
    llama file, hyperparameters that agree with its tensors (any other architecture: its
    block and embedding counts)."""
    header = read_header(path)
    check_key_types(header)
    architecture = header.fields["general.architecture"].value
    if architecture == LLAMA:
        llama_shape(header)
    else:
        _check_common(header, architecture)
    return header


def check_key_types(header: GGUFHeader) -> None:
    """Every known key holds the type llama.cpp's spec gives it; ``general.architecture`` is present."""
    if "general.architecture" not in header.fields:
        raise _error(header, "general.architecture is missing; every GGUF model names its architecture")
    architecture = header.fields["general.architecture"]
    if architecture.type is not GGUFValueType.STRING:
        raise _bad_type(header, "general.architecture", architecture, STRING)
    known = dict(_GENERAL_KEYS)
    if architecture.value == LLAMA:
        known.update({f"{LLAMA}.{key}": kind for key, kind in _LLAMA_KEYS.items()})
    for key, kind in known.items():
        field = header.fields.get(key)
        if field is not None and not _is(field, kind):
            raise _bad_type(header, key, field, kind)
    for key, item in _ARRAYS.items():
        field = header.fields.get(key)
        if field is not None and (field.type is not GGUFValueType.ARRAY or field.item_type is not item):
            raise ModelFormatError(
                f"{str(header.path)!r}: {key} is {field.describe()}; the GGUF spec has array[{item.name.lower()}]"
            )
    file_type = header.fields.get("general.file_type")
    if file_type is not None and file_type.value not in set(LlamaFileType):
        raise _error(header, f"general.file_type={file_type.value} is not a llama.cpp file type (LlamaFileType)")


def llama_shape(header: GGUFHeader) -> LlamaShape:
    """A llama file's hyperparameters, checked against each other and its tensors (after :func:`check_key_types`)."""

    def get(key: str) -> int | float | None:
        field = header.fields.get(f"{LLAMA}.{key}")
        return None if field is None else field.value

    def need(key: str) -> int:
        value = get(key)
        if value is None:
            raise _error(header, f"{LLAMA}.{key} is missing; a llama model needs it")
        if value < 1:
            raise _error(header, f"{LLAMA}.{key}={value} must be at least 1")
        return value

    layers, hidden, heads, intermediate = (
        need(k) for k in ("block_count", "embedding_length", "attention.head_count", "feed_forward_length")
    )
    kv_heads = get("attention.head_count_kv")
    kv_heads = heads if kv_heads is None else kv_heads
    if kv_heads < 1 or heads % kv_heads:
        raise _error(
            header, f"{LLAMA}.attention.head_count_kv={kv_heads} must be at least 1 and divide head_count={heads}"
        )
    head_dim = _head_dim(header, get, hidden, heads)
    _check_blocks(header, layers)
    embedding = header.tensors.get("token_embd.weight")
    if embedding is None or len(embedding.shape) != 2:
        raise _error(header, "token_embd.weight is missing or not a matrix")
    if embedding.shape[0] != hidden:
        raise _error(
            header, f"{LLAMA}.embedding_length={hidden} does not match token_embd.weight's rows of {embedding.shape[0]}"
        )
    vocab = embedding.shape[1]
    if vocab < 1 or get("vocab_size") not in (None, vocab):
        raise _error(header, f"{LLAMA}.vocab_size={get('vocab_size')} but token_embd.weight holds {vocab} tokens")
    context = get("context_length")
    if context is not None and not 1 <= context <= MAX_CONTEXT:
        raise _error(header, f"{LLAMA}.context_length={context} is outside 1..{MAX_CONTEXT}")
    eps, theta = get("attention.layer_norm_rms_epsilon"), get("rope.freq_base")
    for key, value in (("attention.layer_norm_rms_epsilon", eps), ("rope.freq_base", theta)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise _error(header, f"{LLAMA}.{key}={value} must be a finite positive number")
    shape = LlamaShape(
        layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, context, eps, theta, _token_ids(header, vocab)
    )
    _check_tokenizer(header, vocab)
    _check_tensors(header, shape)
    return shape


def expected_tensors(shape: LlamaShape) -> dict[str, tuple[int, ...]]:
    """The ggml shape (``ne``) of every tensor a llama model of ``shape`` may have (:data:`OPTIONAL`: when present)."""
    h, q, kv, ff = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    tensors = {"token_embd.weight": (h, shape.vocab), "output_norm.weight": (h,), "output.weight": (h, shape.vocab)}
    tensors[ROPE_FREQS] = (shape.head_dim // 2,)
    for i in range(shape.layers):
        block = {
            "attn_norm": (h,),
            "attn_q": (h, q),
            "attn_k": (h, kv),
            "attn_v": (h, kv),
            "attn_output": (q, h),
            "ffn_norm": (h,),
            "ffn_gate": (h, ff),
            "ffn_up": (h, ff),
            "ffn_down": (ff, h),
        }
        tensors.update({f"blk.{i}.{name}.weight": dims for name, dims in block.items()})
    return tensors


def _head_dim(header: GGUFHeader, get, hidden: int, heads: int) -> int:
    rope, key, value = get("rope.dimension_count"), get("attention.key_length"), get("attention.value_length")
    given = {k: v for k, v in (("rope.dimension_count", rope), ("attention.key_length", key)) if v is not None}
    if value is not None and value != (key if key is not None else value):
        raise _error(header, f"{LLAMA}.attention.value_length={value} differs from key_length={key}")
    if value is not None:
        given["attention.value_length"] = value
    if not given:
        if hidden % heads:
            raise _error(header, f"{LLAMA}.attention.head_count={heads} does not divide embedding_length={hidden}")
        return hidden // heads
    if len(set(given.values())) > 1:
        raise _error(header, f"{LLAMA} head sizes disagree: {given}")
    head_dim = next(iter(given.values()))
    if head_dim < 2 or head_dim % 2:
        raise _error(header, f"{LLAMA} head size {given} must be even and at least 2 (rotary pairs)")
    return head_dim


def _check_blocks(header: GGUFHeader, layers: int) -> None:
    present = {int(m.group(1)) for name in header.tensors if (m := _BLOCK.match(name))}
    if layers != len(present) or (present and max(present) != layers - 1):
        raise _error(
            header,
            f"{LLAMA}.block_count={layers} but the file holds tensors for {len(present)} blocks"
            f"{f' (highest blk.{max(present)})' if present else ''}",
        )


def _check_common(header: GGUFHeader, architecture: str) -> None:
    """Block and embedding counts any architecture's file must back with tensors."""
    for key in ("block_count", "embedding_length"):
        field = header.fields.get(f"{architecture}.{key}")
        if field is not None and not _is(field, COUNT):
            raise _bad_type(header, f"{architecture}.{key}", field, COUNT)
    layers = header.fields.get(f"{architecture}.block_count")
    if layers is not None:  # blocks may have a prefix (T5's enc.blk.N, dec.blk.N)
        present = {int(m.group(1)) for name in header.tensors if (m := _ANY_BLOCK.search(name))}
        if layers.value > len(present):
            raise _error(
                header,
                f"{architecture}.block_count={layers.value} but the file holds tensors for {len(present)} blocks",
            )
    hidden, embedding = header.fields.get(f"{architecture}.embedding_length"), header.tensors.get("token_embd.weight")
    if hidden is not None and embedding is not None and embedding.shape[:1] != (hidden.value,):
        raise _error(
            header,
            f"{architecture}.embedding_length={hidden.value} does not match token_embd.weight's shape "
            f"{list(embedding.shape)}",
        )


def _token_ids(header: GGUFHeader, vocab: int) -> dict[str, int]:
    ids = {}
    for name in ("bos", "eos", "unknown", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        field = header.fields.get(key)
        if field is None:
            continue
        if not 0 <= field.value < vocab:
            raise _error(header, f"{key}={field.value} is outside the vocabulary 0..{vocab - 1}")
        ids[name] = field.value
    return ids


def _check_tokenizer(header: GGUFHeader, vocab: int) -> None:
    tokens = header.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.value) != vocab:
        raise _error(header, f"tokenizer.ggml.tokens has {len(tokens.value)} tokens; token_embd.weight has {vocab}")
    n = vocab if tokens is None else len(tokens.value)
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        field = header.fields.get(key)
        if field is not None and len(field.value) != n:
            raise _error(header, f"{key} has {len(field.value)} entries for {n} tokens")
    merges = header.fields.get("tokenizer.ggml.merges")
    broken = next((m for m in merges.value if " " not in m[1:]), None) if merges is not None else None
    if broken is not None:
        raise _error(header, f"tokenizer.ggml.merges holds {broken[:40]!r}, not two tokens separated by a space")
    types = header.fields.get("tokenizer.ggml.token_type")
    if types is not None and len(types.value):
        low, high = int(types.value.min()), int(types.value.max())
        if low < min(TokenType) or high > max(TokenType):
            raise _error(
                header,
                f"tokenizer.ggml.token_type holds {low if low < min(TokenType) else high}, "
                f"outside llama.cpp's token types {int(min(TokenType))}..{int(max(TokenType))}",
            )


def _check_tensors(header: GGUFHeader, shape: LlamaShape) -> None:
    expected = expected_tensors(shape)
    sources = {
        "attn_q": f"attention.head_count={shape.heads}, head size {shape.head_dim}",
        "attn_output": f"attention.head_count={shape.heads}, head size {shape.head_dim}",
        "attn_k": f"attention.head_count_kv={shape.kv_heads}, head size {shape.head_dim}",
        "attn_v": f"attention.head_count_kv={shape.kv_heads}, head size {shape.head_dim}",
        "ffn_gate": f"feed_forward_length={shape.intermediate}",
        "ffn_up": f"feed_forward_length={shape.intermediate}",
        "ffn_down": f"feed_forward_length={shape.intermediate}",
    }
    for name, info in header.tensors.items():
        if name not in expected:
            raise _error(header, f"tensor {name!r} is not part of a llama model with {shape.layers} blocks")
        if info.shape != expected[name]:
            source = sources.get(name.split(".")[-2], "")
            raise _error(
                header,
                f"tensor {name!r} has ggml shape {list(info.shape)}; {LLAMA}.embedding_length={shape.hidden}"
                f"{f', {source}' if source else ''} give {list(expected[name])}",
            )
    missing = [name for name in expected if name not in header.tensors and name not in OPTIONAL]
    if missing:
        raise _error(header, f"the file lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _is(field: KeyValue, kind: str) -> bool:
    if kind == STRING:
        return field.type is GGUFValueType.STRING
    if kind == BOOL:
        return field.type is GGUFValueType.BOOL
    if kind == FLOAT:
        return field.type in _FLOATS
    if kind == TOKEN_ID:
        return field.type is GGUFValueType.UINT32
    return field.type in _INTEGERS and field.value >= 0


def _bad_type(header: GGUFHeader, key: str, field: KeyValue, kind: str) -> ModelFormatError:
    shown = field.value if field.type is not GGUFValueType.ARRAY else f"[{len(field.value)} values]"
    if isinstance(shown, str) and len(shown) > 40:
        shown = shown[:40] + "..."
    return _error(header, f"{key}={shown!r} is {field.describe()}; the GGUF spec has {_EXPECTED[kind]}")


def _error(header: GGUFHeader, message: str) -> ModelFormatError:
    return ModelFormatError(f"{str(header.path)!r}: {message}")
