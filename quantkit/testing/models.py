"""A tiny random Llama and token ids: inputs small enough for unit tests, shaped like the real thing."""

from __future__ import annotations

import torch
from torch import nn

OUTLIER_CHANNELS = (1, 10, 33)
"""Hidden channels the norms of :func:`tiny_llama` amplify (``outliers=True``)."""


def tiny_llama(
    seed: int = 0,
    *,
    hidden: int = 128,
    intermediate: int = 256,
    layers: int = 2,
    vocab: int = 256,
    outliers: bool = True,
) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` (4 heads, 2 KV heads, tied embeddings), in eval mode.

    The defaults divide every common group size up to 128 (and ``intermediate`` holds one
    256-wide GGUF super-block). ``outliers`` scales :data:`OUTLIER_CHANNELS` of every norm
    by 20, like the activation outliers of trained models, so that activation-aware methods
    (AWQ, GPTQ's act-order) have real work to do.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    if outliers:
        channels = [c for c in OUTLIER_CHANNELS if c < hidden]
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[channels] = 20.0
    return model


def token_ids(nsamples: int, seqlen: int, *, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """Random token ids of shape ``(nsamples, seqlen)``, the same for the same arguments."""
    return torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))
