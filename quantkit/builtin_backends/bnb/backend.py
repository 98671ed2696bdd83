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
from quantkit.core.capabilities import Capabilities
from quantkit.core.config import HF_EXACT_CONFIG_KEY
from quantkit.core.hardware import Hardware

from .config import PRESETS, BnbConfig
from .layers import (
    Bnb4bit,
    Bnb8bit,
    empty_linear,
    mixes_4bit_and_8bit,
    quantize_linear,
    quantized_linears,
    sync_int8_statistics,
)

BNB_HARDWARE = frozenset({Hardware.CUDA, Hardware.ROCM, Hardware.CPU})
NESTED_BLOCKSIZE = 256
"""Block size bitsandbytes uses to quantize the absmax of double quantization."""

log = logging.getLogger("quantkit")


class BnbBackend(Backend):
    name = "bitsandbytes"
    config_class = BnbConfig
    presets = PRESETS
    aliases = ("bnb",)
    streams_modules = True
    layer_classes = (Bnb4bit, Bnb8bit)
    capabilities = Capabilities(
        quantize_hardware=BNB_HARDWARE,
        inference_hardware=BNB_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=True,
        requires=("bitsandbytes",),
        description="NF4/FP4 (optionally double-quantized) and LLM.int8 through bitsandbytes",
        # peft's merge into quantkit's bnb layers fails (they lack transformers' is_loaded_in_4bit
        # flags, so peft wraps them as plain linears): refused until that path is fixed and tested
        merges_adapters=False,
        peft_native=True,
    )

    def storage_bits(self, config: BnbConfig, name: str, out_features: int, in_features: int) -> int:
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

    def deterministic(self, config: BnbConfig) -> bool:
        """LLM.int8 is declared not: its outlier threshold turns tiny float differences into visible
        ones (perplexity 11.722 committed, 11.737 on another machine); 4-bit is."""
        return not config.load_in_8bit

    def working_bytes(self, config: BnbConfig, out_features: int, in_features: int) -> int:
        """bitsandbytes' quantize on the CPU: 14 bytes per weight (a float32 copy, its normalized
        copy, codes and temporaries; measured 13.7-14.5 besides the quantized copy for NF4 at 512 x
        2048, 2048 x 8192 and 4096 x 14336)."""
        return 14 * out_features * in_features

    def quantize_linear(self, name: str, linear: nn.Linear, config: BnbConfig, device: torch.device) -> nn.Module:
        return quantize_linear(linear, config, device)

    def empty_module(self, name: str, linear: nn.Linear, config: BnbConfig) -> nn.Module:
        return empty_linear(linear, config)

    def load_pretrained(self, directory: Path, config: BnbConfig, device: torch.device) -> nn.Module:
        return sync_int8_statistics(super().load_pretrained(directory, config, device))

    def quantization_config_block(self, model: nn.Module, config: BnbConfig) -> dict:
        """transformers' bitsandbytes block, naming the linears left unquantized exactly and
        carrying the full quantkit config (module overrides, blocksize)."""
        # the float model when streaming: its targets are the linears quantized
        targets = [] if quantized_linears(model) else self.targets(model, config, check_weights=False)
        if mixes_4bit_and_8bit(model, targets):
            log.warning("this model mixes 4-bit and 8-bit layers: quantkit.load reads it, transformers cannot")
        quantized = {name for name, _, _ in targets}
        block = super().quantization_config_block(model, config)
        block["llm_int8_skip_modules"] = sorted(
            n for n, m in model.named_modules() if type(m) is nn.Linear and n not in quantized
        )
        block[HF_EXACT_CONFIG_KEY] = config.to_dict()
        return block


def _quant_state_json(config: BnbConfig, out_features: int, in_features: int) -> str:
    """The JSON bitsandbytes packs into ``weight.quant_state.bitsandbytes__<type>`` (its nested
    offset is a float of typical length: the size is exact to a few bytes)."""
    state = {
        "quant_type": config.quant_type,
        "blocksize": config.blocksize,
        "dtype": "float32",
        "shape": [out_features, in_features],
    }
    if config.use_double_quant:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=0.012345678901234567)
    return json.dumps(state)
