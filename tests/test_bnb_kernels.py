"""bitsandbytes' 4-bit layers through quantkit's kernels: ``bnb-cpu`` (bitsandbytes' AVX512-BF16 GEMV on
a packed copy) and ``bitsandbytes`` (its own ``matmul_4bit``) against the dequantize reference."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import quantkit
from quantkit import BnbConfig, chosen_kernels, set_kernel
from quantkit.builtin_backends.bnb.kernels import llm_int8_activations
from quantkit.builtin_backends.bnb.layers import empty_linear, quantize_linear
from quantkit.cli.backends import kernel_rows
from quantkit.core.hardware import cpu_features
from quantkit.core.kernels import KernelUnavailableError
from quantkit.core.torch_kernels import DENSE_ROWS

bnb = pytest.importorskip("bitsandbytes")
bnb_functional = bnb.functional

CONFIGS = {
    "nf4": BnbConfig(),
    "nf4-dq": BnbConfig(use_double_quant=True),
    "fp4": BnbConfig(quant_type="fp4"),
    "fp4-dq": BnbConfig(quant_type="fp4", use_double_quant=True),
}
SHAPES = [(576, 576), (1536, 576), (576, 1536)]
"""``(out, in)``: SmolLM2's attention, MLP up and MLP down projections."""
needs_avx512_bf16 = pytest.mark.skipif(
    "avx512_bf16" not in cpu_features(), reason="bnb-cpu needs a CPU with AVX512-BF16 (avx512_bf16)"
)


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@functools.cache
def layer(key: str, out_features: int, in_features: int) -> nn.Module:
    """A bitsandbytes 4-bit linear (with a bias) of a seeded random weight, quantized once."""
    generator = torch.Generator().manual_seed(out_features * 7 + in_features)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.02)
    return quantize_linear(linear, CONFIGS[key], torch.device("cpu")).eval()


def inputs(rows: int, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).to(dtype)


def run(module: nn.Module, kernel: str | None, x: torch.Tensor) -> torch.Tensor:
    set_kernel(module, kernel)
    with torch.no_grad():
        return module(x)


def assert_bf16_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Within bfloat16 activations' and scales' rounding (relative 2**-9 each, over the sum)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert (out.float() - ref.float()).abs().max() <= 1e-2 * ref.float().abs().max()


def state_bytes(module: nn.Module) -> dict[str, bytes]:
    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("rows", [1, 3, DENSE_ROWS])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("key", CONFIGS)
@pytest.mark.parametrize("kernel", [pytest.param("bnb-cpu", marks=needs_avx512_bf16), "bitsandbytes"])
def test_kernel_matches_the_dequantize_reference(kernel, key, shape, rows):
    module = layer(key, *shape)
    x = inputs(rows, shape[1])
    out = run(module, kernel, x)
    assert module.kernel_request == kernel and module._choice.kernel.name == kernel
    assert_bf16_close(out, run(module, "dequantize", x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", [pytest.param("bnb-cpu", marks=needs_avx512_bf16), "bitsandbytes"])
def test_output_has_the_input_dtype(kernel, dtype):
    module = layer("nf4-dq", 576, 576)
    x = inputs(3, 576, dtype)
    assert_bf16_close(run(module, kernel, x), run(module, "dequantize", x))


def test_bitsandbytes_kernel_is_bitsandbytes_own_forward():
    module = layer("fp4-dq", 1536, 576)
    x = inputs(3, 576)
    with torch.no_grad():
        own = bnb.nn.Linear4bit.forward(module, x)  # the canonical layout: keep_canonical_layout
    assert torch.equal(run(module, "bitsandbytes", x), own)


@needs_avx512_bf16
def test_automatic_selection_picks_bnb_cpu_and_gradients_flow():
    module = layer("nf4", 576, 1536)
    set_kernel(module, None)
    x = inputs(3, 1536).requires_grad_()
    module(x).sum().backward()
    assert module._choice.kernel.name == "bnb-cpu"
    expected = module.dequantize().sum(0).expand(3, -1)
    torch.testing.assert_close(x.grad, expected)


@needs_avx512_bf16
def test_bnb_cpu_refuses_shapes_its_packing_cannot_take_and_those_layers_run_bitsandbytes():
    narrow = quantize_linear(nn.Linear(64, 48), CONFIGS["nf4"], torch.device("cpu"))
    with pytest.raises(KernelUnavailableError, match="out_features must be a multiple of 32") as info:
        set_kernel(narrow, "bnb-cpu")
    assert info.value.valid == ["bitsandbytes", "dequantize"]
    ragged = quantize_linear(nn.Linear(96, 64), CONFIGS["nf4"], torch.device("cpu"))  # blocks of 64 inputs
    with pytest.raises(KernelUnavailableError, match="whole blocks of 64 inputs a row"):
        set_kernel(ragged, "bnb-cpu")
    x = inputs(2, 96)
    out = run(ragged, None, x)
    assert ragged._choice.kernel.name == "bitsandbytes"
    assert_bf16_close(out, run(ragged, "dequantize", x))


@pytest.mark.parametrize("key", CONFIGS)
def test_forwards_leave_the_saved_bytes_as_they_were(key):
    module = quantize_linear(nn.Linear(576, 576), CONFIGS[key], torch.device("cpu"))
    before = state_bytes(module)
    for kernel in ("bnb-cpu", "bitsandbytes") if "avx512_bf16" in cpu_features() else ("bitsandbytes",):
        for rows in (1, DENSE_ROWS):
            run(module, kernel, inputs(rows, 576))
    module(inputs(2, 576).requires_grad_()).sum().backward()
    assert state_bytes(module) == before
    assert not getattr(module.weight.quant_state, "packing_format_for_cpu", False)


def test_loading_a_state_dict_drops_the_prepared_state():
    config, cpu = CONFIGS["nf4-dq"], torch.device("cpu")
    other, saved = quantize_linear(nn.Linear(576, 1536), config, cpu), layer("nf4-dq", 1536, 576)
    module = empty_linear(nn.Linear(576, 1536), config)
    module.load_state_dict(other.state_dict(), assign=True)
    x = inputs(3, 576)
    assert torch.equal(run(module, None, x), run(other, None, x))
    module.load_state_dict(saved.state_dict(), assign=True)
    assert module._choice is None
    assert torch.equal(run(module, None, x), run(saved, None, x))


def test_save_and_load_round_trip(tiny_llama, tmp_path):
    model = quantkit.quantize(tiny_llama, CONFIGS["fp4-dq"], device="cpu")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    quantkit.save(model, tmp_path / "q")
    loaded = quantkit.load(tmp_path / "q", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    kernels = set(chosen_kernels(loaded).values())
    assert kernels == ({"bnb-cpu"} if "avx512_bf16" in cpu_features() else {"bitsandbytes"})


def test_kernels_are_listed_with_their_declarations():
    rows = {r["name"]: r for r in kernel_rows() if r["layers"] == ["Bnb4bit"]}
    assert set(rows) == {"bnb-cpu", "bitsandbytes"} and rows["bnb-cpu"]["priority"] > rows["bitsandbytes"]["priority"]
    cpu = rows["bnb-cpu"]
    assert cpu["devices"] == ["cpu"] and cpu["cpu_features"] == ["avx512_bf16"] and cpu["requires"] == ["bitsandbytes"]
    assert cpu["shape_limits"] == ["out_features must be a multiple of 32", "in_features must be a multiple of 2"]
    assert set(rows["bitsandbytes"]["devices"]) == {"cuda", "rocm", "cpu"}


@pytest.mark.parametrize("threshold", [6.0, 1.5, 0.0])
@pytest.mark.parametrize("rows", [1, 3, 9, 130])
def test_llm_int8_gemv_inductor_is_bitsandbytes_own_llm_int8_to_float_rounding(threshold, rows):
    """LLM.int8's activation quantization and outlier columns folded into one int8 GEMV: the
    numbers bitsandbytes' own forward computes (not the weight-only dequantize reference)."""
    torch.manual_seed(0)
    config = BnbConfig(load_in_4bit=False, load_in_8bit=True, llm_int8_threshold=threshold)
    module = quantize_linear(nn.Linear(576, 1536), config, torch.device("cpu")).eval()
    x = torch.randn(rows, 576) * 0.3  # few values past 1.5, even in 130 rows
    x[:, 5] *= 30  # an outlier column
    x[0, 7] = 8.0  # an outlier in one row only: its column is set aside for every row
    with torch.inference_mode():
        set_kernel(module, "bitsandbytes")
        reference = module(x)
        set_kernel(module, None)
        got = module(x)
        weight_only = F.linear(x, module.dequantize(), module.bias)
    assert chosen_kernels(module) == {"": "gemv-inductor"}
    assert relative(got, reference) < 1e-4
    if threshold:  # the activations' int8 rounding shows against weight-only int8
        assert relative(weight_only, reference) > 10 * relative(got, reference)


def test_llm_int8_activations_are_bitsandbytes_int8_rows_and_outlier_columns():
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    x[1, 3] = 9.0
    ca, sca, columns = bnb_functional.int8_vectorwise_quant(x.to(torch.float16), threshold=6.0)
    expected = ca.float() * sca.unsqueeze(1) / 127
    expected[:, columns] = x[:, columns]
    assert columns.tolist() == [3]
    assert torch.allclose(llm_int8_activations(x, 6.0), expected, rtol=1e-6, atol=0)
