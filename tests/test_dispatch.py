"""Dispatch of configs to backends: hardware declarations, unavailable backends, no silent skips."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import quantkit
from quantkit import Backend, Capabilities, Hardware
from quantkit.core.capabilities import Availability
from quantkit.core.config import QuantConfig
from quantkit.core.hardware import hardware_of
from quantkit.core.registry import get_registry


@dataclass
class FakeConfig(QuantConfig):
    quant_method: ClassVar[str] = "fake"


class FakeBackend(Backend):
    name = "fake-cuda-only"
    config_class = FakeConfig
    capabilities = Capabilities(
        quantize_hardware=frozenset({Hardware.CUDA}),
        inference_hardware=frozenset({Hardware.CUDA, Hardware.ROCM}),
        requires_calibration=False,
        serializable=True,
        trainable=False,
    )

    def quantize(self, model, config, *, calibration, device):
        raise AssertionError("must not be called on unsupported hardware")

    def storage_bits(self, config, name, out_features, in_features):
        return out_features * in_features * 4


class MissingLibBackend(FakeBackend):
    name = "fake-missing"
    capabilities = Capabilities(
        quantize_hardware=frozenset(Hardware),
        inference_hardware=frozenset(Hardware),
        requires_calibration=False,
        serializable=True,
        trainable=False,
        requires=("no_such_module_xyz",),
    )


def test_quantize_on_undeclared_hardware_names_the_alternatives(tiny_llama):
    get_registry().register_backend(FakeBackend())
    with pytest.raises(quantkit.UnsupportedHardwareError) as info:
        quantkit.quantize(tiny_llama, FakeConfig(), device="cpu")
    message = str(info.value)
    assert "cannot quantize on cpu" in message and "fake-cuda-only (cuda)" in message
    assert "Backends that quantize on cpu:" in message and "gptq" in message


def test_inference_on_undeclared_hardware():
    get_registry().register_backend(FakeBackend())
    with pytest.raises(quantkit.UnsupportedHardwareError, match="cannot inference on mps"):
        get_registry().backend_for(FakeConfig(), Hardware.MPS, purpose="inference")
    assert get_registry().backend_for(FakeConfig(), Hardware.ROCM, purpose="inference").name == "fake-cuda-only"


def test_missing_library_makes_backend_unavailable_with_reason():
    get_registry().register_backend(MissingLibBackend())
    backend = get_registry().backends["fake-missing"]
    availability = backend.is_available()
    assert not availability and "no_such_module_xyz" in availability.reason
    with pytest.raises(quantkit.BackendUnavailableError, match="no_such_module_xyz"):
        get_registry().backend_for(FakeConfig(), Hardware.CPU)


def test_unknown_method():
    with pytest.raises(quantkit.UnknownMethodError, match="registered methods"):
        get_registry().backend_for(FakeConfig(), Hardware.CPU)


def test_duplicate_backend_names_are_refused():
    get_registry().register_backend(FakeBackend())
    with pytest.raises(quantkit.QuantkitError, match="registered twice"):
        get_registry().register_backend(FakeBackend())


@pytest.mark.parametrize(
    ("device", "hip", "expected"),
    [
        ("cpu", None, Hardware.CPU),
        ("cuda", None, Hardware.CUDA),
        ("cuda:1", "6.2", Hardware.ROCM),
        ("mps", None, Hardware.MPS),
    ],
)
def test_hardware_detection(monkeypatch, device, hip, expected):
    monkeypatch.setattr(torch.version, "hip", hip)
    assert hardware_of(device) == expected


def test_capabilities_are_frozen_data():
    backend = get_registry().backends["gptq"]
    with pytest.raises(AttributeError):
        backend.capabilities.trainable = True  # type: ignore[misc]
    described = backend.describe()
    assert described["quant_method"] == "gptq" and described["requires_calibration"] is True


def test_availability_is_falsy_with_reason():
    assert not Availability(False, "why") and Availability(True)
