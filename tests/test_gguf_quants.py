"""GGUF quantization in torch (quantkit.builtin_backends.gguf.quants) checked against gguf-py and llama.cpp."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantkit.builtin_backends.gguf.quants import (
    QUANT_TYPES,
    bits_per_weight,
    block_size,
    dequantize,
    quantize,
    type_size,
)

LEGACY = ["F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]
K_QUANTS = ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
IQ_TYPES = ["IQ4_XS", "IQ4_NL"]
# ||W - deq(q(W))||_F / ||W||_F of llama.cpp's reference quantizers on standard-normal weights.
LLAMA_CPP_RELATIVE_ERROR = {"Q6_K": 0.0177, "Q5_K": 0.0361, "Q4_K": 0.0714, "Q3_K": 0.151, "Q2_K": 0.297}


def gguf_quantize(a: np.ndarray, qtype: str) -> np.ndarray:
    with np.errstate(all="ignore"):  # gguf-py warns when a scale overflows float16
        return gguf_quants.quantize(a, GGMLQuantizationType[qtype]).view(np.uint8).reshape(a.shape[0], -1)


def gguf_dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return gguf_quants.dequantize(data, GGMLQuantizationType[qtype])


def weights(rows: int, cols: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale


def relative_error(w: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None) -> float:
    restored = dequantize(quantize(w, qtype, imatrix), qtype, w.shape)
    return ((restored - w).norm() / w.norm()).item()


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def test_sizes_match_ggml() -> None:
    assert set(QUANT_TYPES) == set(LEGACY + K_QUANTS + IQ_TYPES)
    for qtype in QUANT_TYPES:
        assert (block_size(qtype), type_size(qtype)) == GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    assert bits_per_weight("Q4_K") == 4.5 and bits_per_weight("Q8_0") == 8.5 and bits_per_weight("F16") == 16


@pytest.mark.parametrize("qtype", LEGACY)
@pytest.mark.parametrize(
    ("rows", "cols", "seed", "scale"),
    [(64, 256, 0, 1.0), (7, 96, 1, 3e4), (5, 64, 2, 1e-20), (3, 32, 3, 1e30), (33, 160, 4, 1.0)],
)
def test_legacy_bytes_match_gguf_py(qtype: str, rows: int, cols: int, seed: int, scale: float) -> None:
    w = weights(rows, cols, seed, scale)
    w[0] = 0.0  # an all-zero row
    w[-1, :32] = torch.tensor([scale] + [-scale] * 31)  # a +/- tie for the block's largest magnitude
    ours = quantize(w, qtype)
    assert ours.dtype == torch.uint8 and ours.shape == (rows, cols // block_size(qtype) * type_size(qtype))
    np.testing.assert_array_equal(ours.numpy(), gguf_quantize(w.numpy(), qtype))


@settings(max_examples=40, deadline=None)
@given(
    qtype=st.sampled_from(LEGACY),
    a=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.sampled_from([32, 64])),
        # Blocks of subnormal-sized values make gguf-py cast infinities to integers (undefined).
        elements=st.floats(-1e6, 1e6, width=32).filter(lambda v: v == 0 or abs(v) > 1e-30),
    ),
)
def test_legacy_bytes_match_gguf_py_on_arbitrary_values(qtype: str, a: np.ndarray) -> None:
    np.testing.assert_array_equal(quantize(torch.from_numpy(a), qtype).numpy(), gguf_quantize(a, qtype))


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
def test_float_types_keep_special_values_like_gguf_py(qtype: str) -> None:
    a = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    a[0, :4] = [np.nan, -np.nan, np.inf, -np.inf]
    a[1, :4] = [1e-45, 3.4e38, 65520.0, -1e-8]  # subnormal, bfloat16 overflow, float16 overflow
    a.view(np.uint32)[2, :2] = [0x7FA12345, 0xFF800001]  # NaNs with payloads
    np.testing.assert_array_equal(quantize(torch.from_numpy(a), qtype).numpy(), gguf_quantize(a, qtype))


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_dequantize_matches_gguf_py(qtype: str) -> None:
    w = weights(48, 512, seed=5)
    w[3] = 0.0
    w[7] = -2.5  # a constant row
    data = quantize(w, qtype)
    ours = dequantize(data, qtype, w.shape)
    assert ours.dtype == torch.float32 and ours.shape == w.shape
    np.testing.assert_array_equal(ours.numpy(), gguf_dequantize(data.numpy(), qtype))
    assert not ours[3].any()
    if qtype not in ("Q2_K", "Q3_K"):  # too coarse to store a constant exactly
        torch.testing.assert_close(ours[7], w[7], rtol=0.01, atol=0.0)


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quant_error_matches_llama_cpp(qtype: str) -> None:
    error = relative_error(weights(256, 1024, seed=0), qtype)
    assert error == pytest.approx(LLAMA_CPP_RELATIVE_ERROR[qtype], rel=0.01)


# Results of llama.cpp's own quantizers (ggml_quantize_chunk, ggml 0.25.3) on llama_cpp_input().
LLAMA_CPP_SHA256 = {
    ("Q6_K", False): "6fc8b7c6f646f2607e92edfcf6395736dc73df7f340db059d56a2d5bd8ce2dc0",  # bytes
    ("Q6_K", True): "d025eea591884dea9a48f3dd3790a24c1efec56ed35fc4c65a0ffc4398761b8e",  # bytes
    ("Q3_K", False): "056909a66b190fddf8013dd130af8a9563fbb92e8654fe3cabd8b54d745a4d49",  # decoded values
}
LLAMA_CPP_ERROR = {
    ("Q5_K", False): 0.036022, ("Q5_K", True): 0.036721,
    ("Q4_K", False): 0.070836, ("Q4_K", True): 0.076761,
    ("Q2_K", False): 0.291754, ("Q2_K", True): 0.302961,
}  # fmt: skip


def llama_cpp_input() -> tuple[torch.Tensor, torch.Tensor]:
    """64 x 1024 standard-normal weights with a zero row and outliers, and an importance matrix."""
    a = np.random.default_rng(7).standard_normal((64, 1024)).astype(np.float32)
    a[5] = 0.0
    a[9, :300] *= 50.0
    imatrix = (np.random.default_rng(8).random(1024) ** 4).astype(np.float32)
    return torch.from_numpy(a), torch.from_numpy(imatrix)


@pytest.mark.parametrize(("qtype", "weighted"), [*LLAMA_CPP_SHA256, *LLAMA_CPP_ERROR])
def test_k_quants_reproduce_llama_cpp(qtype: str, weighted: bool) -> None:
    w, imatrix = llama_cpp_input()
    data = quantize(w, qtype, imatrix if weighted else None)
    if (qtype, weighted) == ("Q3_K", False):  # bytes differ only in quants under a zero scale
        assert sha256(dequantize(data, qtype, w.shape) + 0.0) == LLAMA_CPP_SHA256[qtype, weighted]  # +0.0: no -0.0
    elif qtype == "Q6_K":
        assert sha256(data) == LLAMA_CPP_SHA256[qtype, weighted]
    else:  # near-ties in the searches may resolve otherwise: compare accuracy
        error = ((dequantize(data, qtype, w.shape) - w).norm() / w.norm()).item()
        assert error == pytest.approx(LLAMA_CPP_ERROR[qtype, weighted], rel=2e-3)


def test_legacy_error_ordering() -> None:
    w = weights(64, 1024, seed=1)
    errors = [relative_error(w, qtype) for qtype in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16"]]
    assert errors == sorted(errors, reverse=True) and relative_error(w, "F32") == 0.0


@pytest.mark.parametrize("qtype", ["Q4_0", "Q6_K", "Q2_K"])
def test_ragged_rows_raise(qtype: str) -> None:
    with pytest.raises(ValueError, match=rf"{qtype}.*row length 100.*block size {block_size(qtype)}"):
        quantize(torch.zeros(4, 100), qtype)


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        quantize(torch.zeros(2, 256), "Q7_K")
    with pytest.raises(ValueError, match="imatrix"):
        quantize(torch.zeros(2, 256), "Q4_K", imatrix=torch.ones(128))
    with pytest.raises(ValueError, match="bytes"):
        dequantize(torch.zeros(10, dtype=torch.uint8), "Q4_K", (1, 256))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_1", "Q4_K", "Q3_K", "Q6_K"])
def test_threads_and_chunks_do_not_change_bytes(qtype: str) -> None:
    w = weights(600, 1024, seed=2)  # several CPU chunks, the last one partial
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = quantize(w, qtype)
        torch.set_num_threads(2)
        pooled = quantize(w, qtype)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, pooled)
    assert torch.equal(quantize(w[:5], qtype), serial[:5])


def test_shapes_and_input_dtypes() -> None:
    w = weights(6, 256, seed=3).reshape(2, 3, 256)
    data = quantize(w.to(torch.bfloat16), "Q4_K")
    assert data.shape == (2, 3, 144)
    assert torch.equal(data.reshape(6, 144), quantize(w.to(torch.bfloat16).float().reshape(6, 256), "Q4_K"))
    assert dequantize(data, "Q4_K", (2, 3, 256)).shape == (2, 3, 256)
    assert quantize(torch.zeros(0, 64), "Q8_0").shape == (0, 68)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", *K_QUANTS])
def test_imatrix_favours_important_columns(qtype: str) -> None:
    w = weights(64, 1024, seed=4)
    importance = torch.rand(1024, generator=torch.Generator().manual_seed(0)) ** 4

    def weighted_error(data: torch.Tensor) -> float:
        return ((dequantize(data, qtype, w.shape) - w) ** 2 * importance).sum().item()

    plain, weighted = quantize(w, qtype), quantize(w, qtype, imatrix=importance)
    restored = dequantize(weighted, qtype, w.shape)
    np.testing.assert_array_equal(restored.numpy(), gguf_dequantize(weighted.numpy(), qtype))
    assert weighted_error(weighted) < 0.95 * weighted_error(plain)
    # A flat importance matrix is llama.cpp's weighted search without emphasis: about as good.
    assert relative_error(w, qtype, imatrix=torch.ones(1024)) < 1.02 * relative_error(w, qtype)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K"])
def test_quantize_runs_inside_inference_mode_and_on_tensors_that_require_grad(qtype: str) -> None:
    """The chunk threads write into the caller's tensors: under the caller's inference mode, on a
    weight detached from any graph."""
    weight = torch.randn(64, 4096)
    expected = quantize(weight, qtype)
    with torch.inference_mode():
        assert torch.equal(quantize(weight, qtype), expected)
    assert torch.equal(quantize(weight.requires_grad_(), qtype), expected)  # a Parameter, outside no_grad
