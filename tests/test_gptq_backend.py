"""The GPTQ and RTN backends on a tiny random Llama: configs, format, checkpoints, edge cases."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file

import quantkit
from quantkit import GPTQConfig, RTNConfig
from quantkit.builtin_backends.gptq.gptq import gptq_quantize, rtn_quantize
from quantkit.builtin_backends.gptq.packing import unpack_gptq
from quantkit.builtin_backends.gptq.qlinear import GPTQLinear
from quantkit.core.errors import ConfigValueError, QuantizationError
from quantkit.layerwise import HessianAccumulator
from quantkit.testing import conformance_tests

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


def _ids() -> torch.Tensor:
    return _tokens(2, 48, seed=1)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


def _relative_error(model: torch.nn.Module, reference: torch.Tensor) -> float:
    return ((_logits(model) - reference).norm() / reference.norm()).item()


GPTQ_CONFIGS = [
    GPTQConfig(bits=4, group_size=32),
    GPTQConfig(bits=3, group_size=-1, sym=False),
    GPTQConfig(bits=2, group_size=32, desc_act=True),
    GPTQConfig(bits=8, group_size=64, desc_act=True, static_groups=True),
    GPTQConfig(bits=4, group_size=32, true_sequential=False, damp_percent=0.1),
    GPTQConfig(bits=4, group_size=32, sym=False, mse=2.4, static_groups=True),
    GPTQConfig(bits=4, group_size=32, act_group_aware=False, damp_auto_increment=0.0),
]
CONTRACT = ("reload_is_exact", "storage_bits_match_saved_bytes")
"""The checks of quantkit.testing run here on the configs tests/test_conformance.py leaves out
(it runs every check on GPTQ 4-bit groups of 32, with and without act-order, and RTN 4-bit)."""
test_gptq_contract = conformance_tests(
    "gptq", [*GPTQ_CONFIGS[1:], GPTQConfig(bits=3, group_size=64), GPTQConfig(bits=4, group_size=-1)], checks=CONTRACT
)
test_rtn_contract = conformance_tests(
    "rtn", [RTNConfig(bits=4, group_size=32, sym=True), RTNConfig(bits=2, group_size=32)], checks=CONTRACT
)


@pytest.mark.parametrize(
    "config",
    GPTQ_CONFIGS,
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.to_diff_dict().items() if k != "quant_method"),
)
def test_gptq_configs_quantize_and_save(config: GPTQConfig, tmp_path) -> None:
    model = make_tiny_llama()
    reference = _logits(model)
    quantized = quantkit.quantize(model, config, calibration=_tokens())
    layer = quantized.model.layers[0]
    for name in LINEARS:
        module = layer.get_submodule(name)
        assert isinstance(module, GPTQLinear) and module.bits == config.bits
        groups = 1 if config.group_size == -1 else -(-module.in_features // config.group_size)
        assert module.qweight.shape == (module.in_features * config.bits // 32, module.out_features)
        assert module.qzeros.shape == (groups, module.out_features * config.bits // 32)
        assert module.scales.shape == (groups, module.out_features) and module.scales.dtype == torch.float16
        assert module.g_idx.dtype == torch.int32 and int(module.g_idx.max()) == groups - 1
        if config.desc_act and not config.static_groups and groups > 1:
            assert not torch.equal(module.g_idx, module.g_idx.sort().values)  # act-order permutes groups
        elif not config.desc_act:  # GAR reorders the columns of each group: the groups stay contiguous
            assert torch.equal(module.g_idx, torch.arange(module.in_features, dtype=torch.int32) // groups_of(config))
    error = _relative_error(quantized, reference)
    assert error < {2: 0.8, 3: 0.3, 4: 0.15, 8: 0.01}[config.bits]

    quantkit.save(quantized, tmp_path / "q")
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert block == config.to_hf_dict()


def groups_of(config: GPTQConfig) -> int:
    return 10**9 if config.group_size == -1 else config.group_size


def test_gptq_config_reads_and_writes_gptqmodel_meta_keys() -> None:
    from transformers import GPTQConfig as HFGPTQConfig

    gptqmodel_block = {  # as GPTQModel 7.6 writes it: these settings only under "meta"
        "bits": 4,
        "group_size": 64,
        "desc_act": False,
        "sym": True,
        "quant_method": "gptq",
        "format": "gptq",
        "checkpoint_format": "gptq",
        "meta": {"act_group_aware": False, "damp_percent": 0.1, "damp_auto_increment": 0.02, "mse": 2.4},
    }
    config = GPTQConfig.from_hf_dict(gptqmodel_block)
    assert (config.act_group_aware, config.damp_percent, config.damp_auto_increment, config.mse) == (
        False,
        0.1,
        0.02,
        2.4,
    )
    assert GPTQConfig(desc_act=True, act_group_aware=True).act_group_aware is False  # GPTQModel refuses both
    block = GPTQConfig(desc_act=True, mse=2.0).to_hf_dict()
    assert block["meta"]["act_group_aware"] is False
    assert (block["meta"]["mse"], block["damp_percent"]) == (2.0, block["meta"]["damp_percent"])
    assert HFGPTQConfig.from_dict(block).to_dict()["meta"]["mse"] == 2.0
    assert GPTQConfig.from_hf_dict(GPTQConfig(act_group_aware=False, mse=2.0).to_hf_dict()) == GPTQConfig(
        act_group_aware=False, mse=2.0
    )


@pytest.mark.parametrize(
    ("field", "value"), [("damp_auto_increment", 1.0), ("damp_auto_increment", -0.1), ("mse", -1.0)]
)
def test_gptq_config_rejects_bad_new_fields(field: str, value: float) -> None:
    with pytest.raises(ConfigValueError, match=rf"GPTQConfig\.{field}=.*allowed"):
        GPTQConfig(**{field: value})


def test_gptq_beats_rtn_on_the_tiny_model() -> None:
    model = make_tiny_llama()
    reference = _logits(model)
    gptq = quantkit.quantize(copy.deepcopy(model), GPTQConfig(bits=3, group_size=32), calibration=_tokens(16, 64))
    rtn = quantkit.quantize(copy.deepcopy(model), RTNConfig(bits=3, group_size=32, sym=True))
    assert _relative_error(gptq, reference) < _relative_error(rtn, reference)


def test_linears_sharing_an_input_get_what_gptq_gives_each_alone() -> None:
    """q/k/v are quantized stacked against one Hessian: the same as one by one."""
    model = make_tiny_llama()
    tokens = _tokens()
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        inputs = model.model.layers[0].input_layernorm(model.model.embed_tokens(tokens))
    hessian = HessianAccumulator(64)
    hessian.add_batch(inputs)
    expected = {
        name: gptq_quantize(attention.get_submodule(name).weight.detach(), hessian.H, bits=4, group_size=32, mse=2.4)
        for name in ("q_proj", "k_proj", "v_proj")
    }
    quantized = quantkit.quantize(model, GPTQConfig(bits=4, group_size=32), calibration=tokens)
    for name, result in expected.items():
        module = quantized.model.layers[0].self_attn.get_submodule(name)
        intweight, zeros = unpack_gptq(module.qweight, module.qzeros, 4)
        assert torch.equal(intweight, result.intweight) and torch.equal(zeros, result.zeros), name
        assert torch.equal(module.scales, result.scales)


def test_true_sequential_calibrates_later_groups_on_quantized_inputs() -> None:
    model = make_tiny_llama()
    sequential = quantkit.quantize(copy.deepcopy(model), GPTQConfig(group_size=32), calibration=_tokens())
    at_once = quantkit.quantize(
        copy.deepcopy(model), GPTQConfig(group_size=32, true_sequential=False), calibration=_tokens()
    )
    layer_s, layer_o = sequential.model.layers[0], at_once.model.layers[0]
    for name in LINEARS:
        same = torch.equal(layer_s.get_submodule(name).qweight, layer_o.get_submodule(name).qweight)
        # q/k/v see the float layer input either way; everything after them sees quantized inputs.
        assert same == (name in LINEARS[:3]), name


def test_checkpoint_uses_gptq_tensor_names_and_transformers_config(tmp_path) -> None:
    from transformers import GPTQConfig as HFGPTQConfig

    config = GPTQConfig(bits=4, group_size=32, desc_act=True, sym=False)
    model = quantkit.quantize(make_tiny_llama(), config, calibration=_tokens())
    quantkit.save(model, tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    prefix = "model.layers.1.mlp.down_proj."
    assert {k.removeprefix(prefix) for k in tensors if k.startswith(prefix)} == {"qweight", "qzeros", "scales", "g_idx"}
    assert tensors[prefix + "qweight"].dtype == torch.int32 and tensors[prefix + "g_idx"].dtype == torch.int32
    assert "model.layers.1.mlp.down_proj.weight" not in tensors
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    hf = HFGPTQConfig.from_dict(block)
    assert (hf.bits, hf.group_size, hf.desc_act, hf.sym, hf.format) == (4, 32, True, False, "gptq")
    assert hf.to_dict()["checkpoint_format"] == "gptq"


def test_ragged_last_group_is_stored_with_ceil_groups(tmp_path) -> None:
    model = make_tiny_llama(hidden=96)  # 96 = 64 + a last group of 32
    reference = _logits(model)
    quantized = quantkit.quantize(model, GPTQConfig(bits=4, group_size=64), calibration=_tokens())
    q_proj = quantized.model.layers[0].self_attn.q_proj
    assert q_proj.scales.shape == (2, 96) and q_proj.g_idx.tolist() == [0] * 64 + [1] * 32
    assert _relative_error(quantized, reference) < 0.15
    quantkit.save(quantized, tmp_path / "q")
    assert torch.equal(_logits(quantkit.load(tmp_path / "q")), _logits(quantized))


def test_dead_input_channels_get_zero_weights_not_nan() -> None:
    model = make_tiny_llama()
    model.model.layers[0].input_layernorm.weight.data[[3, 17]] = 0  # q/k/v never see channels 3 and 17
    quantized = quantkit.quantize(model, GPTQConfig(bits=4, group_size=32), calibration=_tokens())
    q_proj = quantized.model.layers[0].self_attn.q_proj
    weight = q_proj.dequantize()
    assert torch.isfinite(weight).all()
    assert weight[:, [3, 17]].abs().max() == 0
    assert torch.isfinite(_logits(quantized)).all()


def test_rank_deficient_hessian_gets_more_dampening(caplog: pytest.LogCaptureFixture) -> None:
    """Inputs spanning far fewer directions than channels (every token the same) still quantize."""
    model = make_tiny_llama()
    tokens = torch.full((4, 64), 7)
    with caplog.at_level("WARNING"):
        quantized = quantkit.quantize(model, GPTQConfig(bits=4, group_size=32, damp_percent=1e-9), calibration=tokens)
    for module in quantized.modules():
        if isinstance(module, GPTQLinear):
            assert torch.isfinite(module.dequantize()).all()
    assert torch.isfinite(_logits(quantized)).all()
    assert any("damp" in record.getMessage() for record in caplog.records)


def test_non_packable_widths_are_refused() -> None:
    model = make_tiny_llama(hidden=72, intermediate=136)  # 72 * 3 bits is not a whole number of words
    with pytest.raises(QuantizationError, match=r"in_features \* bits must be a multiple of 32.*in_features=72"):
        quantkit.quantize(model, GPTQConfig(bits=3, group_size=8), calibration=_tokens())


def test_rtn_matches_round_to_nearest(tmp_path) -> None:
    model = make_tiny_llama()
    weight = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    config = RTNConfig(bits=4, group_size=32, sym=False)
    quantized = quantkit.quantize(model, config)
    module = quantized.model.layers[1].mlp.up_proj
    expected = rtn_quantize(weight, bits=4, group_size=32, sym=False)
    intweight, zeros = unpack_gptq(module.qweight, module.qzeros, 4)
    assert torch.equal(intweight, expected.intweight) and torch.equal(zeros, expected.zeros)
    assert torch.equal(module.dequantize(), expected.dequantized)

    quantkit.save(quantized, tmp_path / "q")
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert block == config.to_dict()  # quantkit's own block: transformers has no "rtn"


def test_module_overrides_and_skips_apply_per_linear_and_reload(tmp_path) -> None:
    config = GPTQConfig(
        bits=4,
        group_size=32,
        modules_to_not_convert=["lm_head", "model.layers.0.mlp"],
        module_overrides={"*.down_proj": {"bits": 8}},
    )
    quantized = quantkit.quantize(make_tiny_llama(), config, calibration=_tokens())
    assert type(quantized.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert quantized.model.layers[1].mlp.down_proj.bits == 8
    assert quantized.model.layers[1].mlp.up_proj.bits == 4
    quantkit.save(quantized, tmp_path / "q")
    reloaded = quantkit.load(tmp_path / "q")
    assert reloaded.quantkit_config.module_overrides == config.module_overrides
    assert torch.equal(_logits(reloaded), _logits(quantized))
