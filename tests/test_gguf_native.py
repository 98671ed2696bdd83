"""quantkit's native GGUF code: the dequantizers compute quants.dequantize's float32 values bit for bit;
``q6k-avx512``, the native Q6_K GEMV, equals dequantize-then-matmul to the rounding of its activations
(two bfloat16 halves: 2**-17 relative, against 2**-8 for the kernels with bfloat16 activations), reads the
blocks as stored, and is declared so that machines without its CPU features or tools skip it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from quantkit.builtin_backends.gguf import native, q6_k_kernel, quants
from quantkit.builtin_backends.gguf.q6_k_kernel import Q6_K_AVX512, tiled_blocks
from quantkit.builtin_backends.gguf.qlinear import GGUFLinear
from quantkit.core import kernels
from quantkit.core.dispatch import set_kernel
from quantkit.core.kernels import check

runs_here = pytest.mark.skipif(not Q6_K_AVX512.is_available(), reason=Q6_K_AVX512.is_available().reason)


native_here = pytest.mark.skipif(not native.available(), reason="no native GGUF code on this machine")


@native_here
@pytest.mark.parametrize("qtype", native.DEQUANTIZED_TYPES)
def test_native_dequantizers_equal_the_torch_ones_bit_for_bit(qtype):
    """Random rows, an all-zero block and a row of negative zeros (signs of zero compared too)."""
    torch.manual_seed(1)
    linear = nn.Linear(512, 24, bias=False)
    linear.weight.data[0, :256] = 0.0
    linear.weight.data[1] = -0.0
    linear.weight.data[2] *= 1e4
    module = GGUFLinear.from_linear(linear, qtype)
    expected = quants.dequantize(module.weight, qtype, (24, 512))
    got = module.dequantize()
    assert got.shape == (24, 512) and torch.equal(got.view(torch.int32), expected.view(torch.int32))
    rounded = module.dequantize(torch.bfloat16)  # straight to bfloat16: as .to(torch.bfloat16) rounds
    assert rounded.dtype == torch.bfloat16
    assert torch.equal(rounded.view(torch.int16), expected.bfloat16().view(torch.int16))
    assert native.dequantize(module.weight, qtype, torch.float16) is None  # other dtypes: torch's path
    assert tuple(native.extension().DEQUANTIZED_TYPES) == native.DEQUANTIZED_TYPES


def test_other_types_and_machines_without_the_native_code_dequantize_through_torch(monkeypatch):
    torch.manual_seed(0)
    q3 = GGUFLinear.from_linear(nn.Linear(256, 8), "Q3_K")
    assert native.dequantize(q3.weight, "Q3_K") is None
    monkeypatch.setattr(native, "available", lambda: False)
    q4 = GGUFLinear.from_linear(nn.Linear(256, 8), "Q4_K")
    assert native.dequantize(q4.weight, "Q4_K") is None
    assert torch.equal(q4.dequantize(), quants.dequantize(q4.weight, "Q4_K", (8, 256)))
    assert torch.equal(q4.dequantize(torch.float16), quants.dequantize(q4.weight, "Q4_K", (8, 256)).half())


def q6_k_layer(out_features: int, in_features: int, seed: int = 0) -> GGUFLinear:
    torch.manual_seed(seed)
    return GGUFLinear.from_linear(nn.Linear(in_features, out_features), "Q6_K")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm()).item()


def test_tiles_reorder_the_blocks_by_input_tile_and_leave_one_tile_rows_as_stored():
    blocks = torch.arange(3 * 17 * 210, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(3, 17 * 210)
    tiled = tiled_blocks(blocks, 3, 8)  # 17 blocks a row: tiles of 8, 8 and 1
    rows = blocks.reshape(3, 17, 210)
    expected = torch.cat([rows[:, :8].reshape(-1), rows[:, 8:16].reshape(-1), rows[:, 16:].reshape(-1)])
    assert torch.equal(tiled, expected)
    one_tile = blocks[:, : 8 * 210].contiguous()
    assert tiled_blocks(one_tile, 3, 8).data_ptr() == one_tile.data_ptr()  # no copy


@runs_here
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 256), (48, 2304), (40, 4352)])
@pytest.mark.parametrize("rows", [1, 2, 4, 5])
def test_float32_rows_equal_dequantize_then_matmul_to_the_split_activations_rounding(out_features, in_features, rows):
    """One super-block, a ragged second tile (9 blocks), three tiles (17); above 4 rows the weight
    is dequantized for the call."""
    module = q6_k_layer(out_features, in_features)
    set_kernel(module, "q6k-avx512")
    x = torch.randn(rows, in_features)
    expected = F.linear(x.double(), module.dequantize().double(), module.bias.double())
    got = module(x)
    assert module.kernel_name == "q6k-avx512" and got.dtype == torch.float32 and got.shape == (rows, out_features)
    assert relative_error(got, expected) < 2**-16


@runs_here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_activations_come_back_in_their_dtype(dtype):
    module = q6_k_layer(64, 512)
    x = torch.randn(3, 512).to(dtype)
    got = module(x)
    expected = F.linear(x.double(), module.dequantize().double(), module.bias.double())
    assert module.kernel_name == "q6k-avx512" and got.dtype == dtype
    assert relative_error(got, expected) < 2**-8


@runs_here
def test_a_hand_made_block_decodes_as_ggml_lays_it_out():
    """Every weight of one block set through ql/qh/scales/d: input i holds code q_i, the 16-input
    scale s_(i // 16) and d = 0.5, so with one-hot inputs the output is 0.5 * s * (q - 32)."""
    codes = torch.arange(256) % 64  # the stored 6-bit values
    ql, qh = torch.zeros(128, dtype=torch.int64), torch.zeros(64, dtype=torch.int64)
    for half in range(2):
        for lane in range(32):
            for part in range(4):  # inputs lane, lane + 32, lane + 64, lane + 96 of the half
                q = int(codes[128 * half + 32 * part + lane])
                low = 64 * half + lane + 32 * (part % 2)
                ql[low] |= (q & 15) << (4 * (part // 2))
                qh[32 * half + lane] |= (q >> 4) << (2 * part)
    scales = torch.arange(-8, 8)
    d = torch.tensor([0.5], dtype=torch.float16).view(torch.uint8)
    block = torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), scales.to(torch.int8).view(torch.uint8), d])
    module = GGUFLinear(256, 1, "Q6_K", bias=False)
    module.load_bytes(block.reshape(1, 210), "Q6_K")
    set_kernel(module, "q6k-avx512")
    got = module(torch.eye(256)[:4])  # the first four inputs, one at a time
    expected = 0.5 * scales[0] * (codes[:4] - 32).float()
    assert torch.equal(got.flatten(), expected)
    assert torch.equal(module(torch.eye(256)[252:]).flatten(), 0.5 * scales[15] * (codes[252:] - 32).float())


def test_without_its_cpu_features_it_is_refused_with_the_reason_and_gemv_inductor_serves(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_features", lambda: frozenset({"avx2", "fma"}))
    module = q6_k_layer(64, 256)
    reason = check(Q6_K_AVX512, module, "cpu", None).reason
    assert reason.startswith("missing CPU feature avx512f, CPU feature avx512bw")
    assert module(torch.randn(1, 256)).shape == (1, 64) and module.kernel_name == "gemv-inductor"


def test_other_types_are_refused():
    torch.manual_seed(0)
    module = GGUFLinear.from_linear(nn.Linear(256, 64), "Q4_K")
    assert Q6_K_AVX512.fits(module) == "it takes Q6_K weights, not Q4_K"


@runs_here
def test_where_the_native_code_does_not_build_q6_k_runs_another_kernel_and_says_why(monkeypatch):
    monkeypatch.setattr(q6_k_kernel, "available", lambda: False)
    module = q6_k_layer(64, 256)
    assert "native GGUF code did not build here" in check(Q6_K_AVX512, module, "cpu", None).reason
    assert module(torch.randn(1, 256)).shape == (1, 64) and module.kernel_name == "gemv-inductor"
