"""Streamed runs hand freed heap memory back to the OS after each module (glibc's malloc_trim)."""

from __future__ import annotations

import platform
import time

import pytest
import torch
from gguf import GGUFReader
from transformers import LlamaConfig, LlamaForCausalLM

import quantkit
from quantkit import streaming
from quantkit.builtin_backends.gguf import stream_export
from quantkit.core import heap
from quantkit.core.streamed_checkpoints import StreamedCheckpoint
from quantkit.testing import tiny_llama


@pytest.fixture
def counted(monkeypatch) -> list[None]:
    """Each call of release_heap by the streaming loops (the .gguf writer's too)."""
    calls: list[None] = []
    monkeypatch.setattr(streaming, "release_heap", lambda: calls.append(None))
    monkeypatch.setattr(stream_export, "release_heap", lambda: calls.append(None))
    return calls


def test_release_heap_is_cheap_and_a_no_op_off_glibc(monkeypatch):
    if platform.libc_ver()[0] == "glibc":
        assert heap._malloc_trim() is not None
    start = time.perf_counter()
    for _ in range(20):
        heap.release_heap()
    assert (time.perf_counter() - start) / 20 < 0.01  # measured 25 us a call
    heap._malloc_trim.cache_clear()
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    try:
        assert heap._malloc_trim() is None and heap.release_heap() is False
    finally:
        heap._malloc_trim.cache_clear()


def test_each_streamed_module_is_followed_by_a_release(counted, tmp_path):
    tiny_llama(0, hidden=128, intermediate=256, layers=2, outliers=False).save_pretrained(tmp_path / "float")
    rtn = {"quant_method": "rtn", "bits": 4, "group_size": 32}
    out = quantkit.quantize_streaming(tmp_path / "float", rtn, tmp_path / "out")
    with StreamedCheckpoint(tmp_path / "float") as checkpoint:
        assert out.is_dir() and len(counted) == len(checkpoint.modules())


def test_each_gguf_module_is_followed_by_a_release(counted, tmp_path):
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "float")
    gguf = {"quant_method": "gguf", "quant_type": "Q8_0"}
    path = quantkit.quantize_streaming(tmp_path / "float", gguf, tmp_path / "m.gguf")
    modules = {tensor.name.rpartition(".")[0] for tensor in GGUFReader(path).tensors}
    assert len(counted) == len(modules)  # blk.0.attn_q, ..., output_norm, rope_freqs, token_embd
