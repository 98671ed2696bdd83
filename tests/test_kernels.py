"""Declared kernels: each equals the dequantize reference to rounding, selection, forcing, state dicts."""

from __future__ import annotations

import copy
import gc
import shutil
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import quantkit
from quantkit import GGUFConfig, HQQConfig, RTNConfig
from quantkit.builtin_backends.awq.qlinear import AWQLinear
from quantkit.builtin_backends.eetq.kernels import GEMV_ROWS
from quantkit.builtin_backends.eetq.qlinear import EetqLinear
from quantkit.builtin_backends.gguf import kernels as gguf_kernels
from quantkit.builtin_backends.gguf.qlinear import GGUFLinear
from quantkit.builtin_backends.gptq.packing import pack_gptq
from quantkit.builtin_backends.gptq.qlinear import GPTQLinear
from quantkit.builtin_backends.hqq import kernels as hqq_kernels
from quantkit.builtin_backends.hqq.layers import quantize_linear as hqq_linear
from quantkit.core import inductor_kernels, torch_kernels
from quantkit.core.dispatch import chosen_kernels, set_kernel
from quantkit.core.errors import UnknownNameError
from quantkit.core.hardware import Hardware
from quantkit.core.inductor_kernels import GEMV_ROWS as GEMV_INDUCTOR_ROWS
from quantkit.core.kernels import DEQUANTIZE, Kernel, KernelUnavailableError, check
from quantkit.core.registry import get_registry
from quantkit.core.torch_kernels import DENSE_ROWS

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
    return F.linear(x.float(), module.dequantize().float(), None if module.bias is None else module.bias.float())


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(64, 256), (96, 384)])
@pytest.mark.parametrize("rows", [1, 9, DENSE_ROWS // 2])
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


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("rows", [1, 7, DENSE_ROWS])
def test_a_ragged_last_group_runs_int4_cpu_padded_with_zeros(act_order, rows):
    """SmolLM2's hidden 576 in groups of 128: the last group holds 64 inputs, padded to 128."""
    module = gptq_layer(64, 576, 128, act_order=act_order)
    x = torch.randn(rows, 576)
    got = module(x)
    assert module.kernel_name == "int4-cpu"
    assert relative_error(got, exact(module, x)) < 2 * BFLOAT16_UNIT


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
    assert [k.name for k in registry.kernels_for(module)] == ["int4-cpu", "int4-cuda", "gemv-inductor", "dequantize"]
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
    with pytest.raises(UnknownNameError, match=r"kernel='int5' is unknown; registered kernels: .*dequantize"):
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
        "int4-cuda (GPTQLinear)": "quantkit's own plugin 'gptq'",
        "gemv-inductor (GPTQLinear)": "quantkit's own plugin 'gptq'",
        "int4-cpu (AWQLinear)": "quantkit's own plugin 'awq'",
        "int4-cuda (AWQLinear)": "quantkit's own plugin 'awq'",
        "gemv-inductor (AWQLinear)": "quantkit's own plugin 'awq'",
        "int8-cpu (EetqLinear)": "quantkit's own plugin 'eetq'",
        "eetq (EetqLinear)": "quantkit's own plugin 'eetq'",
        "int4-cpu (GGUFLinear)": "quantkit's own plugin 'gguf'",
        "int4-cuda (GGUFLinear)": "quantkit's own plugin 'gguf'",
        "int4x2-cpu (GGUFLinear)": "quantkit's own plugin 'gguf'",
        "gemv-inductor (GGUFLinear)": "quantkit's own plugin 'gguf'",
        "q6k-avx512 (GGUFLinear)": "quantkit's own plugin 'gguf'",
        "dequantize-cached (GGUFLinear)": "quantkit's own plugin 'gguf'",
        "int4-cpu (HQQLayer)": "quantkit's own plugin 'hqq'",
        "int4-cuda (HQQLayer)": "quantkit's own plugin 'hqq'",
        "gemv-inductor (HQQLayer)": "quantkit's own plugin 'hqq'",
        "bitsandbytes (Bnb4bit)": "quantkit's own plugin 'bnb'",
        "bnb-cpu (Bnb4bit)": "quantkit's own plugin 'bnb'",
        "bitsandbytes (Bnb8bit)": "quantkit's own plugin 'bnb'",
        "gemv-inductor (Bnb8bit)": "quantkit's own plugin 'bnb'",
    }


def int4_kernel_of(module: nn.Module) -> Kernel:
    return next(k for k in get_registry().kernels_for(module) if k.name == "int4-cpu")


def regrouped(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``(codes - 8) * scale + offset`` per group, the weight torch's int4 layout encodes."""
    out, groups = codes.shape[0], scales.shape[0]
    grouped = (codes.float() - 8).reshape(out, groups, -1) * scales.t().unsqueeze(-1) + offsets.t().unsqueeze(-1)
    return grouped.reshape(codes.shape)


def gguf_layer(out_features: int, in_features: int, qtype: str, seed: int = 0) -> GGUFLinear:
    torch.manual_seed(seed)
    return GGUFLinear.from_linear(nn.Linear(in_features, out_features), qtype)


@pytest.mark.parametrize("qtype", gguf_kernels.INT4_TYPES)
@pytest.mark.parametrize("rows", [1, 9, DENSE_ROWS // 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_int4_cpu_decodes_the_blocks_exactly_and_equals_the_reference(qtype, rows, dtype):
    """Q4_0, Q4_1, Q4_K: the repacked codes, scales and offsets are the blocks' weight exactly (in
    float32); the kernel differs from dequantize-then-matmul by bfloat16 rounding only. SmolLM2's
    576-wide rows where the type allows them (K-quants take rows of 256)."""
    shape = (192, 1536) if qtype == "Q4_K" else (192, 576)
    module = gguf_layer(*shape, qtype)
    assert check(int4_kernel_of(module), module, "cpu", dtype)
    assert torch.equal(regrouped(*gguf_kernels.int4_operands(module)), module.dequantize())
    x = torch.randn(2, rows, shape[1]).to(dtype)
    got = module(x)
    assert module.kernel_name == "int4-cpu" and got.dtype == dtype and got.shape == (2, rows, shape[0])
    assert relative_error(got, exact(module, x)) < 2 * BFLOAT16_UNIT


@pytest.mark.parametrize("qtype", gguf_kernels.SPLIT_TYPES)
@pytest.mark.parametrize("rows", [1, 9, DENSE_ROWS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_int4x2_cpu_splits_the_blocks_exactly_and_equals_the_reference(qtype, rows, dtype):
    """Q8_0 and the 5-bit types: high nibble x 16 + low nibble is each block's code exactly, the two
    int4 products sum to dequantize-then-matmul up to bfloat16 rounding."""
    shape = (192, 1536) if qtype == "Q5_K" else (192, 576)
    module = gguf_layer(*shape, qtype)
    codes, scales, offsets = gguf_kernels.int4_operands(module)
    assert torch.equal(regrouped(codes + 8, scales, offsets), module.dequantize())
    assert int(codes.min()) >= -128 and int(codes.max()) < 128
    x = torch.randn(2, rows, shape[1]).to(dtype)
    got = module(x)
    assert module.kernel_name == "int4x2-cpu" and got.dtype == dtype and got.shape == (2, rows, shape[0])
    assert relative_error(got, exact(module, x)) < 2 * BFLOAT16_UNIT


def test_gguf_types_without_an_exact_kernel_are_refused_with_the_reason_and_run_the_reference():
    split = next(k for k in get_registry().kernels_for(gguf_layer(64, 256, "Q8_0")) if k.name == "int4x2-cpu")
    gemv = next(k for k in get_registry().kernels_for(gguf_layer(64, 256, "Q8_0")) if k.name == "gemv-inductor")
    for qtype, reason in {
        "Q8_0": "it takes 4-bit codes, not 8-bit",
        "Q5_0": "it takes 4-bit codes, not 5-bit",
        "Q6_K": "it takes 4-bit codes, not 6-bit",
    }.items():
        module = gguf_layer(64, 256, qtype)
        assert reason in check(int4_kernel_of(module), module, "cpu", None).reason
    module = gguf_layer(64, 256, "Q6_K")  # 16-input scales: no int4 group holds them
    assert "it takes Q8_0, Q5_0, Q5_1, Q5_K weights, not Q6_K" in check(split, module, "cpu", None).reason
    module = gguf_layer(64, 256, "IQ4_NL")  # codes through a non-linear table: no kernel but the reference
    assert "it takes Q2_K, Q3_K, Q6_K weights, not IQ4_NL" in check(gemv, module, "cpu", None).reason
    x = torch.randn(3, 256)
    assert torch.equal(module(x), F.linear(x, module.dequantize(), module.bias))
    assert module.kernel_name == "dequantize"
    narrow = gguf_layer(40, 256, "Q4_0")  # torch packs output channels in blocks of 16
    assert "out_features must be a multiple of 16" in check(int4_kernel_of(narrow), narrow, "cpu", None).reason
    with pytest.raises(KernelUnavailableError, match=r"'int4-cpu' cannot serve GGUFLinear on cpu: out_features"):
        set_kernel(narrow, "int4-cpu")


@pytest.mark.parametrize("qtype", gguf_kernels.GEMV_TYPES)
@pytest.mark.parametrize("rows", [1, 3, GEMV_INDUCTOR_ROWS + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_gemv_inductor_decodes_16_input_groups_exactly_and_equals_the_reference(qtype, rows, dtype):
    """Q2_K, Q3_K, Q6_K: codes x scale + offset per 16 inputs is each block's weight exactly; the
    compiled GEMV differs from dequantize-then-matmul by its bfloat16 scales and offsets only."""
    module = gguf_layer(192, 1536, qtype)
    codes, scales, offsets = gguf_kernels.small_group_operands(module)
    weight = codes.float().reshape(192, -1, 16) * scales.t().unsqueeze(-1) + offsets.t().unsqueeze(-1)
    assert torch.equal(weight.reshape(192, 1536), module.dequantize())
    x = torch.randn(rows, 1536).to(dtype)
    got = set_kernel(module, "gemv-inductor")(x)  # Q6_K's own kernel comes first where it runs
    assert module.kernel_name == "gemv-inductor" and got.dtype == dtype and got.shape == (rows, 192)
    assert relative_error(got, exact(module, x)) < 2 * BFLOAT16_UNIT


@pytest.mark.parametrize(
    ("bits", "group_size", "act_order"), [(2, 32, True), (3, 128, False), (8, 64, False), (4, 16, False)]
)
def test_gptq_widths_and_groups_the_int4_kernel_cannot_take_run_gemv_inductor(bits, group_size, act_order):
    """2, 3 and 8 bits, groups of 16, act-order and SmolLM2's ragged 576 = 4.5 x 128 inputs."""
    gen = torch.Generator().manual_seed(0)
    groups = -(-576 // group_size)
    g_idx = torch.arange(576) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(576, generator=gen)]
    packed = pack_gptq(
        torch.randint(0, 2**bits, (192, 576), generator=gen),
        torch.randint(1, 2**bits, (groups, 192), generator=gen),
        torch.rand(groups, 192, generator=gen) * 0.02 + 0.002,
        g_idx,
        bits,
    )
    module = GPTQLinear.from_packed(packed, bits, torch.randn(192, generator=gen))
    x = torch.randn(2, 576)
    got = module(x)
    assert module.kernel_name == "gemv-inductor"
    assert relative_error(got, exact(module, x)) < 2 * BFLOAT16_UNIT


@pytest.mark.parametrize("spans", [False, True])
def test_gemv_inductor_single_sum_for_layers_whose_group_sums_spill_is_the_same_product(monkeypatch, spans):
    """The formulation a vocabulary-sized head takes (each code scaled inside one sum, split into
    runs of at most ``SPAN`` inputs), forced on a small ragged layer with offsets: the same product
    as the two-stage one and as the float64 weight, to float32 rounding."""
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(-8, 8, (40, 600), generator=gen)
    scales, offsets = torch.rand(2, 10, 40, generator=gen) * 0.1 - 0.05
    weight = codes.double() * scales.double().repeat_interleave(64, 0)[:600].t()
    weight += offsets.double().repeat_interleave(64, 0)[:600].t()
    x = torch.randn(3, 600, generator=gen)
    two_stage = inductor_kernels.run_gemv(
        inductor_kernels.grouped_gemv_state(codes, scales, offsets, 64, scale_dtype=torch.float32), x
    )
    monkeypatch.setattr(inductor_kernels, "GROUP_SUMS_BYTES", 0)
    monkeypatch.setattr(inductor_kernels, "_COMPILED", {})
    if spans:
        monkeypatch.setattr(inductor_kernels, "SPAN", 128)
    state = inductor_kernels.grouped_gemv_state(codes, scales, offsets, 64, scale_dtype=torch.float32)
    single_sum = inductor_kernels.run_gemv(state, x)
    expected = x.double() @ weight.t()
    assert relative_error(single_sum, expected) < 1e-6 and relative_error(two_stage, expected) < 1e-6
    torch.testing.assert_close(single_sum, two_stage, rtol=1e-5, atol=1e-5)


def test_gemv_inductor_needs_a_compiler_and_says_so(monkeypatch):
    module = gguf_layer(64, 256, "Q6_K")
    gemv = next(k for k in get_registry().kernels_for(module) if k.name == "gemv-inductor")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert check(gemv, module, "cpu", None).reason == f"missing program {gemv.programs[0]}"
    assert module(torch.randn(1, 256)).shape == (1, 64) and module.kernel_name == "dequantize"


def test_gguf_dequantize_cached_is_forced_only_and_keeps_the_state_dict():
    module = gguf_layer(64, 256, "IQ4_NL")
    x = torch.randn(3, 256)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    reference = module(x)
    assert module.kernel_name == "dequantize"  # never chosen by itself: it costs memory
    set_kernel(module, "dequantize-cached")
    assert torch.equal(module(x), reference) and module.kernel_name == "dequantize-cached"
    assert torch.equal(module._choice.state, module.dequantize())
    after = module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    other = gguf_layer(64, 256, "IQ4_NL", seed=1)
    module.load_bytes(other.weight.data, "IQ4_NL")  # new bytes: the cached weight is dropped
    assert torch.equal(module(x), F.linear(x, other.dequantize(), module.bias))


def test_gguf_model_runs_int4_cpu_and_repacking_leaves_the_saved_file_unchanged(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    model = quantkit.quantize(tiny_llama, GGUFConfig(quant_type="Q4_0"), device="cpu")
    ids = torch.randint(0, 256, (1, 12))
    before = load_file(quantkit.save(model, tmp_path / "before") / "model.safetensors")
    with torch.no_grad():
        logits = model(ids).logits
    assert set(chosen_kernels(model).values()) == {"int4-cpu"}
    after = load_file(quantkit.save(model, tmp_path / "after") / "model.safetensors")
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    loaded = quantkit.load(tmp_path / "after", device="cpu")
    reference = quantkit.load(tmp_path / "after", device="cpu", kernel="dequantize")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
        assert relative_error(reference(ids).logits, logits) < 2 * BFLOAT16_UNIT
    assert set(chosen_kernels(reference).values()) == {"dequantize"}


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [5, DENSE_ROWS])
def test_hqq_4bit_int4_cpu_equals_the_reference_to_bfloat16_rounding(group_size, compute_dtype, rows):
    torch.manual_seed(0)
    config = HQQConfig(nbits=4, group_size=group_size, compute_dtype=compute_dtype, optimize=False)
    module = hqq_linear(nn.Linear(576, 192), config, torch.device("cpu"))  # SmolLM2's 576-wide rows
    dtype = getattr(torch, compute_dtype)
    weight = module.dequantize().float()  # hqq's arithmetic in the compute dtype: q - z, then * s
    rounding = 1e-6 if dtype == torch.float32 else 2 * BFLOAT16_UNIT * weight.abs().max().item()
    assert torch.allclose(regrouped(*hqq_kernels.int4_operands(module)), weight, rtol=0, atol=rounding)
    x = torch.randn(2, rows, 576).to(dtype)
    got = module(x)
    assert chosen_kernels(module) == {"": "int4-cpu"} and got.dtype == dtype
    assert relative_error(got, exact(module, x)) < 2 * BFLOAT16_UNIT
    set_kernel(module, "dequantize")
    assert relative_error(module(x), exact(module, x)) < (BFLOAT16_UNIT if dtype == torch.bfloat16 else 1e-6)
    assert chosen_kernels(module) == {"": "dequantize"}


def test_hqq_layers_the_int4_kernel_cannot_serve_are_refused_with_the_reason():
    torch.manual_seed(0)
    cases = {
        "in_features must be a multiple of group_size": (HQQConfig(group_size=128, optimize=False), "dequantize"),
        "it takes 4-bit codes, not 8-bit": (HQQConfig(nbits=8, group_size=64, optimize=False), "gemv-inductor"),
        "it takes groups along the inputs (axis 1), not axis 0": (
            HQQConfig(group_size=64, axis=0, optimize=False),
            "dequantize",
        ),
    }
    for reason, (config, runs) in cases.items():
        module = hqq_linear(nn.Linear(576, 192), config, torch.device("cpu"))
        assert reason in check(int4_kernel_of(module), module, "cpu", None).reason
        x = torch.randn(3, 576)
        got = module(x)
        assert chosen_kernels(module) == {"": runs}
        if runs == "dequantize":
            assert torch.equal(got, F.linear(x, module.dequantize(), module.bias))
        else:
            assert relative_error(got, exact(module, x)) < 2 * BFLOAT16_UNIT


@pytest.mark.parametrize(("bits", "group_size"), [(2, 16), (3, 64)])
def test_hqq_2_and_3_bit_run_gemv_inductor(bits, group_size):
    torch.manual_seed(0)
    config = HQQConfig(nbits=bits, group_size=group_size, optimize=False)
    module = hqq_linear(nn.Linear(576, 192), config, torch.device("cpu"))
    x = torch.randn(1, 576)
    got = module(x)
    assert chosen_kernels(module) == {"": "gemv-inductor"}
    assert relative_error(got, exact(module, x)) < 2 * BFLOAT16_UNIT


def test_hqq_model_loads_with_int4_cpu(tiny_llama, tmp_path):
    model = quantkit.quantize(tiny_llama, HQQConfig(nbits=4, group_size=32, optimize=False), device="cpu")
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        logits = model(ids).logits
    assert set(chosen_kernels(model).values()) == {"int4-cpu"}
    loaded = quantkit.load(quantkit.save(model, tmp_path / "model"), device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    assert set(chosen_kernels(loaded).values()) == {"int4-cpu"}


def test_int4_packing_a_slice_of_rows_at_a_time_is_the_whole_packing(monkeypatch):
    """A weight too large to convert to int32 at once is packed in slices of 64 rows' multiples,
    with the same bytes (SmolLM2's 576 rows: 9 slices of 64 when forced small)."""
    codes = torch.randint(0, 16, (576, 320), generator=torch.Generator().manual_seed(0))
    scales, offsets = torch.rand(5, 576), torch.rand(5, 576)
    whole = torch_kernels.int4_state(codes, scales, offsets, 64)
    monkeypatch.setattr(torch_kernels, "PACK_ELEMENTS", 1)
    sliced = torch_kernels.int4_state(codes, scales, offsets, 64)
    assert torch.equal(whole.packed, sliced.packed) and torch.equal(whole.scale_zeros, sliced.scale_zeros)


@pytest.mark.parametrize("preset", ["nf4", "int8", "hqq-4bit-g64"])
def test_a_routed_third_party_layer_is_freed_with_its_last_reference(preset):
    """bitsandbytes' and hqq's layers get their kernel forward (and bnb its ``dequantize``) bound
    weakly: dropping the last reference frees the layer at once, with no cyclic collection (a
    streamed run frees each quantized module as it is written); a deep copy runs on its own tensors."""
    config = quantkit.as_config(preset)
    backend = get_registry().backends_for_method(config.quant_method)[0]
    x = torch.randn(2, 128)
    # the libraries' first calls log and warn once: pytest keeps those records, and their frames, to the end
    backend.quantize_linear("layer", nn.Linear(128, 64, bias=False), config, torch.device("cpu"))(x)
    layer = backend.quantize_linear("layer", nn.Linear(128, 64, bias=False), config, torch.device("cpu"))
    expected = layer(x)
    twin = copy.deepcopy(layer)
    assert twin.forward.module() is twin and torch.equal(twin(x), expected)
    alive = weakref.ref(layer)
    gc.disable()
    try:
        del layer
        assert alive() is None
    finally:
        gc.enable()
