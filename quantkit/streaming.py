"""Quantizing a checkpoint larger than memory: calibration-free backends, linear by linear,
from the float shards on disk to the quantized shards on disk.

:func:`quantize_streaming` reads the float checkpoint one module at a time
(:class:`~quantkit.core.streamed_checkpoints.StreamedCheckpoint`), quantizes each linear with
the backend's :meth:`~quantkit.core.backend.Backend.quantize_linear`, copies the other tensors
through and writes every tensor as it comes (:class:`~quantkit.core.shard_writer.ShardWriter`):
the folder :func:`quantkit.save` writes for the same model and config, sharded above
``max_shard_bytes``, which :func:`quantkit.load` reads. Memory holds one module's float
tensors and its quantized form at a time.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.atomic import atomic_path
from .core.backend import Backend
from .core.config import QuantConfig
from .core.errors import QuantizationError
from .core.hardware import hardware_of, resolve_device
from .core.linears import Target, check_finite
from .core.progress import track
from .core.registry import get_registry
from .core.resolve import as_config
from .core.serialization import write_config
from .core.shard_writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter
from .core.streamed_checkpoints import StreamedCheckpoint
from .estimate import format_seconds

log = logging.getLogger("quantkit")

TEMPLATE_METHODS = ("quantize", "save_pretrained", "load_pretrained", "saved_tensors")
"""A backend streams when it quantizes, saves and loads through these template methods of
:class:`Backend` unchanged (its quantized model is its :meth:`~Backend.quantize_linear` modules)."""
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
"""Files of the float checkpoint copied beside the quantized weights when present."""


def quantize_streaming(
    model_folder: str | os.PathLike,
    config: QuantConfig | Mapping[str, Any] | str,
    out_folder: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    device: torch.device | str | None = None,
) -> Path:
    """Quantize the float checkpoint folder ``model_folder`` (``model.safetensors`` or shards
    and their index; float32, float16 or bfloat16) into ``out_folder``, atomically, never holding
    the whole model; return ``out_folder``.

    ``config`` (a :class:`QuantConfig`, dict or preset name) must name a calibration-free
    backend that quantizes through the template (:data:`TEMPLATE_METHODS`: RTN, EETQ); others
    raise :class:`QuantizationError` listing those that can. The folder is checked whole before
    anything is written: a damaged one raises :class:`~quantkit.ModelFormatError` and leaves no
    output. Tokenizer and generation files (:data:`COPIED_FILES`) are copied through.
    """
    config = as_config(config)
    device = resolve_device(device)
    registry = get_registry()
    backend = registry.backend_for(config, hardware_of(device))
    if not streams(backend):
        able = sorted(name for name, b in registry.backends.items() if streams(b))
        raise QuantizationError(
            f"backend {backend.name!r} cannot quantize a streamed checkpoint (it calibrates, or quantizes, "
            f"saves or loads in a way of its own); backends that can: {', '.join(able)}"
        )
    source, out = Path(model_folder), Path(out_folder)
    start = time.perf_counter()
    with StreamedCheckpoint(source) as checkpoint:
        targets = {t.name: t for t in backend.targets(checkpoint.model, config, check_weights=False)}
        block = backend.quantization_config_block(checkpoint.model, config)
        with atomic_path(out, directory=True) as tmp:
            writer = ShardWriter(tmp, max_shard_bytes)
            for module, names in track(checkpoint.modules(), f"{backend.name} (streaming)"):
                _stream_module(checkpoint, names, targets.get(module), backend, writer, device)
            writer.finish()
            write_config(checkpoint.model, tmp, block)
            for name in COPIED_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
    log.info("%s: streamed %s in %s", config.quant_method, source, format_seconds(time.perf_counter() - start))
    return out


def streams(backend: Backend) -> bool:
    """Whether ``backend`` can quantize a streamed checkpoint (see :data:`TEMPLATE_METHODS`)."""
    cls = type(backend)
    return cls.quantize_linear is not Backend.quantize_linear and all(
        getattr(cls, method) is getattr(Backend, method) for method in TEMPLATE_METHODS
    )


def _stream_module(
    checkpoint: StreamedCheckpoint,
    names: list[str],
    target: Target | None,
    backend: Backend,
    writer: ShardWriter,
    device: torch.device,
) -> None:
    """Write the tensors ``names`` of one module, quantized when it is a ``target``; they are all
    released on return (a function, so that no loop variable keeps one alive)."""
    with checkpoint.tensors(names) as tensors:
        written = tensors if target is None else _quantized(backend, target, tensors, device)
        for name, tensor in written.items():
            writer.add(name, tensor)


def _quantized(
    backend: Backend, target: Target, tensors: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """The tensors of ``target``'s quantized module, from its float ``tensors`` (full names)."""
    name, meta, config = target
    linear = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
    linear.load_state_dict({key.rpartition(".")[2]: tensor for key, tensor in tensors.items()}, assign=True)
    check_finite(name, linear.weight)
    with torch.no_grad():
        module = backend.quantize_linear(name, linear, config, device)
    return {f"{name}.{key}": tensor for key, tensor in module.state_dict().items()}
