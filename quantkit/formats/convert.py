"""``quantkit convert``: a saved GPTQ, AWQ, round-to-nearest or compressed-tensors checkpoint in another
of those formats, exactly or (asked for) re-quantized."""

from __future__ import annotations

import os
from pathlib import Path

from quantkit.api import load, save

from .checkpoints import check_format


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: str, allow_lossy: bool = False) -> Path:
    """Read the quantized checkpoint ``src`` and write it to ``dst`` in format ``to`` (``"gptq"``,
    ``"awq"`` or ``"compressed-tensors"``), with the tokenizer saved beside it, if any.

    Every weight keeps its exact value; a layer the target cannot hold exactly raises
    :class:`~quantkit.formats.grid.LossyConversionError` with the reason unless ``allow_lossy``.
    """
    check_format(to, "convert", "to")
    src = Path(src)
    tokenizer = None
    if (src / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src)
    return save(load(src, "cpu"), dst, tokenizer=tokenizer, format=to, allow_lossy=allow_lossy)
