"""compressed-tensors output (``pack-quantized``) and exact conversions between GPTQ, AWQ and it.

transformers loads what quantkit writes through its compressed-tensors integration, on the CPU, to the
same logits as quantkit; the packed tensors equal what compressed-tensors' own compressor writes.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file, save_file

import quantkit
from quantkit import GPTQConfig
from quantkit.builtin_backends.awq.qlinear import AWQLinear
from quantkit.builtin_backends.gptq.qlinear import GPTQLinear
from quantkit.cli.main import main
from quantkit.core.dispatch import set_kernel
from quantkit.core.errors import ConfigValueError, ModelFormatError
from quantkit.core.serialization import quant_config_of
from quantkit.formats import compressed_tensors
from quantkit.formats.convert import convert
from quantkit.formats.grid import GridWeight, LossyConversionError

pytest.importorskip("compressed_tensors")

TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _gptq(**fields) -> torch.nn.Module:
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    return quantkit.quantize(make_tiny_llama(), GPTQConfig(**fields), calibration=calibration)


def _rtn(**fields) -> torch.nn.Module:
    return quantkit.quantize(make_tiny_llama(), {"quant_method": "rtn", "bits": 4, "group_size": 32, **fields})


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _quantkit_logits(model: torch.nn.Module) -> torch.Tensor:
    set_kernel(model, "dequantize")  # the float32 weights transformers' loader builds
    return _logits(model)


def _transformers(folder, dequantize: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(folder, **extra)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.dequantize() for name, m in model.named_modules() if isinstance(m, (GPTQLinear, AWQLinear))}


@pytest.mark.parametrize(
    "fields",
    [
        {"bits": 4, "group_size": 32, "sym": True},
        {"bits": 8, "group_size": -1, "sym": True},
        {"bits": 3, "group_size": -1, "sym": False},
    ],
    ids=["sym-g32", "sym-8bit-channel", "asym-3bit-channel"],  # asymmetric 4-bit g32/g64: AWQ and round-trip tests
)
def test_gptq_to_compressed_tensors_loads_in_transformers_with_quantkit_logits(tmp_path, fields):
    model = _gptq(**fields)
    quantkit.save(model, tmp_path / "ct", format="compressed-tensors")
    block = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    (group,) = block["config_groups"].values()
    assert block["quant_method"] == "compressed-tensors" and block["format"] == "pack-quantized"
    assert group["targets"] == ["Linear"] and block["ignore"] == ["lm_head"]
    assert group["weights"]["symmetric"] == fields["sym"] and group["weights"]["num_bits"] == fields["bits"]
    assert group["weights"]["strategy"] == ("channel" if fields["group_size"] == -1 else "group")
    expected = _quantkit_logits(model)
    # Asymmetric schemes load through the dequantizing path only: see the xfail below.
    assert torch.equal(_logits(_transformers(tmp_path / "ct", dequantize=not fields["sym"])), expected)
    back = quantkit.load(tmp_path / "ct", kernel="dequantize")
    assert torch.equal(_logits(back), expected)
    assert quant_config_of(back).sym == fields["sym"]


@pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason="compressed-tensors 0.20 builds the empty module's weight_zero_point unpacked (out, groups) while its "
    "compressor writes it packed (out * bits / 32, groups): transformers refuses the size mismatch "
    "(vllm-project/llm-compressor#1618); CompressedTensorsConfig(dequantize=True) loads it",
)
def test_transformers_default_load_of_asymmetric_pack_quantized(tmp_path):
    quantkit.save(_rtn(sym=False), tmp_path / "ct", format="compressed-tensors")
    _transformers(tmp_path / "ct")


def test_layout_equals_compressed_tensors_own_compressor():
    """A 3-bit asymmetric layer of SmolLM2's down_proj size: the tensors compressed-tensors writes itself."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    out_features, in_features, bits, size = 576, 1536, 3, 64
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=generator, dtype=torch.int32)
    zeros = torch.randint(0, 2**bits, (in_features // size, out_features), generator=generator, dtype=torch.int32)
    scales = torch.rand(in_features // size, out_features, generator=generator) + 0.01
    weight = GridWeight(codes, zeros, scales, torch.arange(in_features) // size, bits, None)
    ours = compressed_tensors.layer_tensors(weight, torch.float32)
    args = QuantizationArgs(num_bits=bits, symmetric=False, strategy="group", group_size=size)
    theirs = PackedQuantizationCompressor.compress(
        {
            "weight": weight.dequantize(),
            "weight_scale": scales.t().contiguous(),
            "weight_zero_point": (zeros.t() - 2 ** (bits - 1)).to(torch.int8),
        },
        QuantizationScheme(targets=["Linear"], weights=args),
    )
    for key in ("weight_packed", "weight_zero_point", "weight_scale", "weight_shape"):
        assert torch.equal(ours[key], theirs[key]), key


def test_gptq_round_trip_through_compressed_tensors_is_bit_identical(tmp_path):
    """Group 64: the 64-input layers hold one group, written as group 64 like the others (one scheme)."""
    model = _gptq(bits=4, group_size=64, sym=False)
    quantkit.save(model, tmp_path / "gptq")
    convert(tmp_path / "gptq", tmp_path / "ct", to="compressed-tensors")
    block = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["group_size"] for g in block["config_groups"].values()] == [64]
    convert(tmp_path / "ct", tmp_path / "back", to="gptq")
    original, back = (load_file(tmp_path / name / "model.safetensors") for name in ("gptq", "back"))
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) and original[k].dtype == back[k].dtype for k in original)


def test_awq_to_compressed_tensors_is_exact(tmp_path):
    quantkit.save(_rtn(sym=False), tmp_path / "awq", format="awq")  # RTN's asymmetric 4-bit g32 grid is AWQ's
    awq = quantkit.load(tmp_path / "awq")
    assert quant_config_of(awq).quant_method == "awq"
    assert any(isinstance(m, AWQLinear) for m in awq.modules())
    quantkit.save(awq, tmp_path / "ct", format="compressed-tensors")
    back = quantkit.load(tmp_path / "ct")
    before, after = _weights(awq), _weights(back)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_logits(_transformers(tmp_path / "ct", dequantize=True)), _quantkit_logits(awq))


def test_lossy_conversions_are_refused_with_the_reason_unless_allowed(tmp_path):
    act_order = _gptq(bits=4, group_size=32, desc_act=True)
    with pytest.raises(LossyConversionError, match=r"act-order groups .* actorder='group'.*allow_lossy=True"):
        quantkit.save(act_order, tmp_path / "ct", format="compressed-tensors")
    eight_bit = _rtn(bits=8)
    with pytest.raises(LossyConversionError, match="AWQ stores 4-bit codes, not 8-bit"):
        quantkit.save(eight_bit, tmp_path / "awq", format="awq")
    assert not (tmp_path / "ct").exists() and not (tmp_path / "awq").exists()

    quantkit.save(act_order, tmp_path / "ct", format="compressed-tensors", allow_lossy=True)
    requantized = quantkit.load(tmp_path / "ct")
    changes = [(a - b).abs().max().item() for a, b in zip(_weights(act_order).values(), _weights(requantized).values())]
    error = max(changes)
    assert 0 < error < 0.05
    quantkit.save(eight_bit, tmp_path / "awq", format="awq", allow_lossy=True)
    assert quant_config_of(quantkit.load(tmp_path / "awq")).bits == 4


def test_zero_point_zero_cannot_be_read_into_gptq(tmp_path):
    """compressed-tensors stores zero point 0, GPTQ v1 (``zero - 1``) cannot: refused, never shifted."""
    quantkit.save(_rtn(sym=False), tmp_path / "ct", format="compressed-tensors")
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight_zero_point"
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, tmp_path / "ct" / "model.safetensors")
    with pytest.raises(ModelFormatError, match=r"up_proj: converting to gptq is not exact: zero point 0"):
        quantkit.load(tmp_path / "ct")


def test_unsupported_compressed_tensors_blocks_are_refused_naming_the_field(tmp_path):
    quantkit.save(_rtn(sym=True), tmp_path / "ct", format="compressed-tensors")
    config_path = tmp_path / "ct" / "config.json"
    config = json.loads(config_path.read_text())
    block = config["quantization_config"]
    for edit, message in (
        ({"format": "int-quantized"}, "quantization_config.format='int-quantized' is invalid; allowed: 'pack-"),
        ({"ignore": ["re:("]}, r"quantization_config.ignore='re:\(' is invalid"),
    ):
        config_path.write_text(json.dumps({**config, "quantization_config": {**block, **edit}}))
        with pytest.raises(ModelFormatError, match=message):
            quantkit.load(tmp_path / "ct")


def test_convert_command_and_bad_format_names(tmp_path, capsys):
    quantkit.save(_rtn(sym=True), tmp_path / "rtn")
    assert main(["convert", str(tmp_path / "rtn"), str(tmp_path / "ct"), "--to", "compressed-tensors"]) == 0
    assert "saved" in capsys.readouterr().err
    converted, original = (quantkit.load(tmp_path / name) for name in ("ct", "rtn"))
    assert torch.equal(_quantkit_logits(converted), _quantkit_logits(original))

    assert main(["convert", str(tmp_path / "rtn"), str(tmp_path / "x"), "--to", "exl2"]) == 2
    err = capsys.readouterr().err
    assert "convert.to='exl2' is invalid; allowed: 'gptq', 'awq', 'compressed-tensors'" in err
    with pytest.raises(ConfigValueError, match="save.format='marlin' is invalid; allowed: 'gptq', 'awq', 'compr"):
        quantkit.save(quantkit.load(tmp_path / "rtn"), tmp_path / "y", format="marlin")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
