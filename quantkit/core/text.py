"""Text sources: the :class:`Dataset` record plugins register, local text files, splits, tokens."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelFormatError

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
