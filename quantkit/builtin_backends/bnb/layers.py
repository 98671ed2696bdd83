"""bitsandbytes modules: quantize an ``nn.Linear`` into ``Linear4bit``/``Linear8bitLt``,
or build an empty one that a saved state dict fills.

The saved layout is the one transformers writes for bitsandbytes, per linear ``<name>``:

- 4-bit: ``weight`` (uint8 ``(ceil(out*in/2), 1)``: two codes per byte), ``weight.absmax``
  (float32 per block; uint8 with double quantization), ``weight.quant_map`` (the 16-entry
  NF4/FP4 code book), with double quantization ``weight.nested_absmax`` and
  ``weight.nested_quant_map``, and ``weight.quant_state.bitsandbytes__<nf4|fp4>`` (the JSON
  of the non-tensor state: quant_type, blocksize, dtype, shape, nested offset...);
- 8-bit: ``weight`` (int8 ``(out, in)``), ``SCB`` (float32 row scales) and ``weight_format``
  (uint8 ``0``: row-major).

bitsandbytes 0.50 repacks a 4-bit weight at its first CPU inference forward on machines with
AVX512-BF16, converting the absmax to bfloat16 and re-quantizing it when the state dict is
read back: lossy, and saving after a forward writes other bytes than before it. quantkit's
modules keep the canonical layout instead (:func:`keep_canonical_layout`), so the bytes
saved and the logits computed never depend on whether a forward has run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from quantkit.core.errors import ModelFormatError

from .config import BnbConfig

if TYPE_CHECKING:
    import bitsandbytes as bnb

QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__"


def keep_canonical_layout(module: bnb.nn.Linear4bit) -> None:
    """Disable bitsandbytes' lossy CPU repacking of ``module``'s 4-bit weight (see module doc)."""
    module.support_avx512bf16_for_cpu = False


def quantize_linear(linear: nn.Linear, config: BnbConfig, device: torch.device) -> nn.Module:
    """``linear`` quantized on ``device`` as bitsandbytes' 4-bit or LLM.int8 linear."""
    import bitsandbytes as bnb

    if config.load_in_8bit:
        module = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=config.llm_int8_threshold,
            device="meta",
        )
        # Int8Params quantizes when moved off the CPU-resident float weight.
        module.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False, has_fp16_weights=False).to(
            device
        )
    else:
        module = _linear4bit(linear.in_features, linear.out_features, linear.bias is not None, config)
        module.weight = bnb.nn.Params4bit(
            linear.weight.data,
            requires_grad=False,
            blocksize=config.blocksize,
            compress_statistics=config.use_double_quant,
            quant_type=config.quant_type,
            quant_storage=torch.uint8,
            module=module,
        ).to(device)
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=linear.bias.requires_grad)
    return module.train(linear.training)  # LLM.int8 treats outliers differently in training mode


def empty_linear(linear: nn.Linear, config: BnbConfig) -> nn.Module:
    """An empty (meta) bitsandbytes linear that ``load_state_dict(..., assign=True)`` fills
    from the saved layout (the module doc), on the CPU."""
    import bitsandbytes as bnb

    out_features, in_features = linear.out_features, linear.in_features
    if config.load_in_8bit:
        module = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=linear.bias is not None,
            has_fp16_weights=False,
            threshold=config.llm_int8_threshold,
            device="meta",
        )
        module.weight = bnb.nn.Int8Params(
            torch.empty(out_features, in_features, dtype=torch.int8, device="meta"),
            requires_grad=False,
            has_fp16_weights=False,
        )
        module.register_load_state_dict_pre_hook(_load_int8)
    else:
        module = _linear4bit(in_features, out_features, linear.bias is not None, config)
        packed = torch.empty((out_features * in_features + 1) // 2, 1, dtype=torch.uint8, device="meta")
        module.weight = bnb.nn.Params4bit(
            packed,
            requires_grad=False,
            blocksize=config.blocksize,
            compress_statistics=config.use_double_quant,
            quant_type=config.quant_type,
            quant_storage=torch.uint8,
            module=module,
            bnb_quantized=True,
        )
        module.register_load_state_dict_pre_hook(_load_4bit)
    return module


def sync_int8_statistics(model: nn.Module) -> nn.Module:
    """Point each unused LLM.int8 weight's ``CB``/``SCB`` at its current device.

    ``Module.to`` moves a quantized ``Int8Params`` by replacing its data, which leaves the
    ``CB``/``SCB`` attributes bitsandbytes reads at the first forward on the old device.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt) and module.weight.SCB is not None:
            module.weight.CB = module.weight.data
            module.weight.SCB = module.weight.SCB.to(module.weight.device)
    return model


def mixes_4bit_and_8bit(model: nn.Module) -> bool:
    """Whether ``model`` holds both 4-bit and LLM.int8 linears (which transformers cannot load)."""
    import bitsandbytes as bnb

    return len({type(m) for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}) > 1


def _linear4bit(in_features: int, out_features: int, bias: bool, config: BnbConfig) -> bnb.nn.Linear4bit:
    import bitsandbytes as bnb

    module = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=bias,
        compute_dtype=getattr(torch, config.compute_dtype),
        compress_statistics=config.use_double_quant,
        quant_type=config.quant_type,
        quant_storage=torch.uint8,
        device="meta",
    )
    keep_canonical_layout(module)
    return module


def _load_4bit(module: bnb.nn.Linear4bit, state_dict: dict, prefix: str, *_args) -> None:
    """Turn the saved 4-bit tensors of ``module`` into its ``Params4bit`` weight (in place)."""
    import bitsandbytes as bnb

    weight = state_dict.get(prefix + "weight")
    if weight is None:
        return
    stats = {key[len(prefix) :]: state_dict.pop(key) for key in list(state_dict) if key.startswith(prefix + "weight.")}
    if not any(key.startswith(QUANT_STATE_KEY) for key in stats):
        raise ModelFormatError(
            f"{prefix}weight is not a bitsandbytes 4-bit weight (no {prefix}{QUANT_STATE_KEY}nf4/fp4 "
            f"tensor; dtype {weight.dtype}, shape {tuple(weight.shape)}); the file and its "
            "quantization_config disagree on this layer"
        )
    state_dict[prefix + "weight"] = bnb.nn.Params4bit.from_prequantized(
        data=weight,
        quantized_stats=stats,
        requires_grad=False,
        device=weight.device,
        module=module,
    )


def _load_int8(module: bnb.nn.Linear8bitLt, state_dict: dict, prefix: str, *_args) -> None:
    """Turn the saved int8 weight and row scales of ``module`` into its ``Int8Params`` (in place)."""
    import bitsandbytes as bnb

    weight = state_dict.get(prefix + "weight")
    if weight is None:
        return
    scb = state_dict.pop(prefix + "SCB", None)
    if scb is None or weight.dtype != torch.int8:
        raise ModelFormatError(
            f"{prefix}weight is not a bitsandbytes LLM.int8 weight (dtype {weight.dtype}, "
            f"{prefix}SCB {'missing' if scb is None else 'present'}); the file and its "
            "quantization_config disagree on this layer"
        )
    state_dict[prefix + "weight"] = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, SCB=scb).to(
        weight.device
    )
