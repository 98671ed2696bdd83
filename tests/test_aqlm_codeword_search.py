"""AQLM's codeword search: the native kernel and the torch path find the first minimum of each row."""

from __future__ import annotations

import pytest
import torch

from quantkit.builtin_backends.aqlm import codeword_search
from quantkit.builtin_backends.aqlm.aq import NATIVE_SCORE_ELEMENTS, TORCH_SCORE_ELEMENTS, score_elements
from quantkit.builtin_backends.aqlm.beam_search import beam_search, dequantize, output_error
from quantkit.builtin_backends.aqlm.codeword_search import MIN_SLAB_ROWS, NATIVE, best_codewords, first_argmin
from quantkit.builtin_backends.aqlm.kmeans import residual_kmeans
from quantkit.core import native_code

native_here = pytest.mark.skipif(not NATIVE.available(), reason="no native AQLM code on this machine")


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Each test runs on the native kernel (where it builds) and on the torch path."""
    if request.param == "native" and not NATIVE.available():
        pytest.skip("no native AQLM code on this machine")
    if request.param == "torch":
        monkeypatch.setattr(codeword_search, "_native", lambda queries, codewords: False)
    return request.param


def reference(queries, codewords, bias, weights):
    scores = queries.double() @ codewords.double().T + weights.double()[:, None] * bias.double()[None]
    return scores


@pytest.mark.parametrize(("n", "k", "d"), [(1, 16, 8), (131, 528, 8), (70, 1040, 3), (9, 2**16, 8), (200, 64, 1)])
def test_best_codeword_is_the_lowest_score(path, n, k, d):
    """Rows not a multiple of the kernel's row groups (4) or chunks (64), codewords not a multiple
    of its blocks (512), any group width: the chosen codeword's score is the minimum, and the
    value returned is that score."""
    g = torch.Generator().manual_seed(n + k + d)
    queries, codewords = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    bias, weights = torch.rand(k, generator=g), torch.rand(n, generator=g) * 3
    values, indices = best_codewords(queries, codewords, bias, weights)
    scores = reference(queries, codewords, bias, weights)
    lowest = scores.min(1).values
    assert indices.dtype == torch.long and values.dtype == torch.float32
    assert torch.allclose(scores.gather(1, indices[:, None]).squeeze(1), lowest, rtol=0, atol=1e-5)
    assert torch.allclose(values.double(), lowest, rtol=0, atol=1e-5)


def test_ties_go_to_the_first_codeword(path):
    """Small integers score exactly in float32: among equal scores the first codeword wins, as
    ``argmin`` chooses, wherever the equal scores fall among the kernel's lanes and blocks."""
    g = torch.Generator().manual_seed(0)
    queries = torch.randint(-2, 3, (300, 4), generator=g).float()
    codewords = torch.randint(-2, 3, (1024, 4), generator=g).float()
    bias, weights = torch.randint(0, 3, (1024,), generator=g).float(), torch.ones(300)
    values, indices = best_codewords(queries, codewords, bias, weights)
    scores = reference(queries, codewords, bias, weights).float()
    assert torch.equal(indices, scores.argmin(1))
    assert torch.equal(values, scores.min(1).values)


def test_first_argmin_matches_argmin_on_ties():
    scores = torch.randint(0, 4, (500, 16), generator=torch.Generator().manual_seed(0)).float()
    assert torch.equal(first_argmin(scores), scores.argmin(1))


def test_torch_path_scores_bounded_slabs_of_many_rows(monkeypatch):
    """1x16's k-means on torch: one row per score slab left glibc's heap fragmented by the tiny
    results (over 14 GiB RSS on SmolLM2); each slab holds MIN_SLAB_ROWS rows (the last fewer),
    at most 4 MiB of scores."""
    monkeypatch.setattr(codeword_search, "_native", lambda queries, codewords: False)
    g = torch.Generator().manual_seed(0)
    queries, codewords = torch.randn(300, 8, generator=g), torch.randn(2**16, 8, generator=g)
    slabs = []

    def recorded(scores):
        slabs.append(scores.shape)
        return first_argmin(scores)

    monkeypatch.setattr(codeword_search, "first_argmin", recorded)
    best_codewords(queries, codewords, torch.zeros(2**16), torch.ones(300))
    full, rest = divmod(300, MIN_SLAB_ROWS)
    assert [rows for rows, _ in slabs] == [MIN_SLAB_ROWS] * full + [rest] * (rest > 0)
    assert all(rows * columns <= 2**20 for rows, columns in slabs)  # 4 MiB of float32


def test_other_dtypes_and_codebook_sizes_take_the_torch_path():
    g = torch.Generator().manual_seed(0)
    queries, codewords = torch.randn(50, 8, generator=g), torch.randn(24, 8, generator=g)  # 24: not 16-aligned
    values, indices = best_codewords(queries, codewords, torch.zeros(24), torch.ones(50))
    assert torch.equal(indices, reference(queries, codewords, torch.zeros(24), torch.ones(50)).argmin(1))
    assert not codeword_search._native(queries.double(), codewords.double())
    assert not codeword_search._native(queries, codewords)


@native_here
def test_greedy_beam_search_finds_the_same_codes_natively_and_in_torch(monkeypatch):
    """The greedy beam search on a 1x8 problem: native and torch scoring choose the same codes
    (their float32 scores differ in rounding only), so the output error is the same."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 32, generator=g) @ torch.randn(32, 128, generator=g) / 8
    X = torch.randn(1024, 128, generator=g)
    H = X.T @ X
    scales = W.view(64, 16, 8).flatten(1).norm(dim=1)
    books, codes = residual_kmeans(W.div(scales[:, None]).reshape(-1, 8), 1, 256, 5, torch.Generator().manual_seed(0))
    books, codes = books.view(1, 256, 1, 8), codes.view(64, 16, 1)
    native = beam_search(W, H, books, scales, codes, beam_size=1)
    monkeypatch.setattr(codeword_search, "_native", lambda queries, codewords: False)
    torch_codes = beam_search(W, H, books, scales, codes, beam_size=1)
    assert (native != torch_codes).float().mean() < 0.01
    assert not torch.equal(native, codes)  # the search moved codes
    errors = [output_error(W, H, dequantize(c, books, scales)) for c in (native, torch_codes)]
    assert errors[0] == pytest.approx(errors[1], rel=1e-4)


def test_pricing_the_search_builds_nothing(monkeypatch):
    """``quantkit estimate`` asks what a score costs here: the answer reads the CPU's features and
    the toolchain, and never compiles the extension (tens of seconds on a first run)."""

    def refuse(extension):
        raise AssertionError(f"{extension.name} was built or its build was asked for")

    monkeypatch.setattr(native_code, "_build", refuse)
    monkeypatch.setattr(native_code, "_available", refuse)
    supported = NATIVE.supported()
    assert score_elements() == (NATIVE_SCORE_ELEMENTS if supported else TORCH_SCORE_ELEMENTS)
