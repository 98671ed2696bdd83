"""Calibration and evaluation text: built-in, local files, or plugin datasets.

Sources are named by a registered dataset name (``pydoc``, ``wikitext2``,
``c4``, ``pileval`` or a plugin's) or by the path of a ``.txt``, ``.md``,
``.json`` or ``.jsonl`` file. Each has a ``calibration`` and an ``evaluation``
split that never overlap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelFormatError, QuantizationError, UnknownMethodError

DEFAULT_DATASET = "pydoc"
SPLITS = ("calibration", "evaluation")


@dataclass(frozen=True)
class Dataset:
    """A named text source.

    ``load(split, max_chars)`` returns at most about ``max_chars`` characters
    of the ``calibration`` or ``evaluation`` split.
    """

    name: str
    description: str
    load: Callable[[str, int], str]
    offline: bool = True


def load_text(source: str | os.PathLike | None, split: str, max_chars: int = 4_000_000) -> str:
    """Text of one split of ``source`` (a dataset name or a local file)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid; allowed: {', '.join(SPLITS)}")
    source = DEFAULT_DATASET if source is None else source
    path = Path(source)
    if path.suffix.lower() in (".txt", ".md", ".json", ".jsonl") or path.is_file():
        return split_text(read_text_file(path), split)[:max_chars]
    from .registry import get_registry

    datasets = get_registry().datasets
    if str(source) not in datasets:
        raise UnknownMethodError(source, datasets) from None
    return datasets[str(source)].load(split, max_chars)


def read_text_file(path: Path) -> str:
    """Plain text, or the ``text`` fields of a JSON list / JSON-lines file."""
    if not path.is_file():
        raise ModelFormatError(f"text file {str(path)!r} does not exist")
    raw = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    elif path.suffix.lower() == ".json":
        records = json.loads(raw)
    else:
        return raw
    if not isinstance(records, list) or not all(isinstance(r, dict) and "text" in r for r in records):
        raise ModelFormatError(f"{str(path)!r}: expected records with a 'text' field")
    return "\n\n".join(str(r["text"]) for r in records)


def split_text(text: str, split: str, fraction: float = 0.8) -> str:
    """Cut ``text`` at a line break near ``fraction``: calibration before, evaluation after."""
    cut = text.find("\n", int(len(text) * fraction))
    cut = len(text) if cut < 0 else cut
    return text[:cut] if split == "calibration" else text[cut:]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one 1-D tensor (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


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
