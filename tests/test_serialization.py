"""Saving and loading: atomic writes, exact reloads, clear errors on damaged files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import quantkit
from quantkit.core.registry import get_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "quantkit-example-plugin"))
from quantkit_example_int8.config import AbsmaxInt8Config  # noqa: E402
from quantkit_example_int8.plugin import AbsmaxInt8Backend  # noqa: E402

TOKENS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def quantized(tiny_llama):
    get_registry().register_backend(AbsmaxInt8Backend())
    return quantkit.quantize(tiny_llama, AbsmaxInt8Config(), device="cpu")


def test_save_load_identical_logits(quantized, tmp_path):
    path = quantkit.save(quantized, tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "absmax-int8"
    reloaded = quantkit.load(path, device="cpu")
    assert torch.equal(reloaded(TOKENS).logits, quantized(TOKENS).logits)
    assert reloaded.quantkit_config == quantized.quantkit_config
    assert not list(tmp_path.glob(".*tmp")), "temporary folders must not be left behind"


def test_tied_weights_are_stored_once_and_retied(quantized, tmp_path):
    from safetensors import safe_open

    path = quantkit.save(quantized, tmp_path / "model")
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    reloaded = quantkit.load(path, device="cpu")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_interrupted_save_keeps_the_old_model(quantized, tmp_path, monkeypatch):
    path = quantkit.save(quantized, tmp_path / "model")
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("quantkit.core.serialization.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        quantkit.save(quantized, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_weights_raise_model_format_error(quantized, tmp_path, damage):
    path = quantkit.save(quantized, tmp_path / "model")
    weights = path / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x00\x01" * 64)
    else:
        weights.unlink()
    with pytest.raises(quantkit.ModelFormatError, match="model.safetensors"):
        quantkit.load(path, device="cpu")


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


def test_model_without_linears_and_non_finite_weights(tiny_llama):
    get_registry().register_backend(AbsmaxInt8Backend())
    with pytest.raises(quantkit.QuantizationError, match="no nn.Linear"):
        quantkit.quantize(torch.nn.Sequential(torch.nn.ReLU()), AbsmaxInt8Config(), device="cpu")
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(quantkit.QuantizationError, match="up_proj.weight holds 1 NaN/Inf"):
        quantkit.quantize(tiny_llama, AbsmaxInt8Config(), device="cpu")


def test_modules_to_not_convert_and_tied_head_stay_float(quantized):
    from quantkit_example_int8.plugin import AbsmaxInt8Linear

    assert type(quantized.lm_head) is torch.nn.Linear
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, AbsmaxInt8Linear)
