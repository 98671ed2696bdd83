"""Evaluation metrics: sliding-window perplexity, KL divergence and top-1 agreement
against a reference model's next-token distribution, prefill and decode speed.

The reference (the float baseline) is evaluated once; its log-probabilities of
every scored position are written to a ``.npy`` file (float16, memory-mapped on
reading) so that each quantized model is compared with it token by token
without running the baseline again.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ProgressCallback = Callable[[int, int], None]
"""Called with ``(windows done, windows in all)``."""


@dataclass(frozen=True)
class Window:
    """One forward pass: tokens ``[begin, end)``, scoring the last ``scored`` targets.

    Target ``t`` is predicted from the logits at position ``t - 1``; a window
    scores only targets that no earlier window scored, so every target is
    scored once, with at least ``seqlen - stride`` tokens of context (except in
    the first window).
    """

    begin: int
    end: int
    scored: int


def sliding_windows(n_tokens: int, seqlen: int, stride: int) -> list[Window]:
    """The windows of length ``seqlen`` every ``stride`` tokens covering ``n_tokens``."""
    if seqlen < 2 or not 0 < stride <= seqlen:
        raise ValueError(f"need seqlen >= 2 and 0 < stride <= seqlen; got seqlen={seqlen}, stride={stride}")
    windows, last_target = [], 0
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + seqlen, n_tokens)
        first = max(last_target + 1, begin + 1)
        if end - first > 0:
            windows.append(Window(begin, end, end - first))
            last_target = end - 1
        if end == n_tokens:
            break
    return windows


def scored_count(n_tokens: int, seqlen: int, stride: int) -> int:
    return sum(w.scored for w in sliding_windows(n_tokens, seqlen, stride))


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation pass measured."""

    perplexity: float
    mean_nll: float
    scored_tokens: int
    windows: int
    kl_divergence: float | None
    top1_agreement: float | None
    prefill_tokens_per_s: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


class ReferenceWriter:
    """Streams float16 log-probabilities ``(scored_tokens, vocab)`` into a ``.npy`` file.

    The file appears at ``path`` only once every row is written.
    """

    def __init__(self, path: Path, rows: int, vocab: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp.npy")
        self._array = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.float16, shape=(rows, vocab))
        self._row = 0

    def write(self, logprobs: torch.Tensor) -> None:
        n = logprobs.shape[0]
        self._array[self._row : self._row + n] = logprobs.to("cpu", torch.float16).numpy()
        self._row += n

    def close(self) -> None:
        if self._row != self._array.shape[0]:
            raise RuntimeError(f"reference has {self._row} of {self._array.shape[0]} rows")
        self._array.flush()
        del self._array
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        self.__dict__.pop("_array", None)
        self._tmp.unlink(missing_ok=True)


def read_reference(path: Path) -> np.ndarray:
    """The reference log-probabilities, memory-mapped (never unpickled)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def window_logits(
    model: nn.Module, tokens: torch.Tensor, windows: list[Window]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """For each window: the scored targets, the logits predicting them
    ``(scored, vocab)`` and the seconds its forward pass took."""
    device = next(model.parameters()).device
    for w in windows:
        ids = tokens[:, w.begin : w.end].to(device)
        _synchronize(device)
        start = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        _synchronize(device)
        seconds = time.perf_counter() - start
        # logits at position i predict token i + 1: the last ``scored`` predictions.
        yield ids[0, -w.scored :], logits[0, -w.scored - 1 : -1], seconds


@dataclass
class _Totals:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0


def _score(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ref: np.ndarray | None,
    row: int,
    writer: ReferenceWriter | None,
    totals: _Totals,
    chunk: int = 128,
) -> None:
    """Accumulate one window's metrics in float64, ``chunk`` rows at a time.

    float64 because a float32 log-softmax over a large vocabulary is off by
    ~1e-5, the size of an 8-bit model's KL divergence.
    """
    for start in range(0, logits.shape[0], chunk):
        logprobs = torch.log_softmax(logits[start : start + chunk].double(), dim=-1)
        rows = targets[start : start + chunk]
        totals.nll -= logprobs.gather(-1, rows.unsqueeze(-1)).sum().item()
        if ref is not None:
            lo = row + start
            base = torch.from_numpy(np.array(ref[lo : lo + len(rows)])).to(logprobs.device).double()
            base = base - base.logsumexp(-1, keepdim=True)  # renormalize after float16 rounding
            totals.kl += (base.exp() * (base - logprobs)).sum().item()
            totals.agree += int((base.argmax(-1) == logprobs.argmax(-1)).sum())
        if writer is not None:
            writer.write(logprobs)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    seqlen: int,
    stride: int | None = None,
    reference: Path | None = None,
    write_reference: Path | None = None,
    progress: ProgressCallback | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``tokens`` ``(1, n)`` over sliding windows.

    With ``reference`` (a file written through ``write_reference`` by the
    baseline on the same tokens and windows), also the mean KL divergence
    ``KL(reference || model)`` of the next-token distributions and the fraction
    of positions where both predict the same top-1 token.
    ``prefill_tokens_per_s`` counts every token fed, leaving out the first
    (warm-up) window when there are several.
    """
    stride = seqlen if stride is None else stride
    windows = sliding_windows(tokens.shape[1], seqlen, stride)
    total = sum(w.scored for w in windows)
    ref = read_reference(reference) if reference is not None else None
    if ref is not None and ref.shape[0] != total:
        raise ValueError(f"reference {str(reference)!r} has {ref.shape[0]} rows; this protocol scores {total}")
    writer: ReferenceWriter | None = None
    totals, fed, timed, row = _Totals(), 0, 0.0, 0
    start = time.perf_counter()
    try:
        for i, (targets, logits, seconds) in enumerate(window_logits(model, tokens, windows)):
            if writer is None and write_reference is not None:
                writer = ReferenceWriter(write_reference, total, logits.shape[-1])
            _score(logits, targets, ref, row, writer, totals)
            if i > 0 or len(windows) == 1:
                fed += windows[i].end - windows[i].begin
                timed += seconds
            row += len(targets)
            if progress is not None:
                progress(i + 1, len(windows))
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.discard()
        raise
    mean_nll = totals.nll / total
    return EvalResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        scored_tokens=total,
        windows=len(windows),
        kl_divergence=totals.kl / total if ref is not None else None,
        top1_agreement=totals.agree / total if ref is not None else None,
        prefill_tokens_per_s=fed / timed if timed > 0 else float("nan"),
        seconds=time.perf_counter() - start,
    )


@torch.inference_mode()
def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 64, warmup: int = 2) -> float:
    """Greedy decoding speed in tokens/s with a KV cache, after a prompt ``(1, p)``.

    The prompt's prefill and ``warmup`` first steps are not timed. The prefill computes the last
    position's logits only where the model's forward takes ``logits_to_keep``, as ``generate``
    does (and llama.cpp): the whole prompt's logits, a vocabulary-sized product per token, are
    nothing a decoding user pays for.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    device = next(model.parameters()).device
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=prompt.to(device), use_cache=True, **last_only)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for step in range(warmup + new_tokens):
        if step == warmup:
            _synchronize(device)
            start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _synchronize(device)
    return new_tokens / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
