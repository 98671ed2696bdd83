"""Saving and loading in the core: errors for what is not a quantized model or folder.

The backend contract (exact reloads, atomic saves, damaged weights refused, tied heads) is
quantkit.testing's conformance suite, run over every backend by tests/test_conformance.py."""

from __future__ import annotations

import pytest
import torch

import quantkit


@pytest.fixture
def quantized(tiny_llama, example_site, on_path):
    """The tiny Llama quantized by the example plugin (installed)."""
    on_path(example_site)
    return quantkit.quantize(tiny_llama, {"quant_method": "absmax-int8"}, device="cpu")


def test_damaged_config_raises_model_format_error(quantized, tmp_path):
    path = quantkit.save(quantized, tmp_path / "model")
    (path / "config.json").write_text("{not json")
    with pytest.raises(quantkit.ModelFormatError, match="not valid JSON"):
        quantkit.load(path)
    with pytest.raises(quantkit.ModelFormatError, match="does not exist"):
        quantkit.load(tmp_path / "nowhere")


def test_float_model_folder_is_not_a_quantized_model(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "float")
    with pytest.raises(quantkit.ModelFormatError, match="no quantization_config"):
        quantkit.load(tmp_path / "float")


def test_saving_an_unquantized_model_is_refused(tiny_llama, tmp_path):
    with pytest.raises(quantkit.QuantkitError, match="not quantized by quantkit"):
        quantkit.save(tiny_llama, tmp_path / "x")


def test_modules_to_not_convert_and_tied_head_stay_float(quantized):
    from quantkit_example_int8.plugin import AbsmaxInt8Linear

    assert type(quantized.lm_head) is torch.nn.Linear
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, AbsmaxInt8Linear)
