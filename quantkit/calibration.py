"""Calibration and evaluation text: built-in, local files, or plugin datasets.

Sources are named by a registered dataset name (``pydoc``, ``wikitext2``,
``c4``, ``pileval`` or a plugin's) or by the path of a ``.txt``, ``.md``,
``.json`` or ``.jsonl`` file. Each has a ``calibration`` and an ``evaluation``
split that never overlap.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .core.errors import ConfigValueError, QuantizationError
from .core.registry import get_registry
from .core.text import DEFAULT_DATASET, SPLITS, read_text_file, split_text, tokenize


def load_text(source: str | os.PathLike | None, split: str, max_chars: int = 4_000_000) -> str:
    """Text of one split of ``source`` (a dataset name or a local file)."""
    if split not in SPLITS:
        raise ConfigValueError("text", "split", split, ", ".join(SPLITS))
    source = DEFAULT_DATASET if source is None else source
    path = Path(source)
    if path.suffix.lower() in (".txt", ".md", ".json", ".jsonl") or path.is_file():
        return split_text(read_text_file(path), split)[:max_chars]
    return get_registry().dataset(str(source)).load(split, max_chars)


def calibration_tokens(
    tokenizer,
    source: str | os.PathLike | None = None,
    *,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens, drawn with ``seed`` from the calibration split."""
    text = load_text(source, "calibration", max_chars=max(200_000, nsamples * seqlen * 8))
    ids = tokenize(tokenizer, text)
    if ids.numel() < seqlen:
        raise QuantizationError(
            f"calibration text {source or DEFAULT_DATASET!r} has {ids.numel()} tokens, fewer "
            f"than one sample of seqlen={seqlen}; give more text or a smaller seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def evaluation_tokens(tokenizer, source: str | os.PathLike | None = None, *, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` tokens of the evaluation split, shape ``(1, n)``."""
    ids = tokenize(tokenizer, load_text(source, "evaluation", max_chars=max_tokens * 12))
    if ids.numel() < 2:
        raise QuantizationError(f"evaluation text {source or DEFAULT_DATASET!r} is empty")
    return ids[:max_tokens].unsqueeze(0)
