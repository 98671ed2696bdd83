"""Fine-tuning quantized models with LoRA adapters (QLoRA on a 4-bit bitsandbytes base).

The trainability contract: a backend declares ``capabilities.trainable``; only
models from backends that declare it (and float models, which quantkit did not
quantize) get adapters. The quantized base weights stay frozen and bit-identical;
only the LoRA matrices train.

>>> model, tokenizer = quantkit.models.load_model()
>>> result = finetune(model, tokenizer, "notes.txt", steps=100, quantize=True, lora=True)
>>> save_adapter(result.model, "adapter/")
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.checkpoint import checkpoint

from .api import backends
from .api import quantize as quantize_model
from .calibration import calibration_tokens
from .core.atomic import atomic_path
from .core.backend import Backend
from .core.config import QuantConfig
from .core.errors import ConfigTypeError, ModelFormatError, NotTrainableError, QuantkitError, UnknownFieldError
from .core.hardware import bf16_native, resolve_device
from .core.progress import track
from .core.registry import get_registry
from .core.resolve import as_config
from .core.serialization import BACKEND_ATTR

log = logging.getLogger("quantkit")

ALL_LINEAR = "all-linear"
LORA_DEFAULTS: dict[str, Any] = {
    "r": 16,
    "lora_alpha": 8,
    "target_modules": ALL_LINEAR,
    "lora_dropout": 0.05,
    "bias": "none",
}
"""What ``lora=True`` means (txtai's short form): rank 16, alpha 8, every linear but the output head."""

ADAPTER_WEIGHTS = "adapter_model.safetensors"


# -- the trainability contract ------------------------------------------------------


def trainable_backends() -> list[str]:
    """Names of the registered backends that declare ``trainable=True``."""
    return sorted(b.name for b in backends() if b.capabilities.trainable)


def _quantized_by(model: nn.Module) -> Backend | None:
    """The registered backend that quantized ``model``; ``None`` for a float model."""
    name = getattr(model, BACKEND_ATTR, None)
    if name is None:
        return None
    backend = get_registry().backends.get(name)
    if backend is None:
        raise QuantkitError(f"model was quantized by backend {name!r}, which is not registered here")
    return backend


def check_trainable(model: nn.Module) -> None:
    """Raise :class:`NotTrainableError` when ``model``'s backend declares ``trainable=False``.

    A model quantkit did not quantize is a float model: it trains.
    """
    backend = _quantized_by(model)
    if backend is not None and not backend.capabilities.trainable:
        raise NotTrainableError(
            f"backend {backend.name!r} declares trainable=False: LoRA adapters cannot be trained on its "
            f"quantized modules. Backends that can be trained: {', '.join(trainable_backends()) or '(none)'} "
            "(e.g. quantize=True for QLoRA on 4-bit NF4), or fine-tune the float model"
        )


# -- LoRA settings ------------------------------------------------------------------


def lora_config(lora: bool | Mapping[str, Any] | LoraConfig = True) -> LoraConfig:
    """A causal-LM ``peft.LoraConfig``: ``True`` for :data:`LORA_DEFAULTS`, a dict to
    override some of its fields, or a ``LoraConfig`` as is."""
    if isinstance(lora, LoraConfig):
        return lora
    if lora is True:
        fields: dict[str, Any] = {}
    elif isinstance(lora, Mapping):
        fields = dict(lora)
    else:
        raise ConfigTypeError("finetune", "lora", lora, "True, a dict of LoraConfig fields or a peft.LoraConfig")
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init and not f.name.startswith("_")}
    for key in fields:
        if key not in known:
            raise UnknownFieldError("LoraConfig", key, known)
    try:
        return LoraConfig(**{**LORA_DEFAULTS, "task_type": "CAUSAL_LM", **fields})
    except (TypeError, ValueError) as exc:
        raise QuantkitError(f"invalid LoRA settings {fields}: {exc}") from exc


def lora_targets(model: nn.Module) -> list[str]:
    """Names of every linear, float or quantized, except the output head: what
    ``"all-linear"`` selects. Quantized linears are the modules with integer
    ``in_features``/``out_features`` (bitsandbytes, HQQ, GPTQ, AWQ, GGUF ones)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [name for name, module in model.named_modules() if name and module is not head and _is_linear(module)]
    if not names:
        raise QuantkitError(f"{type(model).__name__} has no linear layer to attach LoRA to")
    return names


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
    )


# -- LoRA layers for quantized linears PEFT does not know -----------------------------


class QuantizedLoraLinear(nn.Module, LoraLayer):
    """LoRA around a quantized linear that PEFT has no layer for (quantkit's GPTQ, AWQ,
    RTN and GGUF modules): ``base(x) + B(A(dropout(x))) * scaling``.

    The base layer's forward must be differentiable in its input (GGUF's dequantizes and calls
    ``F.linear``; the others' kernels send the input's gradient through the dequantized weight).
    It is recomputed in the backward pass instead of keeping its
    dequantized float weight alive for it, so that training holds one layer's float
    weight at a time, as bitsandbytes does. Merging is not supported: the base formats
    cannot be re-quantized without their calibration data.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():  # PEFT warns about layer types it does not know: this layer is for them
            warnings.filterwarnings("ignore", "Unsupported layer type", UserWarning)
            LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        if torch.is_grad_enabled() and x.requires_grad:
            result = checkpoint(base, x, use_reentrant=False)
        else:
            result = base(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            update = lora_B(lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def with_quantized_layers(config: LoraConfig, model: nn.Module) -> LoraConfig:
    """A copy of ``config`` with :class:`QuantizedLoraLinear` registered (PEFT's
    custom-module mechanism) for every quantized linear type in ``model``, unless its
    backend declares ``peft_native`` (PEFT wraps those layers itself)."""
    config = copy.copy(config)
    backend = _quantized_by(model)
    if backend is not None and backend.capabilities.peft_native:
        return config
    custom = {
        type(module): QuantizedLoraLinear
        for name, module in model.named_modules()
        if name and _is_linear(module) and not isinstance(module, (nn.Linear, BaseTunerLayer))
    }
    if custom:
        own = config._custom_modules or {}
        config._custom_modules = None  # a mapping of the copy's own, not shared with the caller's config
        config._register_custom_module({**custom, **own})
    return config


# -- preparing and adapting a model --------------------------------------------------


def prepare_for_training(model: nn.Module, *, gradient_checkpointing: bool = False) -> nn.Module:
    """Make a (quantized) model ready for adapter training, in place (k-bit preparation).

    - refuse backends that declare ``trainable=False`` (:func:`check_trainable`);
    - freeze every base parameter;
    - cast half-precision floating parameters the quantizer left alone (norms,
      embeddings, unquantized linears) to float32; quantized storage (integer
      tensors, bitsandbytes' ``Params4bit``) is untouched;
    - make the input embeddings' output require grad, so that gradients reach the
      adapters through frozen (and checkpointed) layers;
    - optionally enable non-reentrant gradient checkpointing.
    """
    check_trainable(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if type(param) is nn.Parameter and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    else:
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    return model


def attach_lora(
    model: nn.Module,
    lora: bool | Mapping[str, Any] | LoraConfig = True,
    *,
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Prepare ``model`` (:func:`prepare_for_training`) and wrap it with trainable LoRA adapters.

    ``target_modules="all-linear"`` resolves through :func:`lora_targets`, so that
    quantized linears which are not ``nn.Linear`` subclasses (HQQ) are adapted too.
    Only the adapter matrices require grad afterwards.
    """
    prepare_for_training(model, gradient_checkpointing=gradient_checkpointing)
    config = with_quantized_layers(lora_config(lora), model)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config.target_modules = set(lora_targets(model))
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # peft has no LoRA layer for a targeted module type
        raise NotTrainableError(f"{_backend_name(model)}: {exc}") from exc
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    stray = sorted(n for n in trainable if ".lora_" not in n)
    if stray and config.bias == "none" and not config.modules_to_save:
        raise QuantkitError(f"base parameters would train besides the adapters: {stray[:5]}")
    log.info(
        "LoRA r=%d alpha=%s on %d modules: %d trainable parameters",
        config.r,
        config.lora_alpha,
        len(_lora_layers(peft_model)),
        sum(p.numel() for n, p in peft_model.named_parameters() if n in trainable),
    )
    return peft_model


def save_adapter(model: PeftModel, path: str | os.PathLike) -> Path:
    """Write the adapter (``adapter_model.safetensors`` + ``adapter_config.json``) atomically."""
    path = Path(path)
    if not hasattr(model, "peft_config"):
        raise QuantkitError(f"{type(model).__name__} carries no adapter; call attach_lora first")
    with atomic_path(path, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike, *, trainable: bool = False) -> PeftModel:
    """``model`` (the same base the adapter was trained on) with the adapter at ``path``."""
    path = Path(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ModelFormatError(f"{str(path)!r} holds no {ADAPTER_WEIGHTS}")
    if trainable:
        prepare_for_training(model)
    else:
        check_trainable(model)
    config = with_quantized_layers(LoraConfig.from_pretrained(path), model)
    return PeftModel.from_pretrained(model, path, config=config, is_trainable=trainable)


def merge_adapter(model: PeftModel) -> nn.Module:
    """Merge the adapters into the base weights and return the base model.

    A quantized base is dequantized, updated and quantized again where its backend declares
    ``merges_adapters`` (bitsandbytes, HQQ): the result is close to, not identical with, the
    adapted model. Any other backend's base raises :class:`QuantkitError` naming the backend.
    """
    backend = _quantized_by(model.get_base_model())
    if backend is not None and not backend.capabilities.merges_adapters:
        raise QuantkitError(
            f"backend {backend.name!r} declares merges_adapters=False: LoRA adapters cannot be merged into "
            "its quantized modules; keep the adapter separate (load_adapter) or merge into the float model"
        )
    return model.merge_and_unload()


# -- compute dtype, tokenizer, generation ---------------------------------------------


def qlora_config(
    quantize: QuantConfig | Mapping[str, Any] | bool | str, device: torch.device | str | None = None
) -> QuantConfig:
    """The quantization config of a QLoRA run, its compute dtype chosen for ``device``.

    ``True`` is 4-bit NF4 with double quantization and bfloat16 compute
    (:func:`quantkit.as_config`); where ``device`` lacks native bfloat16 the short
    forms compute in float32 instead, and say so in the log. An explicit config is kept.
    """
    config = as_config(quantize)
    short_form = quantize is True or (isinstance(quantize, Mapping) and "compute_dtype" not in quantize)
    if getattr(config, "compute_dtype", None) != "bfloat16":
        return config
    device = resolve_device(device)
    if bf16_native(device):
        log.info("QLoRA compute dtype: bfloat16 (native on %s)", device)
    elif short_form:
        log.warning("QLoRA compute dtype: float32 (%s has no native bfloat16 matmul)", device)
        config = dataclasses.replace(config, compute_dtype="float32")
    else:
        log.warning("compute_dtype=bfloat16 is emulated on %s (slow); kept because the config asks for it", device)
    return config


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give ``tokenizer`` a pad token (its EOS token when it has none) and left padding,
    which batched generation needs. Returns it."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise QuantkitError(f"{type(tokenizer).__name__} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token: padding with EOS %r", tokenizer.eos_token)
    tokenizer.padding_side = "left"
    return tokenizer


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations of ``prompts``, generated in one left-padded batch."""
    prepare_tokenizer(tokenizer)
    device = next(model.parameters()).device
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    finally:
        model.train(was_training)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


# -- the training loop ----------------------------------------------------------------


@dataclasses.dataclass
class FinetuneResult:
    """A fine-tuning run: the adapted model and what it cost."""

    model: PeftModel
    losses: list[float]
    """Training loss of every step, in order."""
    seconds: float
    peak_rss_bytes: int
    """Peak resident set size of this process so far (includes loading the model)."""


def finetune(
    model: nn.Module,
    tokenizer: Any,
    text: torch.Tensor | str | os.PathLike | None = None,
    *,
    steps: int,
    lora: bool | Mapping[str, Any] | LoraConfig = True,
    quantize: QuantConfig | Mapping[str, Any] | bool | str | None = None,
    lr: float = 2e-4,
    batch_size: int = 2,
    seqlen: int = 128,
    gradient_checkpointing: bool = False,
    device: torch.device | str | None = None,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """LoRA fine-tune ``model`` for ``steps`` AdamW steps of next-token prediction.

    ``model``: a float model, one quantkit quantized, or one that already carries
    adapters (:func:`attach_lora`, :func:`load_adapter` with ``trainable=True``),
    which then train on. ``quantize`` (``True``: QLoRA's NF4, see :func:`qlora_config`)
    quantizes a float model first. ``text``: token ids ``(n, seqlen)``, a dataset name
    or text file (random windows of ``seqlen`` tokens from its calibration split), or
    ``None`` for the built-in text. ``device`` defaults to the best one present when
    quantizing, else to where the model is. ``on_step(step, loss)`` follows every step.
    """
    if steps < 1 or batch_size < 1 or seqlen < 2:
        raise QuantkitError(
            f"steps={steps}, batch_size={batch_size}, seqlen={seqlen}: need steps, batch_size >= 1, seqlen >= 2"
        )
    adapted = hasattr(model, "peft_config")
    quantize = None if quantize is False else quantize
    if quantize is not None and (adapted or getattr(model, BACKEND_ATTR, None) is not None):
        raise QuantkitError(f"model is already quantized ({_backend_name(model)}) or adapted; pass quantize=None")
    device = resolve_device(device) if device is not None or quantize is not None else next(model.parameters()).device
    torch.manual_seed(seed)
    prepare_tokenizer(tokenizer)
    if getattr(model, BACKEND_ATTR, None) is None and not adapted:
        model = model.to(device)  # quantized models stay where their backend put them
    if quantize is not None:
        model = quantize_model(model, qlora_config(quantize, device), device=device, tokenizer=tokenizer)
    tokens = (
        text
        if isinstance(text, torch.Tensor)
        else calibration_tokens(tokenizer, text, nsamples=steps * batch_size, seqlen=seqlen, seed=seed)
    )
    peft_model = model if adapted else attach_lora(model, lora, gradient_checkpointing=gradient_checkpointing)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in track(range(steps), "fine-tuning", total=steps):
        rows = torch.arange(step * batch_size, (step + 1) * batch_size) % tokens.shape[0]
        batch = tokens[rows].to(device)
        loss = peft_model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise QuantkitError(f"training loss became {loss.item()} at step {step}; try a lower lr than {lr}")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    peft_model.eval()
    return FinetuneResult(peft_model, losses, time.perf_counter() - start, peak_rss_bytes())


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``getrusage``; psutil's peak on Windows)."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return int(psutil.Process().memory_info().peak_wset)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _backend_name(model: nn.Module) -> str:
    return getattr(model, BACKEND_ATTR, None) or "float model"


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]
