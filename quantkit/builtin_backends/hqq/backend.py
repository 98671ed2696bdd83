"""HQQ backend: half-quadratic quantization through hqq's ``HQQLinear``, saved as safetensors
in quantkit's own layout (:mod:`quantkit.builtin_backends.hqq.layout`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from quantkit.core.backend import Backend
from quantkit.core.capabilities import Capabilities
from quantkit.core.config import QuantConfig
from quantkit.core.errors import ConfigValueError, ModelFormatError
from quantkit.core.hardware import Hardware
from quantkit.core.safetensors_files import load_tensors
from quantkit.core.serialization import check_stored, fill, read_checkpoint

from .config import PRESETS, HQQConfig
from .layers import HQQLayer, quantize_linear, saved_linear
from .layout import HQQ_SHAPE_LIMITS, META_SUFFIX, layer_tensors, pop_layer, stored_bits
from .quantizer import SLAB_WORKING_BYTES

HQQ_HARDWARE = frozenset({Hardware.CUDA, Hardware.CPU})


class HQQBackend(Backend):
    name = "hqq"
    config_class = HQQConfig
    presets = PRESETS
    streams_modules = True
    capabilities = Capabilities(
        quantize_hardware=HQQ_HARDWARE,
        inference_hardware=HQQ_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=True,
        requires=("hqq",),
        description="half-quadratic quantization through the hqq library",
        merges_adapters=True,
        peft_native=True,
        shape_limits=HQQ_SHAPE_LIMITS,
    )

    def storage_bits(self, config: HQQConfig, name: str, out_features: int, in_features: int) -> int:
        return stored_bits(config, out_features, in_features)

    def check_config(self, config: QuantConfig) -> None:
        """What hqq 0.2.8 cannot do, refused before any layer is touched (overrides included)."""
        super().check_config(config)
        variants = [("", config)] + [
            (f"module_overrides[{pattern!r}].", dataclasses.replace(config, **partial, module_overrides={}))
            for pattern, partial in config.module_overrides.items()
        ]
        for prefix, cfg in variants:
            for field in ("quant_zero", "quant_scale"):
                if getattr(cfg, field):
                    raise ConfigValueError(
                        "HQQConfig",
                        prefix + field,
                        True,
                        "False (hqq 0.2.8 ignores quantized zero/scale meta-data: deprecated upstream)",
                    )
            if cfg.compute_dtype != config.compute_dtype:
                raise ConfigValueError(
                    "HQQConfig",
                    prefix + "compute_dtype",
                    cfg.compute_dtype,
                    f"{config.compute_dtype!r}, the model's (HQQLinear takes inputs of its compute dtype)",
                )

    def working_bytes(self, config: HQQConfig, out_features: int, in_features: int) -> int:
        """Besides the packed copy: the 8-bit codes and the packing's temporaries (1.5 bytes a
        weight; 2.5 on axis 0, whose codes are transposed first), the optimizer's float32 scales and
        zero-points, and the slab temporaries of each thread. Measured peaks, packed copy included, 0.87-1.02x of
        this with it at 576 x 1536 to 14336 x 4096 (bfloat16, 4-bit g64, 2 threads)."""
        weights = out_features * in_features
        codes = (2.5 if config.axis == 0 else 1.5) * weights
        return int(codes) + 8 * (weights // config.group_size) + SLAB_WORKING_BYTES * torch.get_num_threads()

    def quantize_linear(self, name: str, linear: nn.Linear, config: HQQConfig, device: torch.device) -> nn.Module:
        return quantize_linear(linear, config, device)

    def placed_dtype(self, config: HQQConfig) -> torch.dtype:
        """``config.compute_dtype``: ``HQQLinear`` takes inputs of its compute dtype, so the rest of
        the model is cast too (as hqq's own model loaders do)."""
        return getattr(torch, config.compute_dtype)

    def module_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor] | None:
        """An HQQ linear in quantkit's layout; every other module as it is."""
        if not isinstance(module, HQQLayer):
            return None
        return layer_tensors(name, module.W_q, module.meta, module.bias)

    def load_pretrained(self, directory: Path, config: HQQConfig, device: torch.device) -> nn.Module:
        self.check_config(config)
        device = torch.device(device)
        stored, model = read_checkpoint(directory)
        targets = self.targets(model, config, check_weights=False)
        check_stored(model, stored)
        tensors = load_tensors(stored)
        try:
            layers = {
                name: saved_linear(cfg, *pop_layer(name, cfg, linear.out_features, linear.in_features, tensors), device)
                for name, linear, cfg in targets
            }
        except ModelFormatError as exc:
            raise ModelFormatError(f"{str(directory)!r}: {exc}") from exc
        extra = sorted(k for k in tensors if k.endswith("." + META_SUFFIX))
        if extra:
            raise ModelFormatError(
                f"{str(directory)!r} holds HQQ layers its quantization_config does not quantize: {extra[:5]}"
            )
        return self.place(fill(model, tensors, directory, layers), config, device).eval()
