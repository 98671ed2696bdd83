"""Llama 3 rotary scaling in GGUF files: the ``rope_freqs`` divisors llama.cpp's converter writes."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from quantkit.builtin_backends.gguf.rope import rope_freq_factors
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
