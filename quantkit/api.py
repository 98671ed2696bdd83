"""The public entry points: quantize, save, load, backends."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import calibration_tokens
from .core.atomic import atomic_path, recover
from .core.backend import Backend
from .core.config import QuantConfig
from .core.dispatch import set_kernel
from .core.errors import ModelFormatError, QuantizationError, QuantkitError
from .core.hardware import hardware_of, resolve_device
from .core.registry import get_registry
from .core.resolve import as_config, config_from_hf_dict
from .core.serialization import (
    BACKEND_ATTR,
    CONFIG_ATTR,
    CONFIG_NAME,
    format_errors,
    quant_config_of,
    read_config,
    write_safetensors_folder,
)
from .core.text import tokenize
from .estimate import QuantizeEstimate, estimate_quantization, format_seconds
from .formats.checkpoints import check_format, checkpoint_of, load_compressed_tensors
from .formats.compressed_tensors import QUANT_METHOD as CT_METHOD
from .layerwise import SPILL_ATTR
from .memory_budget import plan_memory

log = logging.getLogger("quantkit")

ANNOUNCE_SECONDS = 30.0
"""A quantization predicted to take longer prints its prediction even where logging is off."""


def quantize(
    model: nn.Module,
    config: QuantConfig | Mapping[str, Any] | bool | str,
    *,
    calibration: torch.Tensor | str | os.PathLike | Sequence[str] | None = None,
    device: torch.device | str | None = None,
    tokenizer: Any = None,
    max_memory: int | str | None = None,
) -> nn.Module:
    """Quantize ``model`` with the backend its config names and return it.

    ``config`` is a :class:`QuantConfig`, a config dict, ``True`` (4-bit NF4
    with double quantization) or a preset name. ``calibration`` (for methods
    that need it) is a tensor of token ids ``(nsamples, seqlen)``, a dataset
    name or text file, or a list of texts; ``None`` uses the config's
    ``dataset`` or the built-in text. Text needs ``tokenizer`` (by default the
    one saved beside the model). ``device`` defaults to the best one present;
    a backend that does not declare its hardware raises
    :class:`UnsupportedHardwareError` — quantkit never skips quantization.

    ``max_memory`` (bytes, or a size such as ``"3GiB"``, ``"4GB"``) is a budget for the peak
    memory: the run keeps the calibration activations on disk (in the temporary folder) when
    they would pass it, and raises :class:`~quantkit.core.errors.MemoryBudgetError` before any
    heavy work, naming the smallest budget that would work, when it would pass it anyway
    (:func:`quantkit.memory_budget.plan_memory`).

    Before it starts, the predicted time and peak memory
    (:func:`quantkit.estimate_quantization`) are logged (logger
    ``quantkit``, INFO) and, above :data:`ANNOUNCE_SECONDS`, printed to stderr
    unless that logging shows or ``QUANTKIT_QUIET`` is set.
    """
    config = as_config(config)
    done_before = getattr(model, CONFIG_ATTR, None)
    if done_before is not None:
        raise QuantizationError(
            f"this model is already quantized ({done_before.quant_method}); quantize the float model "
            "instead, e.g. model, tokenizer = quantkit.models.load_model() for the embedded SmolLM2-135M"
        )
    device = resolve_device(device)
    backend = get_registry().backend_for(config, hardware_of(device))
    tokens = None
    if backend.needs_calibration(config):
        tokens = calibration_ids(model, config, calibration, tokenizer)
    elif calibration is not None:
        log.info("%s needs no calibration data; ignoring it", backend.name)
    plan = plan_memory(model, config, max_memory, tokens, streaming=False, device=device)
    shape = {} if tokens is None else {"nsamples": tokens.shape[0], "seqlen": tokens.shape[1]}
    prediction = estimate_quantization(model, config, device=device, spill=plan.spill, **shape)
    shown = _announce(prediction)
    start = time.perf_counter()
    if plan.spill:
        setattr(model, SPILL_ATTR, tempfile.gettempdir())
    try:
        quantized = backend.quantize(model, config, calibration=tokens, device=device)
    finally:
        if plan.spill:
            delattr(model, SPILL_ATTR)
    model = quantized
    done = f"{config.quant_method}: quantized in {format_seconds(time.perf_counter() - start)}"
    log.info("%s (predicted %s)", done, format_seconds(prediction.seconds))
    if shown:
        print(f"quantkit: {done}", file=sys.stderr, flush=True)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, BACKEND_ATTR, backend.name)
    return model


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    format: str | None = None,
    allow_lossy: bool = False,
) -> Path:
    """Save a quantized model atomically: a folder, or a single file (``x.gguf``).

    ``tokenizer`` is saved beside the weights (single-file formats embed it). ``format`` (a folder
    only) writes a GPTQ, AWQ or round-to-nearest model in another format than its backend's own:
    ``"gptq"``, ``"awq"`` or ``"compressed-tensors"`` (vLLM's ``pack-quantized``). Layers that format
    cannot hold exactly are refused with the reason unless ``allow_lossy``, which re-quantizes them
    by round-to-nearest (:func:`quantkit.formats.grid.fit`).
    """
    path = Path(path)
    backend = _backend_of(model)
    if format is not None and format != backend.config_class.quant_method:
        block, tensors = checkpoint_of(model, check_format(format), allow_lossy=allow_lossy)
        with atomic_path(path, directory=True) as tmp:
            write_safetensors_folder(model, tmp, block, tensors)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        return path
    suffix_owner = get_registry().backend_for_suffix(path.suffix)
    if suffix_owner is not None and suffix_owner is not backend:
        raise QuantkitError(
            f"{path.suffix} files are written by backend {suffix_owner.name!r}; this model was "
            f"quantized by {backend.name!r}: save it to a folder or quantize with {suffix_owner.name!r}"
        )
    if suffix_owner is not None:
        with atomic_path(path, directory=False) as tmp:
            backend.save_file(model, tmp, tokenizer=tokenizer)
        return path
    if not backend.capabilities.serializable:
        raise QuantkitError(f"backend {backend.name!r} declares serializable=False")
    with atomic_path(path, directory=True) as tmp:
        backend.save_pretrained(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def load(path: str | os.PathLike, device: torch.device | str | None = None, *, kernel: str | None = None) -> nn.Module:
    """Load a model saved by :func:`save` (or a transformers bnb/gptq/awq folder, or a
    compressed-tensors ``pack-quantized`` one, read into GPTQ layers where they hold it exactly).

    Each quantized linear runs the fastest registered kernel that can serve it on its device
    (``quantkit backends --kernels`` lists them); ``kernel`` forces one by name on all of them,
    refused with :class:`~quantkit.core.kernels.KernelUnavailableError` (the reason, and the
    kernels that can) where it cannot serve a layer.
    """
    path = Path(path)
    recover(path)
    device = resolve_device(device)
    registry = get_registry()
    if not path.exists():
        raise ModelFormatError(f"{str(path)!r} does not exist")
    if path.is_file():
        backend = registry.backend_for_suffix(path.suffix, hardware_of(device))
        if backend is None:
            raise ModelFormatError(f"{str(path)!r}: no backend reads {path.suffix or 'suffix-less'} files")
        model = backend.load_file(path, device)
        config = quant_config_of(model)
    else:
        with format_errors(path / CONFIG_NAME):
            block = read_config(path)["quantization_config"]
        if block.get("quant_method") == CT_METHOD:
            with format_errors(path):
                model, config = load_compressed_tensors(path, block)
            backend = registry.backend_for(config, hardware_of(device), purpose="inference")
            model = model.to(device)
        else:
            with format_errors(path / CONFIG_NAME):
                config = config_from_hf_dict(block)
            backend = registry.backend_for(config, hardware_of(device), purpose="inference")
            with format_errors(path):
                model = backend.load_pretrained(path, config, device)
    if kernel is not None:
        set_kernel(model, kernel)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, BACKEND_ATTR, backend.name)
    return model


def backends() -> list[Backend]:
    """Every registered backend, available or not."""
    return list(get_registry().backends.values())


def _announce(prediction: QuantizeEstimate) -> bool:
    """Log the prediction; print it too when it is long and logging would not show it."""
    log.info("%s", prediction.summary())
    shown = (
        prediction.seconds > ANNOUNCE_SECONDS
        and not log.isEnabledFor(logging.INFO)
        and not os.environ.get("QUANTKIT_QUIET")
    )
    if shown:
        hint = " (a smaller nsamples shortens it)" if prediction.calibration else ""
        print(f"quantkit: {prediction.summary()}{hint}", file=sys.stderr, flush=True)
    return shown


def _backend_of(model: nn.Module) -> Backend:
    quant_config_of(model)
    name = getattr(model, BACKEND_ATTR)
    return get_registry().backends[name]


def calibration_ids(model: nn.Module, config: QuantConfig, calibration: Any, tokenizer: Any) -> torch.Tensor:
    """The calibration token ids ``(nsamples, seqlen)`` :func:`quantize` uses for ``calibration`` (ids, texts,
    a dataset name or file; ``None``: the built-in text), tokenized by ``tokenizer`` or the model's own."""
    nsamples, seqlen = getattr(config, "nsamples", 128), getattr(config, "seqlen", 512)
    if isinstance(calibration, torch.Tensor):
        if calibration.dtype != torch.long or calibration.dim() != 2:
            raise QuantizationError(
                f"calibration tensor must be token ids of shape (nsamples, seqlen), dtype long; "
                f"got {tuple(calibration.shape)} {calibration.dtype}"
            )
        return calibration
    tokenizer = tokenizer or model_tokenizer(model)
    if isinstance(calibration, Sequence) and not isinstance(calibration, str):
        ids = [tokenize(tokenizer, text)[:seqlen] for text in calibration]
        short = [len(i) for i in ids if len(i) < seqlen]
        if short or not ids:
            raise QuantizationError(
                f"every calibration text must reach seqlen={seqlen} tokens; {len(short)} of {len(ids)} are shorter"
            )
        return torch.stack(ids)
    source = calibration or getattr(config, "dataset", None)
    return calibration_tokens(tokenizer, source, nsamples=nsamples, seqlen=seqlen)


def model_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved where ``model`` was loaded from (``name_or_path``); QuantizationError if none."""
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise QuantizationError(
            f"calibration text needs a tokenizer and none was found at {source!r}; "
            "pass tokenizer= or token ids as calibration="
        ) from exc
