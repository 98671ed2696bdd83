"""HQQ backend: half-quadratic quantization through hqq's ``HQQLinear``, saved as safetensors
in quantkit's own layout (:mod:`quantkit.builtin_backends.hqq.layout`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from quantkit.core.backend import Backend
from quantkit.core.capabilities import Capabilities
from quantkit.core.hardware import Hardware
from .config import HQQConfig, PRESETS
from quantkit.core.errors import ConfigTypeError, ConfigValueError, ModelFormatError
from quantkit.core.linears import quantizable_linears, replace_linears, set_submodule
from quantkit.core.serialization import empty_model, read_config, read_tensors, unique_state_dict, write_safetensors_folder

from .layout import HQQ_GROUP_MULTIPLE, META_SUFFIX, check_layer, stored_bits

HQQ_HARDWARE = frozenset({Hardware.CUDA, Hardware.CPU})


class HQQBackend(Backend):
    name = "hqq"
    config_class = HQQConfig
    presets = PRESETS
    capabilities = Capabilities(
        quantize_hardware=HQQ_HARDWARE,
        inference_hardware=HQQ_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=True,
        requires=("hqq",),
        description="half-quadratic quantization through the hqq library",
    )

    def storage_bits(self, config: HQQConfig, name: str, out_features: int, in_features: int) -> int:
        return stored_bits(config.for_module(name) if name else config, out_features, in_features)

    def quantize(self, model: nn.Module, config: HQQConfig, *, calibration, device) -> nn.Module:
        """Replace each linear by an ``HQQLinear`` on ``device``.

        ``HQQLinear`` takes inputs of its compute dtype, so the rest of the model is cast to
        ``config.compute_dtype`` (as hqq's own model loaders do).
        """
        from .layers import quantize_linear

        _check_config(config)
        for name, linear, cfg in quantizable_linears(model, config):
            check_layer(name, cfg, linear.out_features, linear.in_features)
        device = torch.device(device)
        with torch.no_grad():
            replace_linears(
                model, config, lambda _name, linear, cfg: quantize_linear(linear, cfg, device),
                description=f"HQQ {config.nbits}-bit",
            )
        return _finish(model, config, device)

    def save_pretrained(self, model: nn.Module, directory: Path) -> None:
        from hqq.core.quantize import HQQLinear

        from .layout import layer_tensors

        layers = {name: m for name, m in model.named_modules() if isinstance(m, HQQLinear)}
        tensors = {k: v for k, v in unique_state_dict(model).items() if k.rpartition(".")[0] not in layers}
        for name, module in layers.items():
            tensors.update(layer_tensors(name, module.W_q, module.meta, module.bias))
        write_safetensors_folder(model, directory, tensors)

    def load_pretrained(self, directory: Path, config: HQQConfig, device: torch.device) -> nn.Module:
        from .layers import saved_linear
        from .layout import pop_layer

        _check_config(config)
        device = torch.device(device)
        raw = read_config(directory)
        tensors = read_tensors(directory)
        model = empty_model(raw)
        layers = {
            name: saved_linear(cfg, *pop_layer(name, cfg, linear.out_features, linear.in_features, tensors), device)
            for name, linear, cfg in quantizable_linears(model, config)
        }
        extra = sorted(k for k in tensors if k.endswith("." + META_SUFFIX))
        if extra:
            raise ModelFormatError(
                f"{str(directory)!r} holds HQQ layers its quantization_config does not quantize: {extra[:5]}"
            )
        result = model.load_state_dict(tensors, strict=False, assign=True)
        for name, module in layers.items():
            set_submodule(model, name, module)
        model.tie_weights()
        tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
        missing = [k for k in result.missing_keys if k not in tied and k.rpartition(".")[0] not in layers]
        if missing or result.unexpected_keys:
            raise ModelFormatError(
                f"{str(directory)!r} does not match its architecture: "
                f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
        return _finish(model, config, device).eval()


def _check_config(config: object) -> None:
    """What hqq 0.2.8 cannot do, refused before any layer is touched (overrides included)."""
    if not isinstance(config, HQQConfig):
        raise ConfigTypeError("HQQBackend", "config", config, "HQQConfig")
    variants = [("", config)] + [
        (f"module_overrides[{pattern!r}].", dataclasses.replace(config, **partial, module_overrides={}))
        for pattern, partial in config.module_overrides.items()
    ]
    for prefix, cfg in variants:
        for field in ("quant_zero", "quant_scale"):
            if getattr(cfg, field):
                raise ConfigValueError(
                    "HQQConfig", prefix + field, True,
                    "False (hqq 0.2.8 ignores quantized zero/scale meta-data: deprecated upstream)",
                )
        if cfg.group_size % HQQ_GROUP_MULTIPLE:
            raise ConfigValueError(
                "HQQConfig", prefix + "group_size", cfg.group_size, "a multiple of 8 (hqq's requirement)"
            )
        if cfg.compute_dtype != config.compute_dtype:
            raise ConfigValueError(
                "HQQConfig", prefix + "compute_dtype", cfg.compute_dtype,
                f"{config.compute_dtype!r}, the model's (HQQLinear takes inputs of its compute dtype)",
            )


def _finish(model: nn.Module, config: HQQConfig, device: torch.device) -> nn.Module:
    """Move the rest of ``model`` to ``device`` and the compute dtype (HQQ layers are there already)."""
    dtype = getattr(torch, config.compute_dtype)
    model.to(device=device, dtype=dtype)
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype
    return model
