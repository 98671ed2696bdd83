"""The template Backend (quantkit.core.backend): declared shape limits checked by one generic
validator, the per-layer hooks, the config block, adapter merging as declared, saved modes."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

import quantkit
from quantkit import finetune as ft
from quantkit.builtin_backends.awq.backend import AWQ_SHAPE_LIMITS
from quantkit.core import backend as backend_module
from quantkit.core.atomic import atomic_path
from quantkit.core.backend import Backend
from quantkit.core.capabilities import ALL_HARDWARE, Capabilities, ShapeLimit, ShapeLimitError, check_shape_limits
from quantkit.core.config import QuantConfig, spec
from quantkit.core.errors import ConfigTypeError, ConfigValueError, QuantizationError, QuantkitError
from quantkit.core.linears import Target, quantizable_linears
from quantkit.core.registry import get_registry

# -- a calibration-free backend written on the template ----------------------------------


@dataclass
class HalfConfig(QuantConfig):
    quant_method: ClassVar[str] = "template-half"

    dtype: str = spec("float16", choices=("float16", "bfloat16"))


class HalfLinear(nn.Module):
    """A linear whose weight is stored in half precision."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype))


class HalfBackend(Backend):
    """quantize_linear, empty_module and storage_bits: everything else is the template's."""

    name = "template-half"
    config_class = HalfConfig
    capabilities = Capabilities(
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=True,
        shape_limits=(ShapeLimit("in_features", 64, "whole tiles of 64"),),
    )

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, torch.device]] = []

    def quantize_linear(self, name, linear, config, device):
        self.calls.append((name, config.dtype, device))
        module = HalfLinear(linear.in_features, linear.out_features, getattr(torch, config.dtype))
        module.weight.copy_(linear.weight.detach())
        return module

    def empty_module(self, name, linear, config):
        return HalfLinear(linear.in_features, linear.out_features, getattr(torch, config.dtype))

    def storage_bits(self, config, name, out_features, in_features):
        return out_features * in_features * 16


@pytest.fixture
def half() -> HalfBackend:
    backend = HalfBackend()
    get_registry().register_backend(backend)
    return backend


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12).view(1, 12)).logits


def test_template_quantizes_each_target_with_its_effective_config(half, monkeypatch):
    walks = []
    monkeypatch.setattr(backend_module, "quantizable_linears", lambda *a: walks.append(a) or quantizable_linears(*a))
    config = HalfConfig(module_overrides={"*.down_proj": {"dtype": "bfloat16"}})
    model = quantkit.quantize(make_tiny_llama(), config, device="cpu")
    assert len(walks) == 1, "the template walks the model's linears once per quantization"
    expected = [name for name, _, _ in quantizable_linears(make_tiny_llama(), config)]
    assert [name for name, _, _ in half.calls] == expected
    assert {name: dtype for name, dtype, _ in half.calls if "down_proj" in name} == dict.fromkeys(
        ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"], "bfloat16"
    )
    assert {device for _, _, device in half.calls} == {torch.device("cpu")}
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    assert type(model.lm_head) is nn.Linear  # skipped (and tied to the embedding)


def test_template_saves_and_loads_through_empty_module(half, tmp_path):
    model = quantkit.quantize(make_tiny_llama(), HalfConfig(), device="cpu")
    quantkit.save(model, tmp_path / "m")
    loaded = quantkit.load(tmp_path / "m", device="cpu")
    assert type(loaded.model.layers[0].self_attn.q_proj) is HalfLinear
    assert torch.equal(_logits(loaded), _logits(model))


def test_config_of_another_method_is_refused_generically(half):
    model = make_tiny_llama()
    with pytest.raises(ConfigTypeError, match="HalfBackend.config=.*expected HalfConfig"):
        half.quantize(model, quantkit.RTNConfig(), calibration=None, device=torch.device("cpu"))
    with pytest.raises(ConfigTypeError, match="HalfConfig"):
        half.prepare_for_loading(model, quantkit.RTNConfig())
    assert not half.calls


def test_a_declared_limit_refuses_before_any_layer_is_quantized(half):
    model = make_tiny_llama(intermediate=96)  # down_proj reads 96 inputs: not whole tiles of 64
    with pytest.raises(QuantizationError) as info:
        quantkit.quantize(model, HalfConfig(), device="cpu")
    assert not half.calls and type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    message = str(info.value)
    assert message.startswith("HalfConfig does not fit 2 layer(s): in_features must be a multiple of 64 (whole tiles")
    assert "model.layers.0.mlp.down_proj (in_features=96, 96 % 64 = 32)" in message
    assert "add those layers to modules_to_not_convert" in message
    quantkit.quantize(model, HalfConfig(modules_to_not_convert=["lm_head", "down_proj"]), device="cpu")


def test_quantization_config_block_hook_writes_config_json(half, tmp_path):
    class Annotating(HalfBackend):
        name = "template-half-annotating"
        config_class = type("AnnotatedConfig", (HalfConfig,), {"quant_method": "template-annotated"})

        def quantization_config_block(self, model, config):
            return {**super().quantization_config_block(model, config), "tiles": 64}

    get_registry().register_backend(Annotating())
    config = Annotating.config_class()
    quantkit.save(quantkit.quantize(make_tiny_llama(), config, device="cpu"), tmp_path / "m")
    block = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert block == {**config.to_dict(), "tiles": 64}


def test_bitsandbytes_block_is_written_once_with_skips_and_exact_config(tmp_path):
    pytest.importorskip("bitsandbytes")
    config = quantkit.BnbConfig(modules_to_not_convert=["lm_head", "*.o_proj"])
    model = quantkit.quantize(make_tiny_llama(), config, device="cpu")
    block = get_registry().backends["bitsandbytes"].quantization_config_block(model, config)
    assert block["quant_method"] == "bitsandbytes" and block["quantkit_config"] == config.to_dict()
    skipped = ["lm_head", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert block["llm_int8_skip_modules"] == skipped
    quantkit.save(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"] == block


# -- the generic validator on the built-in backends' declarations --------------------------


def _refusal(backend: str, config: QuantConfig, model: nn.Module) -> ShapeLimitError:
    with pytest.raises(ShapeLimitError) as info:
        get_registry().backends[backend].quantize(model, config, calibration=None, device=torch.device("cpu"))
    assert all(type(m) is nn.Linear for _, m, _ in quantizable_linears(model, config)), "a layer was replaced"
    return info.value


@pytest.mark.parametrize(
    ("backend", "config", "shape", "field", "expected"),
    [
        (
            "gptq",
            quantkit.GPTQConfig(bits=3, group_size=8),
            dict(hidden=72, intermediate=136),
            "bits",
            [
                "GPTQConfig bits=3 does not fit 14 layer(s): in_features * bits must be a multiple of 32",
                "model.layers.0.self_attn.q_proj (in_features=72, 72 * 3 = 216, 216 % 32 = 24)",
                "Every layer fits bits=8: use it,",
            ],
        ),
        (
            "gptq",
            quantkit.GPTQConfig(bits=3, group_size=32),
            dict(hidden=96, intermediate=128),
            "bits",
            [
                "out_features * bits must be a multiple of 32 (the GPTQ format packs each group's zero points",
                "model.layers.0.self_attn.k_proj (out_features=48, 48 * 3 = 144, 144 % 32 = 16)",
            ],
        ),
        (
            "rtn",
            quantkit.RTNConfig(bits=3),
            dict(hidden=72, intermediate=136),
            "bits",
            [
                "RTNConfig bits=3 does not fit",
                "in_features * bits must be a multiple of 32",
            ],
        ),
        (
            "awq",
            quantkit.AWQConfig(group_size=64),
            dict(hidden=96),
            "group_size",
            [
                "AWQConfig group_size=64 does not fit 12 layer(s): in_features must be a multiple of group_size",
                "model.layers.0.self_attn.q_proj (in_features=96, 96 % 64 = 32); ",
                "; and 9 more.",
                "Every layer fits group_size=32: use it,",
            ],
        ),
        (
            "awq",
            quantkit.AWQConfig(group_size=32, modules_to_not_convert=["lm_head", "down_proj"]),
            dict(intermediate=132),
            "version",
            [
                "AWQConfig version='gemm' does not fit 4 layer(s): out_features must be a multiple of 8 "
                "(the GEMM layout",
                "model.layers.0.mlp.gate_proj (out_features=132, 132 % 8 = 4)",
                "Change the config or add",
            ],
        ),
        (
            "hqq",
            quantkit.HQQConfig(group_size=60),
            {},
            "group_size",
            [
                "HQQConfig group_size=60 does not fit 14 layer(s): group_size must be a multiple of 8 "
                "(hqq's requirement)",
            ],
        ),
        (
            "hqq",
            quantkit.HQQConfig(group_size=48),
            {},
            "group_size",
            [
                "out_features * in_features must be a multiple of group_size",
                "model.layers.0.self_attn.q_proj (out_features=64, in_features=64, 64 * 64 = 4096, 4096 % 48 = 16)",
            ],
        ),
        (
            "hqq",
            quantkit.HQQConfig(nbits=4, group_size=2048),
            {},
            "group_size",
            [
                "HQQConfig group_size=2048, nbits=4, axis=1 does not fit",
                "out_features * in_features must be a multiple of group_size * 2 (hqq packs 2 4-bit groups per byte)",
            ],
        ),
        ("hqq", quantkit.HQQConfig(nbits=2, group_size=2048), {}, "group_size", ["hqq packs 4 2-bit groups per byte"]),
        ("hqq", quantkit.HQQConfig(nbits=1, group_size=1024), {}, "group_size", ["hqq packs 8 1-bit groups per byte"]),
    ],
    ids=[
        "gptq-in",
        "gptq-out",
        "rtn-in",
        "awq-group",
        "awq-gemm",
        "hqq-multiple-of-8",
        "hqq-groups",
        "hqq-4bit-packing",
        "hqq-2bit-packing",
        "hqq-1bit-packing",
    ],
)
def test_each_declared_limit_is_refused_with_a_clear_message(backend, config, shape, field, expected):
    if not get_registry().backends[backend].is_available():
        pytest.skip(f"{backend} is unavailable here")
    error = _refusal(backend, config, make_tiny_llama(**shape))
    assert isinstance(error, QuantizationError) and isinstance(error, ConfigValueError)
    assert (error.config, error.field, error.value) == (type(config).__name__, field, getattr(config, field))
    for text in expected:
        assert text in str(error), (text, str(error))


def test_gemv_limit_and_axis_0_packing():
    linear = nn.Linear(36, 16)
    gemv = [Target("odd", linear, quantkit.AWQConfig(group_size=32, version="gemv"))]
    with pytest.raises(ShapeLimitError, match=r"version='gemv' .*in_features must be a multiple of 8 .*odd \(in_"):
        check_shape_limits(gemv, [AWQ_SHAPE_LIMITS[2]])
    check_shape_limits([gemv[0]._replace(config=quantkit.AWQConfig(group_size=32))], [AWQ_SHAPE_LIMITS[2]])
    hqq = get_registry().backends["hqq"].capabilities.shape_limits
    # axis 0 packs the group_size rows (a multiple of 8), not the groups: 1 bit with 4 groups is fine
    axis_0 = quantkit.HQQConfig(nbits=1, group_size=1024, axis=0)
    check_shape_limits(quantizable_linears(make_tiny_llama(), axis_0), hqq)


def test_shape_limits_are_plain_data():
    limit = ShapeLimit(("out_features", "in_features"), ("group_size", 2), "packing", when={"nbits": 4})
    assert limit.of == ("out_features", "in_features") and ShapeLimit("in_features", 8, "").by == (8,)
    assert str(limit) == "out_features * in_features must be a multiple of group_size * 2 when nbits=4"
    assert limit.factor_fields == ("group_size",) and {limit}  # hashable, like the Capabilities holding it
    described = get_registry().backends["gptq"].describe()["shape_limits"]
    assert described == ["in_features * bits must be a multiple of 32", "out_features * bits must be a multiple of 32"]
    assert get_registry().backends["bitsandbytes"].capabilities.shape_limits == ()


# -- adapters: merging and PEFT's own layers as declared ------------------------------------


def test_declarations_of_the_builtin_backends():
    builtin = get_registry().builtin_backends().values()
    declared = {b.name: (b.capabilities.merges_adapters, b.capabilities.peft_native) for b in builtin}
    assert declared == {
        "bitsandbytes": (False, True),
        "hqq": (True, True),
        "gptq": (False, False),
        "awq": (False, False),
        "rtn": (False, False),
        "gguf": (False, False),
        "eetq": (False, False),
        "aqlm": (False, False),
    }


def test_merge_is_refused_naming_a_backend_that_does_not_declare_it(half):
    for model in (
        quantkit.quantize(make_tiny_llama(), quantkit.RTNConfig(group_size=32), device="cpu"),
        quantkit.quantize(make_tiny_llama(), HalfConfig(), device="cpu"),
        quantkit.quantize(make_tiny_llama(), quantkit.BnbConfig(), device="cpu"),
    ):
        adapted = ft.attach_lora(model, {"r": 4})
        name = model.quantkit_backend
        with pytest.raises(QuantkitError, match=f"backend '{name}' declares merges_adapters=False"):
            ft.merge_adapter(adapted)
        assert any(".lora_" in n for n, _ in adapted.named_parameters())


def test_merge_proceeds_for_a_backend_that_declares_it():
    hqq = pytest.importorskip("hqq.core.quantize")
    model = quantkit.quantize(make_tiny_llama(), quantkit.HQQConfig(), device="cpu")
    merged = ft.merge_adapter(ft.attach_lora(model, {"r": 4}))
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    assert isinstance(merged.model.layers[0].mlp.up_proj, hqq.HQQLinear)


def test_lora_layers_follow_the_peft_native_declaration(half):
    class NativeHalf(HalfBackend):
        name = "template-half-native"
        config_class = type("NativeConfig", (HalfConfig,), {"quant_method": "template-native"})
        capabilities = dataclasses.replace(HalfBackend.capabilities, peft_native=True)

    get_registry().register_backend(NativeHalf())
    config = ft.lora_config({"r": 4})
    ours = quantkit.quantize(make_tiny_llama(), HalfConfig(), device="cpu")
    assert set(ft.with_quantized_layers(config, ours)._custom_modules) == {HalfLinear}
    native = quantkit.quantize(make_tiny_llama(), NativeHalf.config_class(), device="cpu")
    assert not ft.with_quantized_layers(config, native)._custom_modules


# -- saved files get the modes the umask gives ------------------------------------------------


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def _modes(path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [path, *path.rglob("*")]}


def test_saved_model_folder_and_files_follow_the_umask(umask_027, tmp_path):
    model = quantkit.quantize(make_tiny_llama(), quantkit.RTNConfig(group_size=32), device="cpu")
    folder = quantkit.save(model, tmp_path / "m")
    assert _modes(folder) == {
        "m": 0o750,
        "config.json": 0o640,
        "generation_config.json": 0o640,
        "model.safetensors": 0o640,
    }
    quantkit.save(model, folder)  # replacing an existing folder
    assert _modes(folder)["model.safetensors"] == 0o640
    adapter = ft.save_adapter(ft.attach_lora(model, {"r": 4}), tmp_path / "adapter")
    assert set(_modes(adapter).values()) == {0o750, 0o640} and _modes(adapter)["adapter"] == 0o750
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left"


def test_single_file_follows_the_umask(umask_027, tmp_path):
    with atomic_path(tmp_path / "x.bin", directory=False) as tmp:
        tmp.write_bytes(b"x")
        os.chmod(tmp, 0o600)
    assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == 0o640
    os.umask(0o022)
    with atomic_path(tmp_path / "folder", directory=True) as tmp:
        (tmp / "sub").mkdir(0o700)
        (tmp / "sub" / "f").write_bytes(b"")
    assert _modes(tmp_path / "folder") == {"folder": 0o755, "sub": 0o755, "f": 0o644}
