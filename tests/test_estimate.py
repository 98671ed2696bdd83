"""The memory estimator: exact layouts and the seed table."""

from __future__ import annotations

import pytest

import quantkit
from quantkit.estimate import estimate, parse_params


@pytest.mark.parametrize(
    ("config", "bits"),
    [
        (quantkit.BnbConfig(quant_type="nf4"), 4.5),
        (quantkit.BnbConfig(quant_type="nf4", use_double_quant=True), 4 + 8 / 64 + 32 / (64 * 256)),
        (quantkit.GPTQConfig(bits=4, group_size=128), 4 + (16 + 4) / 128 + 32 / 4096),
        (quantkit.AWQConfig(bits=4, group_size=128), 4 + (16 + 4) / 128),
        (quantkit.BnbConfig(load_in_4bit=False, load_in_8bit=True), 8 + 32 / 4096),
    ],
)
def test_bits_per_param_from_layouts(config, bits):
    assert estimate("7B", config).bits_per_param == pytest.approx(bits, abs=2e-3)


@pytest.mark.parametrize(("size", "fp16_gb"), [("7B", 14.0), ("13B", 26.0), ("70B", 140.0)])
def test_seed_table(size, fp16_gb):
    assert estimate(size, None, dtype="float32").total_bytes / 1e9 == pytest.approx(2 * fp16_gb)
    assert estimate(size, None, dtype="float16").total_bytes / 1e9 == pytest.approx(fp16_gb)
    nf4 = estimate(size, quantkit.BnbConfig()).total_bytes / 1e9
    assert nf4 == pytest.approx(fp16_gb / 4 * 4.5 / 4, rel=1e-3)  # not the rounded fp16/4


def test_parse_params():
    assert parse_params("7B") == 7_000_000_000
    assert parse_params("135m") == 135_000_000
    assert parse_params("1.5e9") == 1_500_000_000
    with pytest.raises(quantkit.ConfigValueError, match="params"):
        parse_params("seven")


def test_model_config_counts_real_shapes(tiny_llama):
    raw = tiny_llama.config.to_dict()
    float_estimate = estimate(config=None, model_config=raw, dtype="float32")
    assert float_estimate.params == sum(p.numel() for p in tiny_llama.parameters())
    assert float_estimate.total_bytes == float_estimate.params * 4
    rtn = estimate(config=quantkit.RTNConfig(bits=4, group_size=32), model_config=raw)
    linears = sum(m.weight.numel() for n, m in tiny_llama.named_modules()
                  if isinstance(m, __import__("torch").nn.Linear) and n != "lm_head")
    assert rtn.quantized_params == linears


@pytest.mark.parametrize(("config", "bits"), [
    (quantkit.BnbConfig(), 4.0), (quantkit.BnbConfig(load_in_4bit=False, load_in_8bit=True), 8.0),
    (quantkit.GPTQConfig(bits=3), 3.0), (quantkit.AWQConfig(), 4.0), (quantkit.HQQConfig(nbits=2), 2.0),
    (quantkit.RTNConfig(bits=8), 8.0), (quantkit.GGUFConfig(quant_type="Q5_K_M"), 5.0),
    (quantkit.GGUFConfig(quant_type="BF16"), 16.0),
])
def test_code_bits_is_the_width_a_method_is_named_for(config, bits):
    assert config.code_bits == bits


def test_code_bits_follow_ggufs_row_fallbacks(tiny_llama):
    from quantkit.core.registry import get_registry

    gguf = get_registry().backends_for_method("gguf")[0]
    q2k = quantkit.GGUFConfig(quant_type="Q2_K")
    assert gguf.code_bits(q2k, "", 64, 512) == 2.0  # 256-weight super-blocks divide the row
    assert gguf.code_bits(q2k, "", 64, 576) == 4.0  # SmolLM2's rows: llama.cpp stores Q4_0
    raw = {**tiny_llama.config.to_dict(), "hidden_size": 576, "intermediate_size": 1536}
    mixed = estimate(config=q2k, model_config=raw)
    assert 2.0 < mixed.code_bits < 4.0
    assert estimate(config=quantkit.BnbConfig(), model_config=raw).code_bits == 4.0


@pytest.mark.parametrize(
    "config",
    [quantkit.GGUFConfig(quant_type="Q8_0"), quantkit.GGUFConfig(quant_type="Q4_K_M"), quantkit.BnbConfig(),
     quantkit.GGUFConfig(quant_type="Q8_0", modules_to_not_convert=["lm_head", "model.embed_tokens"])],
    ids=["q8_0", "q4_k_m", "nf4", "q8_0-float-embedding"],
)
def test_total_size_is_what_the_saved_tensors_hold(tiny_llama, tmp_path, config):
    """Everything counts: GGUF also packs the token embedding (tied to the head), others keep it in float."""
    from safetensors import safe_open

    predicted = estimate(config=config, model_config=tiny_llama.config.to_dict(), dtype="float32").total_bytes
    quantkit.save(quantkit.quantize(tiny_llama, config, device="cpu"), tmp_path / "q")
    saved = 0
    for file in (tmp_path / "q").glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            saved += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert predicted == pytest.approx(saved, rel=0.01)
