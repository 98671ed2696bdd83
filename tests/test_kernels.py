"""Declared kernels: each equals the dequantize reference to rounding, selection, forcing, state dicts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import quantkit
from quantkit import RTNConfig
from quantkit.builtin_backends.awq.qlinear import AWQLinear
from quantkit.builtin_backends.eetq.kernels import GEMV_ROWS
from quantkit.builtin_backends.eetq.qlinear import EetqLinear
from quantkit.builtin_backends.gptq.packing import pack_gptq
from quantkit.builtin_backends.gptq.qlinear import GPTQLinear
from quantkit.core.dispatch import chosen_kernels, set_kernel
from quantkit.core.errors import UnknownNameError
from quantkit.core.hardware import Hardware
from quantkit.core.kernels import DEQUANTIZE, Kernel, KernelUnavailableError, check
from quantkit.core.registry import get_registry

BFLOAT16_UNIT = 2**-8
"""The relative rounding of a bfloat16 value: what the int4/int8 kernels' bfloat16 activations cost."""


def gptq_layer(out_features: int, in_features: int, group_size: int, *, act_order: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    groups = -(-in_features // group_size)
    g_idx = torch.arange(in_features) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    packed = pack_gptq(
        torch.randint(0, 16, (out_features, in_features), generator=gen),
        torch.randint(1, 16, (groups, out_features), generator=gen),
        torch.rand(groups, out_features, generator=gen) * 0.02 + 0.002,
        g_idx,
        4,
    )
    return GPTQLinear.from_packed(packed, 4, torch.randn(out_features, generator=gen))


def awq_layer(out_features: int, in_features: int, group_size: int, version: str = "gemm", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    return AWQLinear.pack(
        torch.randint(0, 16, (out_features, in_features), generator=gen),
        torch.randint(0, 16, (groups, out_features), generator=gen),
        torch.rand(groups, out_features, generator=gen) * 0.02 + 0.002,
        None,
        version,
    )


LAYERS = {
    "gptq": lambda out, inp, g: gptq_layer(out, inp, g),
    "gptq-act-order": lambda out, inp, g: gptq_layer(out, inp, g, act_order=True),
    "awq-gemm": lambda out, inp, g: awq_layer(out, inp, g),
    "awq-gemv": lambda out, inp, g: awq_layer(out, inp, g, "gemv"),
}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).norm() / expected.norm()).item()


def exact(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output in float32 on the dequantized weight (the reference kernel's, in float32)."""
    return F.linear(x.float(), module.dequantize(), None if module.bias is None else module.bias.float())


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(64, 256), (96, 384)])
@pytest.mark.parametrize("rows", [1, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_cpu_equals_the_reference_to_bfloat16_rounding(kind, group_size, shape, rows, dtype):
    module = LAYERS[kind](*shape, group_size)
    x = torch.randn(2, rows, shape[1]).to(dtype)
    got = module(x)
    assert module.kernel_name == "int4-cpu" and got.dtype == dtype and got.shape == (2, rows, shape[0])
    expected = exact(module, x)
    set_kernel(module, "dequantize")
    reference = module(x)
    assert module.kernel_name == "dequantize"
    assert relative_error(reference, expected) < (BFLOAT16_UNIT if dtype == torch.bfloat16 else 1e-6)
    assert relative_error(got, expected) < 2 * BFLOAT16_UNIT  # bfloat16 activations, scales and output


@pytest.mark.parametrize("rows", [1, GEMV_ROWS + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_cpu_equals_the_reference_to_bfloat16_rounding(rows, dtype):
    torch.manual_seed(0)
    module = EetqLinear.from_linear(nn.Linear(192, 128), torch.device("cpu"))
    x = torch.randn(rows, 192).to(dtype)
    got = module(x)
    assert module.kernel_name == "int8-cpu" and got.dtype == dtype
    assert relative_error(got, exact(module, x)) < 2 * BFLOAT16_UNIT


def test_ragged_groups_are_refused_with_the_reason_and_run_the_reference():
    """SmolLM2's hidden 576 in groups of 128: the last group holds 64 inputs."""
    module = gptq_layer(64, 576, 128)
    kernel = next(k for k in get_registry().kernels_for(module) if k.name == "int4-cpu")
    availability = check(kernel, module, "cpu", torch.float32)
    assert not availability
    assert "in_features must be a multiple of group_size" in availability.reason
    assert "576 % 128 = 64" in availability.reason and "ragged" in availability.reason
    x = torch.randn(3, 576)
    assert relative_error(module(x), F.linear(x, module.dequantize(), module.bias)) < 1e-6
    assert module.kernel_name == "dequantize"
    with pytest.raises(
        KernelUnavailableError,
        match=r"'int4-cpu' cannot serve GPTQLinear on cpu: in_features.*576 % 128 = 64.*can: dequantize$",
    ):
        set_kernel(module, "int4-cpu")


def test_the_validator_names_each_reason():
    kernel = next(k for k in get_registry().kernels_for(gptq_layer(64, 256, 64)) if k.name == "int4-cpu")
    codes, ones, g_idx = torch.zeros(64, 256, dtype=torch.long), torch.ones(4, 64), torch.arange(256) // 64
    eight_bit = GPTQLinear.from_packed(pack_gptq(codes, ones, ones, g_idx, 8), 8, None)
    cases = {
        "8-bit": (eight_bit, "cpu", None),
        "groups of 32, 64, 128 or 256 inputs, not 16": (gptq_layer(64, 256, 16), "cpu", None),
        "out_features must be a multiple of 16": (gptq_layer(40, 256, 64), "cpu", None),
        "runs on cpu, not cuda": (gptq_layer(64, 256, 64), "cuda", None),
        "float32, bfloat16 or float16 activations, not float64": (gptq_layer(64, 256, 64), "cpu", torch.float64),
        "serves GPTQLinear, not AWQLinear": (awq_layer(64, 256, 64), "cpu", None),
    }
    for reason, (module, device, dtype) in cases.items():
        availability = check(kernel, module, device, dtype)
        assert not availability and reason in availability.reason
    uneven = gptq_layer(64, 256, 64)
    uneven.g_idx[128] = 1  # group 1 gets 65 inputs, group 2 63
    assert "g_idx does not split the inputs into groups of 64" in check(kernel, uneven, "cpu", None).reason
    needs_eetq = next(k for k in get_registry().kernels if k.name == "eetq")
    assert not check(needs_eetq, EetqLinear(64, 64, bias=False), "cpu", None)


def test_selection_takes_the_highest_priority_valid_kernel_and_forcing_checks_it():
    module = gptq_layer(64, 256, 64)
    registry = get_registry()
    assert [k.name for k in registry.kernels_for(module)] == ["int4-cpu", "dequantize"]
    calls = []
    faster = Kernel(
        name="faster",
        layers=(GPTQLinear,),
        devices=frozenset({Hardware.CPU}),
        prepare=lambda m: calls.append("prepare") or m.dequantize(),
        matmul=lambda m, state, x: F.linear(x, state.to(x.dtype)),
        priority=100,
    )
    slower = Kernel("slower", (GPTQLinear,), frozenset({Hardware.CPU}), faster.prepare, faster.matmul, priority=-1)
    registry.register_kernel(faster)
    registry.register_kernel(slower)
    x = torch.randn(4, 256)
    module(x)
    module(x)
    assert module.kernel_name == "faster" and calls == ["prepare"]  # chosen and prepared once
    set_kernel(module, "SLOWER")  # case ignored
    module(x)
    assert module.kernel_name == "slower"
    with pytest.raises(UnknownNameError, match=r"kernel='int5' is unknown.*registered kernels: dequantize"):
        set_kernel(module, "int5")
    with pytest.raises(
        KernelUnavailableError,
        match=r"'int8-cpu' cannot serve 0 \(GPTQLinear\) on cpu: it serves EetqLinear, not GPTQLinear",
    ):
        set_kernel(nn.Sequential(module), "int8-cpu")
    with pytest.raises(quantkit.QuantkitError, match=r"'faster' for GPTQLinear is registered twice"):
        registry.register_kernel(faster)


def test_state_dict_is_unchanged_by_a_prepared_kernel():
    module = gptq_layer(64, 256, 64, act_order=True)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module(torch.randn(2, 256))
    assert module.kernel_name == "int4-cpu"
    after = module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert set(dict(module.named_buffers())) == {"qweight", "qzeros", "scales", "g_idx", "bias"}


def test_moving_or_loading_a_module_prepares_again():
    module = gptq_layer(64, 256, 64)
    x = torch.randn(2, 256)
    module(x)
    module.to(torch.float32)
    assert module.kernel_name is None
    other = gptq_layer(64, 256, 64, seed=1)
    module(x)
    module.load_state_dict(other.state_dict())
    assert module.kernel_name is None and torch.equal(module(x), other(x))


def test_the_input_gradient_goes_through_the_dequantized_weight():
    module = gptq_layer(64, 256, 64)
    x = torch.randn(3, 256, requires_grad=True)
    upstream = torch.randn(3, 64)
    (module(x) * upstream).sum().backward()
    assert module.kernel_name == "int4-cpu"
    assert torch.allclose(x.grad, upstream @ module.dequantize(), rtol=1e-5, atol=1e-5)


def test_saved_model_loads_with_the_fastest_or_a_forced_kernel(tiny_llama, tmp_path):
    model = quantkit.quantize(tiny_llama, RTNConfig(bits=4, group_size=32), device="cpu")
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        logits = model(ids).logits
    assert set(chosen_kernels(model).values()) == {"int4-cpu"}
    folder = quantkit.save(model, tmp_path / "model")
    loaded = quantkit.load(folder, device="cpu")
    reference = quantkit.load(folder, device="cpu", kernel="dequantize")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
        assert relative_error(reference(ids).logits, logits) < 2 * BFLOAT16_UNIT
    assert set(chosen_kernels(reference).values()) == {"dequantize"}
    with pytest.raises(KernelUnavailableError, match=r"'int8-cpu' cannot serve model\.layers\.0\.self_attn\.q_proj"):
        quantkit.load(folder, device="cpu", kernel="int8-cpu")


def test_a_plugin_registers_kernels_through_the_hook():
    registry = get_registry()
    owners = {k.label: registry._by("kernel", k.label) for k in registry.kernels if k is not DEQUANTIZE}
    assert owners == {
        "int4-cpu (GPTQLinear)": "quantkit's own plugin 'gptq'",
        "int4-cpu (AWQLinear)": "quantkit's own plugin 'awq'",
        "int8-cpu (EetqLinear)": "quantkit's own plugin 'eetq'",
        "eetq (EetqLinear)": "quantkit's own plugin 'eetq'",
    }
