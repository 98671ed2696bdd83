"""GPTQ and AWQ per-layer algorithms and their checkpoint packing formats."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantkit.builtin_backends.awq.awq import (
    apply_clip,
    apply_scales_to_previous,
    awq_pseudo_quantize,
    input_channel_mean_abs,
    search_clip,
    search_scales,
)
from quantkit.builtin_backends.awq.packing import dequantize_awq, pack_awq, pack_awq_gemv, unpack_awq, unpack_awq_gemv
from quantkit.builtin_backends.awq.qlinear import AWQLinear
from quantkit.builtin_backends.gptq.gptq import (
    MSE_GRID,
    MSE_MAX_SHRINK,
    _range_errors,
    gptq_quantize,
    group_aware_order,
    rtn_quantize,
)
from quantkit.builtin_backends.gptq.packing import dequantize_gptq, pack_gptq, pack_rows, unpack_gptq, unpack_rows
from quantkit.core.errors import QuantizationError
from quantkit.core.linears import ROW_BLOCK_ELEMENTS, row_blocks
from quantkit.layerwise import HessianAccumulator


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def as_int32(word: int) -> int:
    """A 32-bit pattern as the signed value an int32 tensor holds."""
    return word - 2**32 if word >= 2**31 else word


def correlated_inputs(n: int, features: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=gen) / features**0.5
    return torch.randn(n, features, generator=gen) @ mixing + 0.05 * torch.randn(n, features, generator=gen)


def hessian(x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    for chunk in x.split(batch):
        acc.add_batch(chunk)
    return acc.H


def output_error(weight: torch.Tensor, quantized: torch.Tensor, x: torch.Tensor) -> float:
    return ((weight - quantized) @ x.t()).pow(2).mean().item()


# ---------------------------------------------------------------- GPTQ packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
def test_gptq_pack_round_trip(bits: int, group_size: int) -> None:
    out_features, in_features = 64, 160  # 160 leaves ragged last groups for 64 and 128
    gen = torch.Generator().manual_seed(bits * 1000 + group_size)
    size = in_features if group_size == -1 else group_size
    n_groups = -(-in_features // size)
    g_idx = (torch.arange(in_features) // size)[torch.randperm(in_features, generator=gen)].int()
    intweight = torch.randint(0, 2**bits, (out_features, in_features), generator=gen)
    zeros = torch.randint(1, 2**bits, (n_groups, out_features), generator=gen)
    scales = torch.rand(n_groups, out_features, generator=gen).half()

    packed = pack_gptq(intweight, zeros, scales, g_idx, bits)
    assert packed["qweight"].shape == (in_features * bits // 32, out_features)
    assert packed["qzeros"].shape == (n_groups, out_features * bits // 32)
    assert packed["qweight"].dtype == packed["qzeros"].dtype == torch.int32
    assert packed["qweight"].is_contiguous()  # row-major, as loaded from a file (unpacking reads its bytes)
    unpacked_weight, unpacked_zeros = unpack_gptq(packed["qweight"], packed["qzeros"], bits)
    assert torch.equal(unpacked_weight, intweight.int())
    assert torch.equal(unpacked_zeros, zeros.int())

    weight = dequantize_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)
    for col in (0, 37, in_features - 1):
        g = int(g_idx[col])
        expected = scales[g].float() * (intweight[:, col] - zeros[g])
        assert torch.equal(weight[:, col], expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("columns", [1, 3])
def test_pack_rows_of_one_or_few_columns_round_trips(bits: int, columns: int) -> None:
    """One output column (a single group's zero points): no stride assumption on a size-1 dimension."""
    values = torch.randint(0, 2**bits, (64, columns), generator=torch.Generator().manual_seed(bits))
    for layout in (values, values.t().contiguous().t()):
        packed = pack_rows(layout, bits)
        assert packed.shape == (64 * bits // 32, columns) and packed.is_contiguous()
        assert torch.equal(unpack_rows(packed, bits), values.int())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_rows_reads_every_bit_of_any_word(bits: int) -> None:
    words = torch.randint(-(2**31), 2**31, (3 * bits, 5), generator=torch.Generator().manual_seed(bits))
    stream = (words.to(torch.int64) & 0xFFFFFFFF).t()  # (5, 3 * bits) words, one bit stream per column
    bit_values = (stream.unsqueeze(-1) >> torch.arange(32)) & 1  # (5, words, 32), little-endian bits
    expected = bit_values.reshape(5, -1, bits) @ (2 ** torch.arange(bits))  # (5, values)
    assert torch.equal(unpack_rows(words.int(), bits), expected.t().int())
    assert torch.equal(unpack_rows(words.int().t().contiguous().t(), bits), expected.t().int())  # column-major


def test_gptq_packing_order_by_hand() -> None:
    def qweight(values: list[int], bits: int) -> list[int]:
        """Packed words of one output row whose inputs hold ``values`` (32 identical rows)."""
        intweight = torch.tensor(values).expand(32, -1)
        g_idx = torch.zeros(len(values), dtype=torch.int32)
        ones = torch.ones(1, 32, dtype=torch.int64)
        words = pack_gptq(intweight, ones, ones.half(), g_idx, bits)["qweight"]
        assert (words == words[:, :1]).all()
        return words[:, 0].tolist()

    assert qweight(list(range(8)), 4) == [0x76543210]
    assert qweight([0, 1, 2, 3] * 4, 2) == [as_int32(0xE4E4E4E4)]
    assert qweight([1, 2, 3, 0xFF], 8) == [as_int32(0xFF030201)]
    # 3 bits: 32 values fill 3 words; value 10 spans bits 30..32 and value 21 bits 63..65.
    values = [0] * 32
    values[0], values[10], values[21], values[31] = 3, 7, 5, 6
    assert qweight(values, 3) == [as_int32(0xC0000003), as_int32(0x80000001), as_int32(0xC0000002)]

    # qzeros store zero - 1, packed along the output dim.
    zeros = torch.arange(1, 9).view(1, 8)
    packed = pack_gptq(torch.zeros(8, 8, dtype=torch.int64), zeros, zeros.half(), torch.zeros(8, dtype=torch.int32), 4)
    assert packed["qzeros"].tolist() == [[0x76543210]]


def test_gptq_pack_rejects_unstorable_values() -> None:
    g_idx = torch.zeros(32, dtype=torch.int32)
    scales = torch.ones(1, 8).half()
    with pytest.raises(ValueError, match="zeros"):
        pack_gptq(torch.zeros(8, 32, dtype=torch.int64), torch.zeros(1, 8, dtype=torch.int64), scales, g_idx, 4)
    with pytest.raises(ValueError, match="in_features=36"):
        g_idx_36 = torch.zeros(36, dtype=torch.int32)
        pack_gptq(torch.zeros(8, 36, dtype=torch.int64), torch.ones(1, 8, dtype=torch.int64), scales, g_idx_36, 4)
    with pytest.raises(ValueError, match="bits"):
        pack_gptq(torch.zeros(8, 32, dtype=torch.int64), torch.ones(1, 8, dtype=torch.int64), scales, g_idx, 5)


# ---------------------------------------------------------------- GPTQ algorithm


def test_hessian_accumulator_running_average() -> None:
    x = correlated_inputs(300, 24)
    assert torch.allclose(hessian(x, batch=70), 2 / 300 * x.t() @ x, atol=1e-5)
    acc = HessianAccumulator(24)
    acc.add_batch(x[:0])
    assert acc.nsamples == 0 and not acc.H.any()


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(desc_act: bool) -> None:
    x = correlated_inputs(512, 128)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    result = gptq_quantize(weight, hessian(x), bits=4, group_size=32, desc_act=desc_act)
    rtn = rtn_quantize(weight, bits=4, group_size=32)
    assert output_error(weight, result.dequantized, x) < 0.7 * output_error(weight, rtn.dequantized, x)
    assert result.loss is not None and result.loss > 0


@pytest.mark.parametrize(
    ("bits", "desc_act", "static_groups"), [(2, False, False), (3, True, False), (4, True, True), (8, True, False)]
)
def test_gptq_result_packs_to_its_dequantized_weight(bits: int, desc_act: bool, static_groups: bool) -> None:
    in_features, group_size = 160, 64  # ragged: groups of 64, 64 and 32 inputs
    x = correlated_inputs(400, in_features, seed=bits)
    weight = torch.randn(32, in_features, generator=torch.Generator().manual_seed(bits))
    result = gptq_quantize(
        weight,
        hessian(x),
        bits=bits,
        group_size=group_size,
        sym=False,
        desc_act=desc_act,
        static_groups=static_groups,
        block_size=48,
    )
    assert result.scales.shape == result.zeros.shape == (3, 32)
    assert torch.equal(torch.bincount(result.g_idx, minlength=3), torch.tensor([64, 64, 32]))
    if not desc_act or static_groups:
        assert torch.equal(result.g_idx, (torch.arange(in_features) // group_size).int())
    else:
        assert not torch.equal(result.g_idx, result.g_idx.sort().values)
    packed = pack_gptq(result.intweight, result.zeros, result.scales, result.g_idx, bits)
    weight_back = dequantize_gptq(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], bits)
    assert torch.equal(weight_back, result.dequantized)


def test_gptq_dead_inputs_and_degenerate_hessian() -> None:
    x = correlated_inputs(256, 64)
    x[:, [3, 40]] = 0
    weight = torch.randn(16, 64)
    result = gptq_quantize(weight, hessian(x), bits=4, group_size=32, desc_act=True)
    assert torch.isfinite(result.dequantized).all()
    assert not result.dequantized[:, [3, 40]].any()
    all_dead = gptq_quantize(weight, torch.zeros(64, 64), bits=4, group_size=32)
    assert torch.isfinite(all_dead.dequantized).all()


def test_gptq_damp_auto_increment_recovers_from_a_non_positive_definite_hessian() -> None:
    weight = torch.randn(8, 2)
    indefinite = torch.tensor([[1.0, 1.5], [1.5, 1.0]])  # eigenvalue -0.5: needs damp > 0.5
    result = gptq_quantize(weight, indefinite, bits=4, group_size=-1, damp_percent=0.05, damp_auto_increment=0.1)
    assert result.damp_percent == pytest.approx(0.55)  # the first step past 0.5
    assert torch.isfinite(result.dequantized).all()
    with pytest.raises(QuantizationError, match=r"not positive definite.*damp_auto_increment=0\b"):
        gptq_quantize(weight, indefinite, bits=4, group_size=-1, damp_auto_increment=0)
    with pytest.raises(QuantizationError, match="not positive definite"):
        gptq_quantize(weight, torch.tensor([[1.0, 3.0], [3.0, 1.0]]), bits=4, group_size=-1)


def testgroup_aware_order_sorts_within_groups_then_groups_by_their_largest_diagonal() -> None:
    diag = torch.tensor([1.0, 5.0, 2.0, 9.0, 3.0, 4.0, 0.5, 7.0])  # groups of 3; the last is short
    assert group_aware_order(diag, 3).tolist() == [3, 5, 4, 1, 2, 0, 6, 7]


def outlier_inputs(n: int, features: int, outliers: list[int]) -> torch.Tensor:
    """Correlated inputs whose ``outliers`` channels are 10x larger than the rest."""
    x = correlated_inputs(n, features)
    x[:, outliers] *= 10
    return x


def test_gar_lowers_the_output_error_and_keeps_groups_contiguous() -> None:
    in_features, group_size = 256, 32
    x = outlier_inputs(1024, in_features, outliers=[5, 70, 100, 200, 250])
    H = hessian(x)
    errors = {}
    for gar in (False, True):
        for seed in range(3):
            weight = torch.randn(64, in_features, generator=torch.Generator().manual_seed(seed))
            result = gptq_quantize(weight, H, bits=3, group_size=group_size, act_group_aware=gar)
            assert torch.equal(result.g_idx, (torch.arange(in_features) // group_size).int())
            packed = pack_gptq(result.intweight, result.zeros, result.scales, result.g_idx, 3)
            assert torch.equal(dequantize_gptq(**packed, bits=3), result.dequantized)
            errors[gar, seed] = output_error(weight, result.dequantized, x)
    assert all(errors[True, seed] < 0.95 * errors[False, seed] for seed in range(3)), errors


@pytest.mark.parametrize("sym", [True, False])
def test_mse_grid_error_is_at_most_the_min_max_error(sym: bool) -> None:
    weight = torch.distributions.StudentT(3.0).sample((64, 256))  # heavy tails: min/max ranges are wide
    minmax, searched = (rtn_quantize(weight, bits=4, group_size=64, sym=sym, mse=mse) for mse in (0.0, 2.0))
    per_row = [(weight - r.dequantized).square().view(64, 4, 64).sum(-1) for r in (minmax, searched)]
    assert (per_row[1] <= per_row[0] + 1e-6).all()
    assert per_row[1].sum() < 0.97 * per_row[0].sum()
    assert (searched.scales <= minmax.scales).all()


@pytest.mark.parametrize("sym", [True, False])
def test_coarse_to_fine_range_search_is_close_to_the_exhaustive_grid(sym: bool) -> None:
    weight = torch.distributions.StudentT(3.0).sample((256, 64))
    searched = rtn_quantize(weight, bits=4, group_size=64, sym=sym, mse=2.4)
    searched_error = (weight - searched.dequantized).abs().pow(2.4).sum(1)
    members = weight.t().contiguous()
    grid = 1 - torch.arange(int(MSE_MAX_SHRINK * MSE_GRID)).view(-1, 1) / MSE_GRID
    exhaustive_error = _range_errors(members, members.amin(0), members.amax(0), grid, 4, sym, 2.4).amin(0)
    assert (searched_error >= exhaustive_error * (1 - 1e-3)).all()  # nothing beats the whole grid
    assert searched_error.sum() <= 1.01 * exhaustive_error.sum()
    assert (searched_error <= exhaustive_error * (1 + 1e-3)).float().mean() > 0.9


def test_gptq_with_mse_grid_beats_min_max_on_heavy_tailed_weights() -> None:
    x = correlated_inputs(512, 128)
    weight = torch.distributions.StudentT(3.0).sample((64, 128))
    errors = [
        output_error(weight, gptq_quantize(weight, hessian(x), bits=4, group_size=32, mse=mse).dequantized, x)
        for mse in (0.0, 2.4)
    ]
    assert errors[1] < errors[0]


def test_gptq_is_deterministic() -> None:
    x = correlated_inputs(256, 96)
    weight = torch.randn(32, 96)
    packs = [
        pack_gptq(r.intweight, r.zeros, r.scales, r.g_idx, 4)
        for r in (gptq_quantize(weight, hessian(x), bits=4, group_size=32, desc_act=True) for _ in range(2))
    ]
    for name in packs[0]:
        assert packs[0][name].numpy().tobytes() == packs[1][name].numpy().tobytes()


def test_quantizer_zero_points_fit_the_v1_format() -> None:
    weight = torch.rand(16, 64, generator=torch.Generator().manual_seed(0)) + 0.5
    weight[:, :32] -= 1.0  # group 0 mixed signs; group 1 all positive: a plain zero point would be 0
    result = rtn_quantize(weight, bits=4, group_size=32, sym=False)
    assert int(result.zeros.min()) >= 1
    step = result.scales.float()[result.g_idx.long()].t()
    # half a step, plus a little for the zero point's rounding against a float16-rounded scale
    assert ((result.dequantized - weight).abs() <= 0.51 * step).all()
    symmetric = rtn_quantize(weight, bits=4, group_size=32, sym=True)
    assert torch.equal(symmetric.zeros, torch.full((2, 16), 8, dtype=torch.int32))


# ---------------------------------------------------------------- AWQ packing


def test_awq_packing_order_by_hand() -> None:
    intweight = torch.arange(8).view(8, 1)  # output channel c has value c
    zeros = torch.arange(8, 16).view(1, 8)
    packed = pack_awq(intweight, zeros, torch.ones(1, 8))
    # nibble i holds output channel [0, 2, 4, 6, 1, 3, 5, 7][i]
    assert packed["qweight"].tolist() == [[0x75316420]]
    assert packed["qzeros"].tolist() == [[as_int32(0xFDB9ECA8)]]


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_pack_round_trip_and_dequantize(group_size: int) -> None:
    weight = torch.randn(48, 256)
    quantized = awq_pseudo_quantize(weight, bits=4, group_size=group_size)
    packed = pack_awq(quantized.intweight, quantized.zeros, quantized.scales)
    assert packed["qweight"].shape == (256, 6) and packed["qzeros"].shape == (256 // group_size, 6)
    intweight, zeros = unpack_awq(packed["qweight"], packed["qzeros"])
    assert torch.equal(intweight, quantized.intweight) and torch.equal(zeros, quantized.zeros)
    assert torch.equal(dequantize_awq(packed["qweight"], packed["qzeros"], packed["scales"]), quantized.dequantized)
    g = 100 // group_size
    expected = quantized.scales[g].float() * (quantized.intweight[:, 100] - quantized.zeros[g])
    assert torch.equal(quantized.dequantized[:, 100], expected)

    gemv = pack_awq_gemv(quantized.intweight, quantized.zeros, quantized.scales)
    width = {32: 4, 64: 2, 128: 1}[group_size]
    assert gemv["qweight"].shape == (48, 32) and gemv["qzeros"].shape == (48, width)
    assert gemv["scales"].shape == (48, 8 * width)
    back = unpack_awq_gemv(gemv["qweight"], gemv["qzeros"], gemv["scales"], group_size)
    assert all(torch.equal(a, b) for a, b in zip(back, (quantized.intweight, quantized.zeros, quantized.scales)))


@pytest.mark.parametrize("version", ["gemm", "gemv"])
def test_awq_linear_quantized_block_by_block_equals_packing_the_whole_weight(version: str) -> None:
    """``AWQLinear.quantize`` packs blocks of output rows (three here, the last of 8 rows): the same
    buffers as quantizing the whole weight and packing its codes at once."""
    linear = nn.Linear(512, 2 * ROW_BLOCK_ELEMENTS // 512 + 8, dtype=torch.bfloat16)
    assert len(row_blocks(linear.weight, multiple=8)) == 3
    whole = awq_pseudo_quantize(linear.weight, bits=4, group_size=128)
    expected = AWQLinear.pack(whole.intweight, whole.zeros, whole.scales, linear.bias, version)
    blocked = AWQLinear.quantize(linear, bits=4, group_size=128, zero_point=True, version=version)
    for name in ("qweight", "qzeros", "scales", "bias"):
        assert torch.equal(getattr(blocked, name), getattr(expected, name)), name


def test_row_blocks_cover_the_rows_in_multiples() -> None:
    weight = torch.empty(100, 7)
    blocks = row_blocks(weight, max_elements=7 * 20, multiple=8)
    assert [(b.start, b.stop) for b in blocks] == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 80), (80, 96), (96, 100)]
    assert [(b.start, b.stop) for b in row_blocks(weight, max_elements=3)] == [(r, r + 1) for r in range(100)]


def test_awq_symmetric_quantization_uses_zero_point_eight() -> None:
    quantized = awq_pseudo_quantize(torch.randn(8, 64), bits=4, group_size=32, zero_point=False)
    assert torch.equal(quantized.zeros, torch.full((2, 8), 8, dtype=torch.int32))
    assert int(quantized.intweight.max()) <= 15 and int(quantized.intweight.min()) >= 1


def test_awq_rejects_group_size_not_dividing_in_features() -> None:
    with pytest.raises(ValueError, match=r"in_features=100, group_size=32"):
        awq_pseudo_quantize(torch.randn(8, 100), group_size=32)
    with pytest.raises(ValueError, match="in_features=100"):
        search_clip(torch.randn(8, 100), torch.randn(4, 100), group_size=32)


# ---------------------------------------------------------------- AWQ algorithm


def test_awq_scale_search_lowers_output_error() -> None:
    x = torch.randn(128, 128)
    x[:, [5, 77, 100]] *= 30.0  # outlier channels
    linears = [nn.Linear(128, 32), nn.Linear(128, 16)]
    originals = [linear.weight.detach().clone() for linear in linears]
    reference = torch.cat([linear(x) for linear in linears], -1)
    unscaled = torch.cat(
        [x @ awq_pseudo_quantize(linear.weight, group_size=32).dequantized.t() + linear.bias for linear in linears], -1
    )
    result = search_scales(x, linears, w_bits=4, group_size=32)
    assert all(torch.equal(linear.weight, w) for linear, w in zip(linears, originals))
    assert result.loss < 0.8 * (unscaled - reference).pow(2).mean().item()
    assert result.scales.shape == (128,) and torch.isfinite(result.scales).all()

    # a caller-supplied forward_fn sees the candidate weights
    block = nn.Sequential(linears[0], nn.GELU(), nn.Linear(32, 8))
    block_result = search_scales(x, [linears[0]], group_size=32, n_grid=5, forward_fn=lambda: block(x))
    assert torch.isfinite(block_result.scales).all() and block_result.ratio in (0.0, 0.2, 0.4, 0.6, 0.8)


@pytest.mark.parametrize("prev", [nn.LayerNorm(64), nn.RMSNorm(64), nn.Linear(32, 64)])
def test_apply_scales_preserves_the_block_function(prev: nn.Module) -> None:
    with torch.no_grad():
        for param in prev.parameters():
            param.normal_()
    linears = [nn.Linear(64, 16), nn.Linear(64, 8)]
    x = torch.randn(10, prev.weight.shape[-1] if isinstance(prev, nn.Linear) else 64)
    before = [linear(prev(x)) for linear in linears]
    apply_scales_to_previous(prev, linears, torch.rand(64) + 0.5)
    for old, linear in zip(before, linears):
        assert torch.allclose(linear(prev(x)), old, atol=1e-4)


def test_apply_scales_rejects_modules_without_a_matching_weight() -> None:
    with pytest.raises(TypeError, match="GELU"):
        apply_scales_to_previous(nn.GELU(), [nn.Linear(8, 4)], torch.ones(8))
    with pytest.raises(TypeError, match="LayerNorm"):
        apply_scales_to_previous(nn.LayerNorm(16), [nn.Linear(8, 4)], torch.ones(8))


def test_apply_scales_with_offset_norm_weight() -> None:
    norm = nn.RMSNorm(16)
    linear = nn.Linear(16, 4)
    x = torch.randn(3, 16)
    with torch.no_grad():
        norm.weight.normal_()

    def offset_norm(t: torch.Tensor) -> torch.Tensor:  # Gemma-style: scales by 1 + weight
        return torch.rms_norm(t, (16,)) * (1 + norm.weight)

    before = linear(offset_norm(x))
    apply_scales_to_previous(norm, [linear], torch.rand(16) + 0.5, norm_weight_offset=1.0)
    assert torch.allclose(linear(offset_norm(x)), before, atol=1e-4)


def test_search_clip_picks_the_least_output_error() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(12, 64, generator=gen)
    weight[:, 10] *= 6  # an outlier weight worth clipping
    x = torch.randn(80, 64, generator=gen)
    max_val = search_clip(weight, x, w_bits=4, group_size=32, max_elements=1000)
    full = weight.abs().reshape(12, 2, 32).amax(-1)
    assert max_val.shape == (12, 2) and (max_val <= full).all() and (max_val < full).any()

    # brute force, as AutoAWQ computes it: error of every shrink, per (row, group)
    grouped_w = weight.reshape(12, 1, 2, 32)
    grouped_x = x.reshape(1, 80, 2, 32)
    errors = []
    for i in range(10):
        limit = full.reshape(12, 1, 2, 1) * (1 - i / 20)
        q = awq_pseudo_quantize(torch.clamp(grouped_w, -limit, limit).reshape(12, 64), 4, 32).dequantized
        errors.append(((grouped_x * (q.reshape(12, 1, 2, 32) - grouped_w)).sum(-1)).pow(2).mean(1))
    errors = torch.stack(errors)  # (shrinks, rows, groups)
    chosen = torch.stack(
        [
            errors[round((1 - m / f).item() * 20), r, g]
            for (r, g), m, f in zip(
                torch.cartesian_prod(torch.arange(12), torch.arange(2)).tolist(), max_val.flatten(), full.flatten()
            )
        ]
    ).view(12, 2)
    assert torch.allclose(chosen, errors.amin(0), rtol=1e-4, atol=1e-7)

    linear = nn.Linear(64, 12, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    apply_clip(linear, max_val)
    assert (linear.weight.abs().reshape(12, 2, 32) <= max_val.unsqueeze(-1) + 1e-7).all()


def test_input_channel_mean_abs() -> None:
    x = torch.randn(3, 50, 8)
    assert torch.allclose(input_channel_mean_abs(x, chunk_rows=7), x.abs().reshape(-1, 8).mean(0), atol=1e-6)
