"""The trainability contract, checked against reality for every available backend.

``capabilities.trainable`` is a declaration; these tests do not trust it. Each
available backend quantizes a tiny random Llama, then:

- through quantkit (``finetune.attach_lora``): a backend declaring ``trainable=True``
  must really train (finite loss, gradients reaching every adapter, adapters moving,
  quantized base untouched); one declaring ``False`` must raise ``NotTrainableError``;
- through PEFT directly, bypassing quantkit's gate and preparation (with the LoRA layer
  quantkit registers for quantized linears PEFT does not know): whether LoRA really
  trains on the backend's modules must again equal the declaration, so that a ``False``
  is not hiding a backend that works (nor a ``True`` one that does not).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama

import quantkit
from quantkit import finetune as ft
from quantkit.core.errors import NotTrainableError

VOCAB, SEQLEN = 256, 32


def _available_backends() -> list[quantkit.Backend]:
    return [b for b in quantkit.backends() if b.is_available()]


def _configs() -> list:
    """One config per available backend (bitsandbytes: 4-bit and 8-bit), sized for the tiny model."""
    cases = []
    for backend in _available_backends():
        configs = [backend.config_class()]
        if backend.name == "bitsandbytes":
            configs.append(quantkit.BnbConfig(load_in_4bit=False, load_in_8bit=True))
        for config in configs:
            cases.append(pytest.param(backend.name, config, id=f"{backend.name}-{config.quant_method}-{_label(config)}"))
    return cases


def _label(config) -> str:
    for field in ("quant_type", "bits", "nbits"):
        if hasattr(config, field) and not (field == "quant_type" and getattr(config, "load_in_8bit", False)):
            return str(getattr(config, field))
    return "8bit"


def _quantized(config) -> torch.nn.Module:
    # hidden 256 / MLP 512: multiples of every default group size and of the 256-wide K-quant rows
    model = make_tiny_llama(hidden=256, intermediate=512, vocab=VOCAB)
    calibration = torch.randint(0, VOCAB, (8, 2 * SEQLEN), generator=torch.Generator().manual_seed(1))
    return quantkit.quantize(model, config, calibration=calibration, device="cpu")


def _base_tensors(model) -> dict[str, torch.Tensor]:
    return {
        k.replace(".base_layer", ""): v.detach().clone()
        for k, v in model.state_dict().items() if ".lora_" not in k and isinstance(v, torch.Tensor)
    }


def trains(peft_model, base: dict[str, torch.Tensor]) -> tuple[bool, str]:
    """One backward and one optimizer step on ``peft_model``: did LoRA really train?"""
    tokens = torch.randint(0, VOCAB, (2, SEQLEN), generator=torch.Generator().manual_seed(2))
    adapters = {n: p for n, p in peft_model.named_parameters() if ".lora_" in n}
    if not adapters:
        return False, "no adapter parameters"
    before = {n: p.detach().clone() for n, p in adapters.items()}
    peft_model.train()
    try:
        loss = peft_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
    except Exception as exc:  # a module without a backward is a finding, not a test error
        return False, f"forward/backward failed: {type(exc).__name__}: {exc}"
    if not torch.isfinite(loss):
        return False, f"loss {loss.item()}"
    no_grad = [n for n, p in adapters.items() if ".lora_B." in n and (p.grad is None or not p.grad.abs().sum() > 0)]
    if no_grad:
        return False, f"{len(no_grad)} of {len(adapters) // 2} adapters got no gradient, e.g. {no_grad[0]}"
    stray = [n for n, p in peft_model.named_parameters() if p.grad is not None and n not in adapters]
    if stray:
        return False, f"base parameters received gradients: {stray[:3]}"
    torch.optim.AdamW(adapters.values(), lr=1e-3).step()
    unchanged = [n for n, p in adapters.items() if ".lora_B." in n and torch.equal(p, before[n])]
    if unchanged:
        return False, f"adapters did not move: {unchanged[:3]}"
    after = _base_tensors(peft_model.get_base_model())
    moved = [k for k in base if not torch.equal(base[k], after[k])]
    if moved:
        return False, f"quantized base tensors changed: {moved[:3]}"
    return True, f"loss {loss.item():.3f}"


def raw_peft_lora(model):
    """LoRA on every linear straight through PEFT, without quantkit's gate or preparation."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=8, target_modules=ft.lora_targets(model), lora_dropout=0.0)
    return get_peft_model(model, ft.with_quantized_layers(config, model))


@pytest.mark.parametrize(("name", "config"), _configs())
def test_declared_trainability_matches_reality(name: str, config) -> None:
    backend = quantkit.api.get_registry().backends[name]
    declared = backend.capabilities.trainable
    model = _quantized(config)
    assert model.quantkit_backend == name
    base = _base_tensors(model)
    raw_model = copy.deepcopy(model)

    if declared:
        ok, why = trains(ft.attach_lora(model), base)
        assert ok, f"{name} declares trainable=True but LoRA does not train on it: {why}"
    else:
        with pytest.raises(NotTrainableError, match=f"{name!r} declares trainable=False"):
            ft.attach_lora(model)

    try:
        raw = raw_peft_lora(raw_model)
    except ValueError as exc:  # PEFT has no LoRA layer for these modules
        ok, why = False, f"PEFT refuses: {exc}"
    else:
        ok, why = trains(raw, base)
    assert ok == declared, f"{name} declares trainable={declared}, but raw PEFT LoRA {'trains' if ok else 'fails'}: {why}"


def test_every_registered_backend_declares_trainability() -> None:
    for backend in quantkit.backends():
        assert isinstance(backend.capabilities.trainable, bool), backend.name
    available = {b.name for b in _available_backends()}
    assert {"bitsandbytes", "hqq"} <= available, "the trainable backends must run on this machine"
