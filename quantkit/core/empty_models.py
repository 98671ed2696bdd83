"""The empty transformers model a saved ``config.json`` describes, built on the meta device.

Nothing in the folder is trusted before it is checked: the architecture must be a class
transformers ships (no ``auto_map``, never remote code), its sizes must be plain positive
integers that the stored tensors can hold, and the build itself is stopped as soon as it
makes more modules or weights than those tensors could fill. Parameters stay on the meta
device (no memory allocated, none initialised) until loading assigns the stored tensors; the
non-persistent buffers computed from the config (rotary ``inv_freq``, ...) are materialised
on the CPU, as transformers' own loading does, once their size is known to be small.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import nn

from .errors import ModelFormatError, QuantkitError
from .safetensors_files import StoredTensor

SIZE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
"""config.json sizes checked before any module is built (when present and not null)."""
DTYPES = ("float32", "float16", "bfloat16", "float64")
BUFFER_BYTES = 64 * 2**20
"""Non-persistent buffers (computed, not stored) may take this much beyond the stored bytes."""
MODULES_PER_TENSOR = 8
"""A build may register at most this many modules per stored tensor (plus :data:`SPARE_MODULES`)."""
SPARE_MODULES = 256

_BUILD_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError, RuntimeError)
"""What transformers' config classes and model constructors raise on values they cannot use
(``RuntimeError`` includes torch's negative dimensions and ``NotImplementedError``)."""
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def empty_model(
    raw_config: Mapping, *, stored: Mapping[str, StoredTensor] | None = None, source: str = "config.json"
) -> nn.Module:
    """The model ``raw_config`` (a ``config.json`` dict) describes, parameters on the meta device.

    With ``stored`` (the tensors the folder holds), the config's sizes are checked against
    them first and the build is bounded by them; ``source`` names the file in errors.
    """
    import transformers
    from huggingface_hub.errors import StrictDataclassError
    from transformers.initialization import no_init_weights

    raw = {k: v for k, v in raw_config.items() if k != "quantization_config"}
    cls = _architecture(raw, source)
    dtype = _dtype(raw, source)
    if stored is not None:
        check_sizes(raw, stored, source)
    try:
        hf_config = transformers.AutoConfig.for_model(**raw)
    except (*_BUILD_ERRORS, StrictDataclassError) as exc:
        raise ModelFormatError(f"{source!r}: transformers refuses this {raw['model_type']} config: {exc}") from exc
    if not isinstance(hf_config, cls.config_class):
        raise ModelFormatError(
            f"{source!r}: architectures names {cls.__name__}, which takes a {cls.config_class.__name__}; "
            f"model_type={raw['model_type']!r} gives a {type(hf_config).__name__}"
        )
    try:
        with _bounded(stored, source), torch.device("meta"), no_init_weights():
            model = cls._from_config(hf_config, dtype=dtype)
        model.tie_weights()
    except QuantkitError:
        raise
    except (*_BUILD_ERRORS, StrictDataclassError) as exc:
        raise ModelFormatError(f"{source!r}: transformers cannot build {cls.__name__} from it: {exc}") from exc
    _materialise_buffers(model, stored, source)
    return model


def check_sizes(raw: Mapping, stored: Mapping[str, StoredTensor], source: str) -> None:
    """Refuse :data:`SIZE_FIELDS` that are not positive integers or that ask for more than the
    stored tensors hold: more numbered layers than they number, or more weights than one bit
    each of their bytes could encode."""
    bits = 8 * sum(entry.nbytes for entry in stored.values())
    numbered = 1 + max((int(n) for key in stored for n in _LAYER_INDEX.findall(key)), default=-1)
    sizes = {}
    for field in SIZE_FIELDS:
        value = raw.get(field)
        if value is None:
            continue
        bound, what = (
            (numbered, "layers the stored tensors number") if field == "num_hidden_layers" else (bits, "bits stored")
        )
        if type(value) is not int or not 0 < value <= bound:
            raise ModelFormatError(
                f"{source!r}: {field}={value!r}; expected a positive integer, at most the {bound} {what}"
            )
        sizes[field] = value
    layers, hidden = sizes.get("num_hidden_layers", 0), sizes.get("hidden_size", 1)
    weights = hidden * (sizes.get("vocab_size", 0) + layers)
    if weights > bits:
        raise ModelFormatError(
            f"{source!r}: hidden_size={hidden}, vocab_size={sizes.get('vocab_size')} and num_hidden_layers={layers} "
            f"imply at least {weights} weights; the {bits // 8} stored bytes cannot hold them"
        )


def _architecture(raw: dict, source: str) -> type:
    """The transformers class ``architectures[0]`` names (checked against ``model_type``)."""
    import transformers

    if "auto_map" in raw:
        raise ModelFormatError(
            f"{source!r} has auto_map: it asks for code shipped with the checkpoint, which quantkit never runs"
        )
    model_type, architectures = raw.get("model_type"), raw.get("architectures")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise ModelFormatError(f"{source!r}: model_type={model_type!r} is not a model type transformers knows")
    if not (isinstance(architectures, list) and architectures and isinstance(architectures[0], str)):
        raise ModelFormatError(f"{source!r}: architectures={architectures!r}; expected a list of class names")
    name = architectures[0]
    try:
        cls = getattr(transformers, name) if name.isidentifier() and not name.startswith("_") else None
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) and cls.config_class):
        raise ModelFormatError(
            f"{source!r}: architectures[0]={name!r} is not a transformers model class "
            "(custom architectures are refused: quantkit never runs code from a checkpoint)"
        )
    return cls


def _dtype(raw: dict, source: str) -> torch.dtype:
    field = "dtype" if raw.get("dtype") is not None else "torch_dtype"
    value = raw.get(field) or "float32"
    if value not in DTYPES:
        raise ModelFormatError(f"{source!r}: {field}={value!r}; allowed: {', '.join(DTYPES)}")
    return getattr(torch, value)


@contextmanager
def _bounded(stored: Mapping[str, StoredTensor] | None, source: str):
    """Stop a model build (in this thread) that registers more modules or parameter elements than
    ``stored`` could fill: the backstop for sizes :func:`check_sizes` does not know by name."""
    if stored is None:
        yield
        return
    thread = threading.get_ident()
    weights = 8 * sum(entry.nbytes for entry in stored.values()) + 2**20
    modules = MODULES_PER_TENSOR * len(stored) + SPARE_MODULES
    count = {"modules": 0, "weights": 0}

    def on_module(_parent, _name, _module):
        if threading.get_ident() == thread:
            count["modules"] += 1
            if count["modules"] > modules:
                raise ModelFormatError(
                    f"{source!r} describes a model of more than {modules} modules; the {len(stored)} stored tensors "
                    "cannot fill it"
                )

    def on_parameter(_module, _name, parameter):
        if threading.get_ident() == thread and parameter is not None:
            count["weights"] += parameter.numel()
            if count["weights"] > weights:
                raise ModelFormatError(
                    f"{source!r} describes a model of more than {weights} weights; the stored tensors hold "
                    f"{weights - 2**20} bits"
                )

    handles = [
        nn.modules.module.register_module_module_registration_hook(on_module),
        nn.modules.module.register_module_parameter_registration_hook(on_parameter),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _materialise_buffers(model: nn.Module, stored: Mapping[str, StoredTensor] | None, source: str) -> None:
    """Give the non-persistent buffers (computed from the config, never stored) real CPU memory and
    let transformers compute them, as its own meta-device loading does."""
    buffers = [(key, buffer) for key, buffer in model.named_non_persistent_buffers() if buffer.is_meta]
    limit = BUFFER_BYTES + sum(entry.nbytes for entry in (stored or {}).values())
    needed = sum(buffer.numel() * buffer.element_size() for _, buffer in buffers)
    if stored is not None and needed > limit:
        raise ModelFormatError(f"{source!r}: its computed buffers would take {needed} bytes; at most {limit} allowed")
    owners = {}
    for key, buffer in buffers:
        owner_name, _, name = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner.register_buffer(name, torch.empty_like(buffer, device="cpu"), persistent=False)
        owners[id(owner)] = owner
    try:
        for owner in owners.values():
            model._init_weights(owner)
    except _BUILD_ERRORS as exc:
        raise ModelFormatError(
            f"{source!r}: transformers cannot compute the buffers of {type(model).__name__}: {exc}"
        ) from exc
