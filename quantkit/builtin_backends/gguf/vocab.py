"""A transformers tokenizer as GGUF ``tokenizer.*`` metadata (byte-level BPE, llama.cpp's ``gpt2`` model).

Tokens and their types follow llama.cpp's converter: ids the tokenizer lacks become
``[PAD<id>]`` (unused), added special tokens are control tokens, other added tokens
user-defined. Merges, special token ids and the chat template come from gguf-py's
``SpecialVocab`` reading the tokenizer as saved by ``save_pretrained``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from typing import Any

from gguf import GGUFWriter, SpecialVocab, TokenType

from quantkit.core.errors import QuantkitError

log = logging.getLogger("quantkit")


def add_tokenizer(writer: GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """Write ``tokenizer`` (a transformers fast tokenizer) into ``writer``'s metadata."""
    spec = _backend_spec(tokenizer)
    tokens, types = _tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="quantkit-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        special = SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_special_token["bos"] = bool(getattr(tokenizer, "add_bos_token", False))
    special.add_special_token["eos"] = bool(getattr(tokenizer, "add_eos_token", False))
    special.add_to_gguf(writer, quiet=True)


def _backend_spec(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise QuantkitError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; GGUF export needs one")
    spec = json.loads(backend.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise QuantkitError(
            f"GGUF export writes byte-level BPE tokenizers (llama.cpp's 'gpt2' model); this one is "
            f"{model.get('type')} with decoder {decoder.get('type')}"
        )
    return spec


def _tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise QuantkitError(f"the tokenizer has {len(by_id)} tokens, more than the model's vocab_size={vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(TokenType.NORMAL)
    return tokens, types


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a tokenizers pre-tokenizer spec."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (llama-vocab.cpp), with the hyphen
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # GPT-2's split, digits one by one (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        pattern = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == pattern:
                return name
    log.warning("GGUF export: pre-tokenizer %s has no llama.cpp name; writing 'default'", kinds)
    return "default"
