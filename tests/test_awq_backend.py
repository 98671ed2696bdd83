"""The AWQ backend on a tiny random Llama: scaling, clipping, format, checkpoints, edge cases."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file

import quantkit
from quantkit import AWQConfig, RTNConfig
from quantkit.builtin_backends.awq.qlinear import AWQLinear
from quantkit.core.errors import QuantizationError
from quantkit.testing import conformance_tests, tiny_llama

LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _tokens(nsamples: int = 8, seqlen: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_tokens(2, 48, seed=1)).logits


def _relative_error(model: torch.nn.Module, reference: torch.Tensor) -> float:
    return ((_logits(model) - reference).norm() / reference.norm()).item()


test_contract = conformance_tests(
    "awq",
    [
        AWQConfig(group_size=64, zero_point=False),
        AWQConfig(group_size=32, version="gemv"),
        AWQConfig(group_size=64, version="gemv"),
    ],
    checks=("reload_is_exact", "storage_bits_match_saved_bytes"),
)
"""The checks of quantkit.testing run here on the configs tests/test_conformance.py leaves out
(it runs every check on groups of 32, GEMM)."""


@pytest.mark.parametrize(
    "config",
    [
        AWQConfig(group_size=32),
        AWQConfig(group_size=64, zero_point=False),
        AWQConfig(group_size=32, version="gemv"),
    ],
    ids=["g32", "g64-sym", "g32-gemv"],
)
def test_awq_configs_quantize_and_save(config: AWQConfig, tmp_path) -> None:
    model = make_tiny_llama()
    reference = _logits(model)
    quantized = quantkit.quantize(model, config, calibration=_tokens())
    for name in LINEARS:
        module = quantized.model.layers[1].get_submodule(name)
        assert isinstance(module, AWQLinear) and module.version == config.version
        assert module.qweight.dtype == module.qzeros.dtype == torch.int32 and module.scales.dtype == torch.float16
        if config.version == "gemm":
            groups = module.in_features // config.group_size
            assert module.qweight.shape == (module.in_features, module.out_features // 8)
            assert module.qzeros.shape == (groups, module.out_features // 8)
            assert module.scales.shape == (groups, module.out_features)
    assert _relative_error(quantized, reference) < 0.15

    quantkit.save(quantized, tmp_path / "q")
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert block == config.to_hf_dict()


def test_awq_beats_rtn_with_activation_outliers() -> None:
    model = tiny_llama(hidden=64, intermediate=128)  # norms amplify a few channels, as AWQ expects
    reference = _logits(model)
    awq = quantkit.quantize(copy.deepcopy(model), AWQConfig(group_size=32), calibration=_tokens(16, 64))
    rtn = quantkit.quantize(copy.deepcopy(model), RTNConfig(bits=4, group_size=32))
    assert _relative_error(awq, reference) < _relative_error(rtn, reference)


def test_scales_are_folded_into_the_norms() -> None:
    model = tiny_llama(hidden=64, intermediate=128)
    before = model.model.layers[0].input_layernorm.weight.detach().clone()
    quantized = quantkit.quantize(model, AWQConfig(group_size=32), calibration=_tokens())
    after = quantized.model.layers[0].input_layernorm.weight
    assert not torch.equal(before, after)
    assert after[[1, 10, 33]].abs().mean() < before[[1, 10, 33]].abs().mean()  # outlier channels scaled down


def test_o_proj_is_scaled_only_without_grouped_query_attention() -> None:
    """v_proj's rows absorb o_proj's scales when their shapes match (4 KV heads of 4), not with GQA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    mha = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
        )
    ).eval()
    for model, changed in ((mha, True), (make_tiny_llama(layers=1), False)):
        v_before = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
        config = AWQConfig(group_size=32, modules_to_not_convert=["lm_head", "v_proj"])  # keep v_proj float
        quantized = quantkit.quantize(model, config, calibration=_tokens())
        # q/k/v are not scaled (v is skipped), so v_proj's weight changes only through o_proj's scales.
        assert (not torch.equal(quantized.model.layers[0].self_attn.v_proj.weight, v_before)) == changed


def test_group_size_not_dividing_in_features_is_a_clear_error() -> None:
    model = make_tiny_llama(hidden=96)
    with pytest.raises(
        QuantizationError,
        match=r"group_size=64 .*in_features must be a multiple of group_size"
        r".*q_proj \(in_features=96, 96 % 64 = 32\).*group_size=32",
    ):
        quantkit.quantize(model, AWQConfig(group_size=64), calibration=_tokens())


def test_config_block_is_what_transformers_reads(tmp_path) -> None:
    from transformers import AwqConfig

    model = quantkit.quantize(make_tiny_llama(), AWQConfig(group_size=64), calibration=_tokens())
    quantkit.save(model, tmp_path / "q")
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    hf = AwqConfig.from_dict(block)
    assert (hf.bits, hf.group_size, hf.zero_point, hf.format) == (4, 64, True, "gemm")
    assert hf.modules_to_not_convert == ["lm_head"]
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    prefix = "model.layers.0.self_attn.o_proj."
    assert {k.removeprefix(prefix) for k in tensors if k.startswith(prefix)} == {"qweight", "qzeros", "scales"}


def test_dead_input_channels_stay_finite() -> None:
    model = make_tiny_llama()
    model.model.layers[0].post_attention_layernorm.weight.data[:8] = 0
    quantized = quantkit.quantize(model, AWQConfig(group_size=32), calibration=_tokens())
    for module in quantized.modules():
        if isinstance(module, AWQLinear):
            assert torch.isfinite(module.dequantize()).all()
    assert torch.isfinite(_logits(quantized)).all()
