"""Saving and loading quantized models: safetensors only, never pickle.

Loading checks before it allocates: ``config.json`` and the safetensors headers are read and
checked against each other (:mod:`~quantkit.core.safetensors_files`,
:mod:`~quantkit.core.empty_models`), the empty model is built on the meta device, the stored
tensors' dtypes and shapes are compared with its parameters, and only then is tensor data read
and assigned. Every failure is a :class:`ModelFormatError` naming the file and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import QuantConfig
from .config_files import read_json
from .empty_models import empty_model
from .errors import BackendUnavailableError, ModelFormatError, QuantkitError, UnsupportedHardwareError
from .linears import set_submodule
from .safetensors_files import SAFETENSORS_METADATA, WEIGHTS_NAME, StoredTensor, load_tensors, stored_tensors

CONFIG_NAME = "config.json"
MAX_CONFIG_BYTES = 16 * 2**20
"""Largest ``config.json`` read."""
CONFIG_ATTR = "quantkit_config"
BACKEND_ATTR = "quantkit_backend"


def quant_config_of(model: nn.Module) -> QuantConfig:
    """The config ``model`` was quantized with (set by ``quantkit.quantize``/``load``)."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise QuantkitError(f"{type(model).__name__} was not quantized by quantkit; call quantkit.quantize first")
    return config


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
    write_config(model, directory, quantization_config)
    # One metadata key only: safetensors stores metadata as a hash map, so several keys
    # would come out in varying order and break byte-for-byte reproducible checkpoints.
    save_file(tensors, directory / WEIGHTS_NAME, metadata=SAFETENSORS_METADATA)


def write_config(model: nn.Module, directory: Path, quantization_config: dict) -> None:
    """Write ``model``'s ``config.json``, with the ``quantization_config`` block, and its generation config."""
    hf_config = model.config.to_dict()
    hf_config["quantization_config"] = quantization_config
    if not hf_config.get("architectures"):
        hf_config["architectures"] = [type(model).__name__]
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)


def read_config(directory: Path) -> dict:
    """The raw ``config.json`` of a saved quantized model: :func:`read_model_config`, with a
    ``quantization_config`` object (:func:`quantkit.core.resolve.config_from_hf_dict` reads that)."""
    raw = read_model_config(directory)
    if not isinstance(raw.get("quantization_config"), dict):
        raise ModelFormatError(f"{str(directory / CONFIG_NAME)!r} has no quantization_config: not a quantized model")
    return raw


def read_model_config(directory: Path) -> dict:
    """The raw ``config.json`` of a model folder: strict UTF-8, bounded size and nesting, an object."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ModelFormatError(f"{str(directory)!r} has no {CONFIG_NAME}; not a saved model folder")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelFormatError(f"{str(path)!r} is {path.stat().st_size} bytes; at most {MAX_CONFIG_BYTES} are read")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{str(path)!r} holds a {type(raw).__name__}; expected a JSON object")
    return raw


@contextmanager
def format_errors(source: Path) -> Iterator[None]:
    """Re-raise the quantkit errors that reading ``source`` causes (a config value it holds, a
    shape limit its layers break) as :class:`ModelFormatError` errors naming it; those about this
    machine (an unavailable backend, unsupported hardware) pass unchanged."""
    try:
        yield
    except (ModelFormatError, BackendUnavailableError, UnsupportedHardwareError):
        raise
    except QuantkitError as exc:
        raise ModelFormatError(f"{str(source)!r}: {type(exc).__name__}: {exc}") from exc


def read_checkpoint(directory: Path) -> tuple[dict[str, StoredTensor], nn.Module]:
    """A saved folder's stored tensors (headers only) and the empty model its ``config.json``
    describes, each checked against the other before any tensor data is read."""
    raw = read_config(directory)
    stored = stored_tensors(directory)
    return stored, empty_model(raw, stored=stored, source=str(directory / CONFIG_NAME))


def check_stored(model: nn.Module, stored: Mapping[str, StoredTensor]) -> None:
    """Refuse stored tensors whose dtype or shape differs from the parameter or buffer of
    ``model`` (the empty model, quantized modules swapped in) they are loaded into; modules with
    load hooks of their own (a layout that adapts to what is stored) check their tensors themselves."""
    expected = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        if not _loads_itself(module):
            slots = {**module._parameters, **module._buffers}
            expected.update({f"{prefix}.{k}" if prefix else k: t for k, t in slots.items() if t is not None})
    for key, entry in stored.items():
        slot = expected.get(key)
        if slot is not None and (entry.dtype != slot.dtype or tuple(entry.shape) != tuple(slot.shape)):
            raise ModelFormatError(
                f"{str(entry.file)!r}: tensor {key!r} is {entry.dtype} {list(entry.shape)}; "
                f"the architecture and quantization_config expect {slot.dtype} {list(slot.shape)}"
            )


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of ``model``'s parameters that are second names of another (tied weights: never stored)."""
    return {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}


def _loads_itself(module: nn.Module) -> bool:
    return bool(module._load_state_dict_pre_hooks) or (
        type(module)._load_from_state_dict is not nn.Module._load_from_state_dict
    )


def fill(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    directory: Path,
    replaced: Mapping[str, nn.Module] | None = None,
) -> nn.Module:
    """Assign ``tensors`` to the empty ``model``'s parameters and buffers, put the ``replaced``
    modules (loaded by the backend itself) in place and re-tie the weights; every parameter and
    buffer must then be real (no key missing, none unexpected)."""
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except ModelFormatError as exc:  # from a module's load hook, which knows the tensor but not the folder
        raise ModelFormatError(f"{str(directory)!r}: {exc}") from exc
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise ModelFormatError(f"{str(directory)!r}: its tensors do not fit the architecture: {exc}") from exc
    replaced = replaced or {}
    for name, module in replaced.items():
        set_submodule(model, name, module)
    model.tie_weights()
    tied = tied_parameter_names(model)
    missing = [k for k in result.missing_keys if k not in tied and k.rpartition(".")[0] not in replaced]
    if result.unexpected_keys or missing:
        raise ModelFormatError(
            f"{str(directory)!r} does not match its architecture: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    unfilled = [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:
        raise ModelFormatError(f"{str(directory)!r}: nothing was loaded into {unfilled[:5]}")
    return model


def read_safetensors_folder(directory: Path, config: QuantConfig, backend, device: torch.device) -> nn.Module:
    """Rebuild a model saved by :func:`write_safetensors_folder`."""
    stored, model = read_checkpoint(directory)
    model = backend.prepare_for_loading(model, config)
    check_stored(model, stored)
    return fill(model, load_tensors(stored), directory).to(device).eval()
