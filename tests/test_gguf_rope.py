"""Llama 3 rotary scaling in GGUF files: the ``rope_freqs`` divisors llama.cpp's converter writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from test_gguf_export import tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import quantkit
from quantkit.builtin_backends.gguf.rope import ROPE_FREQS, rope_freq_factors
from quantkit.testing.synthetic_checkpoints import preset_config


@pytest.mark.parametrize("preset", ["Llama-3.2-1B", "Llama-3.1-8B"])
def test_freq_factors_divide_the_default_frequencies_into_transformers_llama3_ones(preset: str) -> None:
    config = LlamaConfig(**preset_config(preset))
    factors = rope_freq_factors(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    dim, theta = config.head_dim, config.rope_parameters["rope_theta"]
    default = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    assert factors.dtype == torch.float32 and factors.shape == (dim // 2,)
    assert factors[0] == 1 and factors[-1] == config.rope_parameters["factor"]  # high frequencies kept, low divided
    torch.testing.assert_close(default / factors, scaled, rtol=2e-7, atol=0)


def test_default_rope_has_no_factors() -> None:
    raw = preset_config("tiny-llama")
    raw.pop("rope_scaling", None)
    assert rope_freq_factors(LlamaConfig(**raw)) is None


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # tiny: the 32 frequencies fall in all three bands
}


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    """A tiny bfloat16 Llama with a llama3 rope, saved with a tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        rope_parameters=LLAMA3_ROPE,
    )
    folder = tmp_path_factory.mktemp("llama3")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_a_llama3_rope_is_written_read_and_streamed(llama3_folder, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(llama3_folder), dtype="auto")
    factors = rope_freq_factors(model.config)
    assert {1.0, 8.0} < set(factors.tolist())  # kept, divided and interpolated frequencies
    quantized = quantkit.quantize(model, {"quant_method": "gguf", "quant_type": "Q8_0"})
    path = quantkit.save(quantized, tmp_path / "memory.gguf", tokenizer=tiny_tokenizer())
    reader = GGUFReader(path)
    assert reader.tensors[0].name == ROPE_FREQS  # first, as llama.cpp's converter writes it
    assert np.array_equal(np.asarray(reader.tensors[0].data), factors.numpy())
    loaded = quantkit.load(path)
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = quantized.float()(ids).logits  # float32, as quantkit.load computes
        error = (loaded(ids).logits - reference).abs().max()
        default = quantkit.load(path)
        rotary = default.model.rotary_emb
        rotary.inv_freq = rotary.inv_freq * factors  # the default rope: what a reader ignoring rope_freqs runs
        assert error * 10 < (default(ids).logits - reference).abs().max()
    resaved = quantkit.save(loaded, tmp_path / "resaved.gguf", tokenizer=tiny_tokenizer())
    assert np.array_equal(np.asarray(GGUFReader(resaved).tensors[0].data), factors.numpy())  # the file's own
    streamed = quantkit.quantize_streaming(
        llama3_folder, {"quant_method": "gguf", "quant_type": "Q8_0"}, tmp_path / "s.gguf"
    )
    assert streamed.read_bytes() == path.read_bytes()
