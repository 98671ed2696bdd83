"""Saving and loading quantized models: atomic writes, safetensors only, never pickle."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import QuantConfig
from .errors import ModelFormatError, QuantkitError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
CONFIG_ATTR = "quantkit_config"
BACKEND_ATTR = "quantkit_backend"


def quant_config_of(model: nn.Module) -> QuantConfig:
    """The config ``model`` was quantized with (set by ``quantkit.quantize``/``load``)."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise QuantkitError(f"{type(model).__name__} was not quantized by quantkit; call quantkit.quantize first")
    return config


@contextmanager
def atomic_path(path: Path, *, directory: bool):
    """Yield a temporary sibling of ``path``; move it into place only on success.

    An existing ``path`` is replaced only after the new one is complete, so an
    interrupted save leaves the old model (or nothing) — never half a model. What is
    moved into place gets the modes the umask gives new files and folders (the
    temporary folder itself is private while it is written).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp if directory else tmp / path.name
    try:
        umask = _umask(tmp)
        yield target
        _apply_umask(target, umask)
        if directory and path.is_dir():
            backup = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, backup)
            os.replace(tmp, path)
            shutil.rmtree(backup)
        elif directory:
            os.replace(tmp, path)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask(scratch: Path) -> int:
    """The process umask, read from the mode of a new folder in the empty folder ``scratch``
    (``os.umask`` can only be read by setting it, which races with threads creating files)."""
    probe = scratch / "umask-probe"
    probe.mkdir(0o777)
    try:
        return 0o777 & ~stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.rmdir()


def _apply_umask(target: Path, umask: int) -> None:
    """Give ``target`` (a file, or a folder and everything in it) the modes new ones get."""
    for item in reversed([target, *target.rglob("*")] if target.is_dir() else [target]):
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without second copies of tied tensors, made contiguous."""
    seen: set[tuple[int, int, tuple]] = set()
    tensors = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors


def write_safetensors_folder(
    model: nn.Module, directory: Path, quantization_config: dict, tensors: dict[str, torch.Tensor]
) -> None:
    """Write ``config.json`` (with the ``quantization_config`` block) and ``tensors`` as ``model.safetensors``."""
    hf_config = model.config.to_dict()
    hf_config["quantization_config"] = quantization_config
    if not hf_config.get("architectures"):
        hf_config["architectures"] = [type(model).__name__]
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)
    # One metadata key only: safetensors stores metadata as a hash map, so several keys
    # would come out in varying order and break byte-for-byte reproducible checkpoints.
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})


def read_config(directory: Path) -> dict:
    """The raw ``config.json`` of a saved quantized model (its ``quantization_config`` checked
    to be a dict; :func:`quantkit.core.resolve.config_from_hf_dict` reads it)."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ModelFormatError(f"{str(directory)!r} has no {CONFIG_NAME}; not a saved model folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{str(path)!r} is not valid JSON: {exc}") from exc
    block = raw.get("quantization_config")
    if not isinstance(block, dict):
        raise ModelFormatError(f"{str(path)!r} has no quantization_config: not a quantized model")
    return raw


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors model, on the CPU."""
    index = directory / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS_NAME]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise ModelFormatError(f"{str(path)!r} is missing")
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFormatError(f"{str(path)!r} is corrupt or truncated: {exc}") from exc
    return tensors


def empty_model(raw_config: dict) -> nn.Module:
    """An uninitialised transformers model of the saved architecture (no weights read)."""
    import transformers
    from transformers.initialization import no_init_weights

    raw_config = {k: v for k, v in raw_config.items() if k != "quantization_config"}
    architectures = raw_config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        raise ModelFormatError(f"config.json names no known transformers architecture: {architectures}")
    hf_config = transformers.AutoConfig.for_model(**raw_config)
    dtype = getattr(torch, str(raw_config.get("dtype") or raw_config.get("torch_dtype") or "float32"))
    with no_init_weights():
        return cls._from_config(hf_config, dtype=dtype)


def read_safetensors_folder(directory: Path, config: QuantConfig, backend, device: torch.device) -> nn.Module:
    """Rebuild a model saved by :func:`write_safetensors_folder`."""
    raw = read_config(directory)
    tensors = read_tensors(directory)
    model = backend.prepare_for_loading(empty_model(raw), config)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }
    missing = [k for k in result.missing_keys if k not in tied]
    if result.unexpected_keys or missing:
        raise ModelFormatError(
            f"{str(directory)!r} does not match its architecture: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    return model.to(device).eval()
