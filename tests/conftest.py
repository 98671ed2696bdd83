"""Shared fixtures: a tiny random Llama for fast tests, the embedded SmolLM2 for slow ones."""

from __future__ import annotations

import os

os.environ.setdefault("QUANTKIT_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, intermediate: int = 128, vocab: int = 256):
    """A randomly initialised LlamaForCausalLM small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Every test sees the installed plugins only, never another test's additions."""
    from quantkit.core.registry import reset_registry

    reset_registry()
    yield
    reset_registry()
