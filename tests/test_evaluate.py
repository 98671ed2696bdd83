"""Evaluation metrics: windows, perplexity, KL divergence, top-1 agreement, speed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from quantkit.evaluate import (
    ReferenceWriter,
    decode_speed,
    evaluate,
    read_reference,
    scored_count,
    sliding_windows,
)

VOCAB = 256


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(vocab=VOCAB)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (1, 300), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "n,seqlen,stride",
    [(4096, 512, 512), (4096, 512, 256), (100, 512, 512), (1000, 512, 300), (2, 2, 1), (513, 512, 512), (37, 8, 3)],
)
def test_windows_score_every_target_once_with_enough_context(n, seqlen, stride):
    windows = sliding_windows(n, seqlen, stride)
    scored = []
    for i, w in enumerate(windows):
        assert w.end - w.begin <= seqlen and w.scored >= 1
        targets = list(range(w.end - w.scored, w.end))
        if i > 0:  # every scored target sees at least seqlen - stride tokens of context
            assert targets[0] - w.begin >= min(seqlen - stride, w.begin)
        scored += targets
    # token 0 has no context; without overlap neither has each window's first token; all others once, in order
    assert scored == [t for t in range(1, n) if stride < seqlen or t % seqlen]
    assert scored_count(n, seqlen, stride) == len(scored)


def test_windows_without_overlap_skip_each_window_start():
    # stride == seqlen: a window's first token has no context inside the window and is not scored
    assert scored_count(4096, 512, 512) == 4096 - 8
    assert [w.scored for w in sliding_windows(1024, 512, 512)] == [511, 511]


@pytest.mark.parametrize("seqlen,stride", [(1, 1), (8, 9), (8, 0)])
def test_windows_reject_bad_arguments(seqlen, stride):
    with pytest.raises(ValueError):
        sliding_windows(100, seqlen, stride)


def naive_nll(model, tokens, seqlen, stride):
    """Perplexity the textbook way: score each window with cross-entropy on masked labels."""
    total, count = 0.0, 0
    for w in sliding_windows(tokens.shape[1], seqlen, stride):
        ids = tokens[:, w.begin : w.end]
        labels = ids.clone()
        labels[:, : ids.shape[1] - w.scored] = -100
        with torch.no_grad():
            logits = model(input_ids=ids).logits.double()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        total += loss.item()
        count += w.scored
    return total / count


@pytest.mark.parametrize("seqlen,stride", [(64, 64), (64, 32), (300, 300)])
def test_perplexity_matches_masked_cross_entropy(model, tokens, seqlen, stride):
    result = evaluate(model, tokens, seqlen=seqlen, stride=stride)
    expected = naive_nll(model, tokens, seqlen, stride)
    assert result.mean_nll == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-6)
    assert result.scored_tokens == scored_count(300, seqlen, stride)
    assert result.kl_divergence is None and result.top1_agreement is None


def test_reference_round_trip_gives_zero_kl_and_full_agreement(model, tokens, tmp_path):
    ref = tmp_path / "ref.npy"
    base = evaluate(model, tokens, seqlen=64, stride=48, write_reference=ref)
    stored = read_reference(ref)
    assert stored.dtype == np.float16 and stored.shape == (base.scored_tokens, VOCAB)
    again = evaluate(model, tokens, seqlen=64, stride=48, reference=ref)
    assert again.perplexity == base.perplexity
    assert 0 <= again.kl_divergence < 1e-5  # float16 rounding of the reference only
    assert again.top1_agreement == 1.0


def test_kl_and_agreement_match_a_direct_computation(model, tokens, tmp_path):
    ref = tmp_path / "ref.npy"
    evaluate(model, tokens, seqlen=64, write_reference=ref)
    other = make_tiny_llama(seed=1, vocab=VOCAB)
    result = evaluate(other, tokens, seqlen=64, reference=ref)
    # direct: full forward of both models per window, float64
    kls, agree = [], []
    for w in sliding_windows(tokens.shape[1], 64, 64):
        ids = tokens[:, w.begin : w.end]
        with torch.no_grad():
            p = torch.log_softmax(model(input_ids=ids).logits[0, -w.scored - 1 : -1].double(), -1)
            q = torch.log_softmax(other(input_ids=ids).logits[0, -w.scored - 1 : -1].double(), -1)
        kls.append((p.exp() * (p - q)).sum(-1))
        agree.append(p.argmax(-1) == q.argmax(-1))
    assert result.kl_divergence == pytest.approx(torch.cat(kls).mean().item(), rel=1e-3)
    assert result.top1_agreement == pytest.approx(torch.cat(agree).double().mean().item())
    assert result.kl_divergence > 0.01 and result.top1_agreement < 1


def test_kl_grows_with_the_perturbation(model, tokens, tmp_path):
    ref = tmp_path / "ref.npy"
    evaluate(model, tokens, seqlen=100, write_reference=ref)
    kls = []
    for scale in (1e-3, 1e-2, 1e-1):
        noisy = make_tiny_llama(vocab=VOCAB)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(5)
            for p in noisy.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
        kls.append(evaluate(noisy, tokens, seqlen=100, reference=ref).kl_divergence)
    assert kls[0] < kls[1] < kls[2]


def test_reference_of_another_protocol_is_refused(model, tokens, tmp_path):
    ref = tmp_path / "ref.npy"
    evaluate(model, tokens, seqlen=64, write_reference=ref)
    with pytest.raises(ValueError, match="rows"):
        evaluate(model, tokens, seqlen=64, stride=32, reference=ref)


def test_reference_writer_leaves_no_file_when_interrupted(model, tokens, tmp_path):
    ref = tmp_path / "ref.npy"

    def interrupt(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tokens, seqlen=64, write_reference=ref, progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_reference_writer_refuses_a_short_file(tmp_path):
    writer = ReferenceWriter(tmp_path / "r.npy", rows=4, vocab=3)
    writer.write(torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="2 of 4"):
        writer.close()
    writer.discard()
    assert list(tmp_path.iterdir()) == []


def test_progress_and_speed_are_reported(model, tokens):
    seen = []
    result = evaluate(model, tokens, seqlen=64, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, result.windows) for i in range(1, result.windows + 1)]
    assert result.prefill_tokens_per_s > 0 and result.seconds > 0


def test_decode_speed_decodes_greedily_with_the_cache(model, tokens):
    kept = []

    def record(module, args, kwargs):
        kept.append(kwargs.get("logits_to_keep"))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    speed = decode_speed(model, tokens[:, :16], new_tokens=8)
    hook.remove()
    assert speed > 0
    assert kept == [1] + [None] * 10  # the prefill's last logits only, as generate() asks; then 2 + 8 steps
    with pytest.raises(ValueError):
        decode_speed(model, tokens[:, :16], new_tokens=0)
