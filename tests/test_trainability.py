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
from quantkit.testing import frozen_tensors, lora_trains

VOCAB, SEQLEN = 256, 32


def _available_backends() -> list[quantkit.Backend]:
    """quantkit's own (an installed third-party plugin's declarations are for its own tests)."""
    return [b for b in quantkit.api.get_registry().builtin_backends().values() if b.is_available()]


CHEAP = {
    "aqlm": {
        "num_codebooks": 1,
        "nbits_per_codebook": 4,
        "beam_size": 1,
        "rounds": 1,
        "codebook_steps": 2,
        "kmeans_iters": 2,
    }
}
"""Overrides of defaults whose full search costs minutes even on the tiny model (trainability does
not depend on how well the codes were searched)."""


def _configs() -> list:
    """One config per available backend (bitsandbytes: 4-bit and 8-bit), sized for the tiny model."""
    cases = []
    for backend in _available_backends():
        configs = [backend.config_class(**CHEAP.get(backend.name, {}))]
        if backend.name == "bitsandbytes":
            configs.append(quantkit.BnbConfig(load_in_4bit=False, load_in_8bit=True))
        for config in configs:
            case_id = f"{backend.name}-{config.quant_method}-{_label(config)}"
            cases.append(pytest.param(backend.name, config, id=case_id))
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
    base = frozen_tensors(model)
    raw_model = copy.deepcopy(model)

    if declared:
        ok, why = lora_trains(ft.attach_lora(model), base)
        assert ok, f"{name} declares trainable=True but LoRA does not train on it: {why}"
    else:
        with pytest.raises(NotTrainableError, match=f"{name!r} declares trainable=False"):
            ft.attach_lora(model)

    try:
        raw = raw_peft_lora(raw_model)
    except ValueError as exc:  # PEFT has no LoRA layer for these modules
        ok, why = False, f"PEFT refuses: {exc}"
    else:
        ok, why = lora_trains(raw, base)
    outcome = "trains" if ok else "fails"
    assert ok == declared, f"{name} declares trainable={declared}, but raw PEFT LoRA {outcome}: {why}"


def test_every_registered_backend_declares_trainability() -> None:
    for backend in quantkit.backends():
        assert isinstance(backend.capabilities.trainable, bool), backend.name
    available = {b.name for b in _available_backends()}
    assert {"bitsandbytes", "hqq"} <= available, "the trainable backends must run on this machine"
