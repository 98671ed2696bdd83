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

The modules stay real ``Linear4bit``/``Linear8bitLt`` (PEFT's QLoRA wraps them) but run through
the kernels registered for :data:`Bnb4bit` and :data:`Bnb8bit` (:mod:`.kernels`): bitsandbytes'
own CPU GEMV runs on a packed copy the kernel keeps outside the state dict, and LLM.int8's
activation quantization and outlier columns fold into one compiled int8 GEMV.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantkit.core.config_files import parse_json
from quantkit.core.dispatch import ModuleMethod, route_through_kernels, third_party_class
from quantkit.core.errors import ModelFormatError
from quantkit.core.linears import Target

from .config import BnbConfig

if TYPE_CHECKING:
    import bitsandbytes as bnb

QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Block sizes a saved 4-bit quant state may name (bitsandbytes' own, nested ones included)."""
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
Bnb4bit = third_party_class(
    "bitsandbytes.nn.modules.Linear4bit",
    "Bnb4bit",
    "bitsandbytes' ``Linear4bit`` (and its subclasses) as a class quantkit can name without importing "
    "bitsandbytes: ``isinstance(module, Bnb4bit)``, a layer class of the kernels in :mod:`.kernels`.",
)
Bnb8bit = third_party_class(
    "bitsandbytes.nn.modules.Linear8bitLt",
    "Bnb8bit",
    "bitsandbytes' ``Linear8bitLt`` (LLM.int8), named the same way.",
)


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
        ).to(device)
        _keep_quant_state(module, module.weight)
    _through_kernels(module)
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
            bnb_quantized=True,
        )
        module.register_load_state_dict_pre_hook(_load_4bit)
    return _through_kernels(module)


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


def quantized_linears(model: nn.Module) -> list[nn.Module]:
    """``model``'s bitsandbytes linears."""
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)]


def mixes_4bit_and_8bit(model: nn.Module, targets: list[Target]) -> bool:
    """Whether ``model``, with its float ``targets`` still to quantize, holds both 4-bit and LLM.int8
    linears (which transformers cannot load)."""
    import bitsandbytes as bnb

    kinds = {isinstance(m, bnb.nn.Linear8bitLt) for m in quantized_linears(model)}
    return len(kinds | {cfg.load_in_8bit for _, _, cfg in targets}) > 1


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


def dequantize(module: bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) -> torch.Tensor:
    """The float32 ``(out, in)`` weight ``module`` encodes: its canonical 4-bit weight and quant
    state, or its LLM.int8 codes and row scales."""
    import bitsandbytes as bnb

    if isinstance(module, Bnb8bit):
        return bnb.functional.int8_vectorwise_dequant(*int8_weight(module)).float()
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()


def int8_weight(module: bnb.nn.Linear8bitLt) -> tuple[torch.Tensor, torch.Tensor]:
    """An LLM.int8 layer's int8 ``(out, in)`` codes and float32 row scales (``SCB``; bitsandbytes
    moves them from the weight to the layer's state at its first forward)."""
    scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
    return module.weight.data, scales


def _through_kernels(module: nn.Module) -> nn.Module:
    """``module`` with ``dequantize()`` and its forward routed through the registered kernels; a
    state dict loaded into it drops the kernel state prepared from the weight it replaces."""
    module.dequantize = ModuleMethod(dequantize, module)
    module.register_load_state_dict_post_hook(_drop_kernel_state)
    return route_through_kernels(module)


def _keep_quant_state(module: bnb.nn.Linear4bit, weight: bnb.nn.Params4bit) -> None:
    """Give ``module`` its 4-bit ``weight``'s quant state, as bitsandbytes does for a ``Params4bit`` made with
    ``module=`` (its FSDP recovery reads it), without the weight referring back to the module: that
    cycle would keep each quantized layer alive until the cyclic collector runs."""
    module.quant_state = weight.quant_state


def _drop_kernel_state(module: nn.Module, incompatible_keys: Any) -> None:
    module._choice = None


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
    _check_4bit_state(module, prefix, weight, stats)
    param = bnb.nn.Params4bit.from_prequantized(
        data=weight, quantized_stats=stats, requires_grad=False, device=weight.device
    )
    state_dict[prefix + "weight"] = param
    _keep_quant_state(module, param)


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
    if scb.dtype != torch.float32 or tuple(scb.shape) != (module.out_features,):
        raise ModelFormatError(
            f"{prefix}SCB is {scb.dtype} {list(scb.shape)}; LLM.int8 row scales are float32 [{module.out_features}]"
        )
    state_dict[prefix + "weight"] = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, SCB=scb).to(
        weight.device
    )


def _check_4bit_state(
    module: bnb.nn.Linear4bit, prefix: str, weight: torch.Tensor, stats: dict[str, torch.Tensor]
) -> None:
    """Refuse a saved 4-bit weight and quant state (``weight.*`` tensors and the packed JSON) that do
    not describe ``module`` under its config: bitsandbytes itself only asserts on some of it."""
    state_key = QUANT_STATE_KEY + module.weight.quant_type
    where = prefix + state_key
    packed = stats.get(state_key)
    if packed is None or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ModelFormatError(
            f"{prefix}weight: no uint8 vector {where} (the layer's config says {module.weight.quant_type})"
        )
    try:
        state = parse_json(bytes(packed.tolist()).decode("utf-8"), where)
    except UnicodeDecodeError as exc:
        raise ModelFormatError(f"{where} is not UTF-8 JSON: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelFormatError(f"{where} holds {state!r}, not an object")
    nested = module.weight.compress_statistics
    expected = {
        "quant_type": module.weight.quant_type,
        "shape": [module.out_features, module.in_features],
    }
    allowed = {"quant_type", "blocksize", "dtype", "shape"} | (
        {"nested_blocksize", "nested_dtype", "nested_offset"} if nested else set()
    )
    problems = [f"{k}={state.get(k)!r}, expected {v!r}" for k, v in expected.items() if state.get(k) != v]
    packed_weight = ((module.out_features * module.in_features + 1) // 2, 1)
    if weight.dtype != torch.uint8 or tuple(weight.shape) != packed_weight:
        problems.append(f"{prefix}weight is {weight.dtype} {list(weight.shape)}, expected uint8 {list(packed_weight)}")
    problems += [f"unexpected field {k!r}" for k in sorted(set(state) - allowed)]
    blocksize, dtype = state.get("blocksize"), state.get("dtype")
    if blocksize not in BLOCKSIZES:
        problems.append(f"blocksize={blocksize!r}, allowed {BLOCKSIZES}")
    if dtype not in FLOAT_DTYPES:
        problems.append(f"dtype={dtype!r}, allowed {FLOAT_DTYPES}")
    blocks = -(-module.out_features * module.in_features // blocksize) if blocksize in BLOCKSIZES else None
    shapes = {
        "weight.absmax": (torch.uint8 if nested else torch.float32, [blocks]),
        "weight.quant_map": (torch.float32, [16]),
        state_key: (torch.uint8, [packed.numel()]),
    }
    if nested:
        nested_blocksize = state.get("nested_blocksize")
        if nested_blocksize not in BLOCKSIZES or state.get("nested_dtype") not in FLOAT_DTYPES:
            problems.append(f"nested_blocksize={nested_blocksize!r}, nested_dtype={state.get('nested_dtype')!r}")
        elif blocks is not None:
            shapes["weight.nested_absmax"] = (torch.float32, [-(-blocks // nested_blocksize)])
        shapes["weight.nested_quant_map"] = (torch.float32, [256])
        if not isinstance(state.get("nested_offset"), (int, float)) or isinstance(state.get("nested_offset"), bool):
            problems.append(f"nested_offset={state.get('nested_offset')!r}, expected a number")
    problems += [f"unexpected tensor {prefix}{k}" for k in sorted(set(stats) - set(shapes))]
    for key, (dtype_, shape) in shapes.items():
        tensor = stats.get(key)
        if tensor is None:
            problems.append(f"missing tensor {prefix}{key}")
        elif tensor.dtype != dtype_ or list(tensor.shape) != shape:
            problems.append(f"{prefix}{key} is {tensor.dtype} {list(tensor.shape)}, expected {dtype_} {shape}")
    if problems:
        raise ModelFormatError(f"{prefix}weight: the saved 4-bit quant state is inconsistent: {'; '.join(problems)}")
