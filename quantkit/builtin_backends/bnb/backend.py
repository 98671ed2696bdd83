"""bitsandbytes backend: NF4/FP4 (optionally double-quantized) and LLM.int8 through bitsandbytes,
saved in the layout transformers reads and writes (see :mod:`quantkit.builtin_backends.bnb.layers`)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

from quantkit.core.backend import Backend
from .config import BnbConfig, PRESETS
from quantkit.core.capabilities import Capabilities
from quantkit.core.hardware import Hardware
from quantkit.core.config import HF_EXACT_CONFIG_KEY
from quantkit.core.errors import ConfigTypeError
from quantkit.core.linears import replace_linears
from quantkit.core.serialization import CONFIG_NAME, quant_config_of, quantization_config_block, write_safetensors_folder

BNB_HARDWARE = frozenset({Hardware.CUDA, Hardware.ROCM, Hardware.CPU})
NESTED_BLOCKSIZE = 256
"""Block size bitsandbytes uses to quantize the absmax of double quantization."""

log = logging.getLogger("quantkit")


class BnbBackend(Backend):
    name = "bitsandbytes"
    config_class = BnbConfig
    presets = PRESETS
    aliases = ("bnb",)
    capabilities = Capabilities(
        quantize_hardware=BNB_HARDWARE,
        inference_hardware=BNB_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=True,
        requires=("bitsandbytes",),
        description="NF4/FP4 (optionally double-quantized) and LLM.int8 through bitsandbytes",
    )

    def storage_bits(self, config: BnbConfig, name: str, out_features: int, in_features: int) -> int:
        config = config.for_module(name) if name else config
        n = out_features * in_features
        if config.load_in_8bit:
            return n * 8 + out_features * 32 + 8  # int8 weight, float32 SCB, uint8 weight_format
        blocks = math.ceil(n / config.blocksize)
        bits = math.ceil(n / 2) * 8 + 16 * 32  # two codes per byte, float32 16-entry code book
        if config.use_double_quant:
            bits += blocks * 8 + math.ceil(blocks / NESTED_BLOCKSIZE) * 32 + 256 * 32
        else:
            bits += blocks * 32
        return bits + 8 * len(_quant_state_json(config, out_features, in_features))

    def quantize(self, model: nn.Module, config: BnbConfig, *, calibration, device) -> nn.Module:
        from .layers import quantize_linear

        _check_config(config)
        device = torch.device(device)
        with torch.no_grad():
            replace_linears(
                model, config, lambda _name, linear, cfg: quantize_linear(linear, cfg, device),
                description=f"bitsandbytes {_describe(config)}",
            )
        return model.to(device)

    def prepare_for_loading(self, model: nn.Module, config: BnbConfig) -> nn.Module:
        from .layers import empty_linear

        _check_config(config)
        return replace_linears(
            model, config, lambda _name, linear, cfg: empty_linear(linear, cfg),
            description="bitsandbytes (loading)", check_weights=False,
        )

    def load_pretrained(self, directory: Path, config: BnbConfig, device: torch.device) -> nn.Module:
        from .layers import sync_int8_statistics

        return sync_int8_statistics(super().load_pretrained(directory, config, device))

    def save_pretrained(self, model: nn.Module, directory: Path) -> None:
        """transformers' bitsandbytes folder; ``quantization_config`` names the linears left
        unquantized exactly and carries the full quantkit config (module overrides, blocksize)."""
        from .layers import QUANTIZED_TYPES

        write_safetensors_folder(model, directory)
        config = quant_config_of(model)
        if len({type(m) for m in model.modules() if isinstance(m, QUANTIZED_TYPES)}) > 1:
            log.warning("this model mixes 4-bit and 8-bit layers: quantkit.load reads it, transformers cannot")
        block = quantization_config_block(config)
        block["llm_int8_skip_modules"] = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
        block[HF_EXACT_CONFIG_KEY] = config.to_dict()
        path = directory / CONFIG_NAME
        raw = json.loads(path.read_text())
        raw["quantization_config"] = block
        path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _check_config(config: object) -> None:
    if not isinstance(config, BnbConfig):
        raise ConfigTypeError("BnbBackend", "config", config, "BnbConfig")


def _describe(config: BnbConfig) -> str:
    if config.load_in_8bit:
        return "LLM.int8"
    return config.quant_type.upper() + (" + double quant" if config.use_double_quant else "")


def _quant_state_json(config: BnbConfig, out_features: int, in_features: int) -> str:
    """The JSON bitsandbytes packs into ``weight.quant_state.bitsandbytes__<type>`` (its nested
    offset is a float of typical length: the size is exact to a few bytes)."""
    state = {"quant_type": config.quant_type, "blocksize": config.blocksize, "dtype": "float32",
             "shape": [out_features, in_features]}
    if config.use_double_quant:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=0.012345678901234567)
    return json.dumps(state)
