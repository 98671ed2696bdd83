"""Registers the backend through quantkit's ``quantkit_register_backends`` hook."""

from __future__ import annotations

import math

import torch
from torch import nn

from quantkit.core.backend import Backend
from quantkit.core.capabilities import Capabilities
from quantkit.core.hookspecs import hookimpl
from quantkit.core.capabilities import ALL_HARDWARE
from quantkit.core.linears import quantizable_linears, replace_linears, set_submodule

from .config import AbsmaxInt8Config


class AbsmaxInt8Linear(nn.Module):
    """``y = x @ (q * scale).T + b`` with ``q`` int8 of shape (out, in)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scale_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1, dtype=scale_dtype))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_dtype: torch.dtype) -> AbsmaxInt8Linear:
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, scale_dtype)
        module.qweight.copy_(torch.round(weight / scale).clamp(-127, 127).to(torch.int8))
        module.scale.copy_(scale.to(scale_dtype))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight.to(x.dtype) * self.scale.to(x.dtype)
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


class AbsmaxInt8Backend(Backend):
    name = "example-int8"
    config_class = AbsmaxInt8Config
    capabilities = Capabilities(
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=False,
        serializable=True,
        trainable=False,
        description="example plugin: per-channel absmax int8 weights",
    )

    def quantize(self, model, config, *, calibration, device):
        dtype = getattr(torch, config.scale_dtype)
        model.to(device)
        return replace_linears(
            model, config, lambda name, linear, cfg: AbsmaxInt8Linear.from_linear(linear, dtype),
            description="absmax-int8",
        )

    def prepare_for_loading(self, model, config):
        dtype = getattr(torch, config.scale_dtype)
        for name, linear, _ in quantizable_linears(model, config):
            set_submodule(model, name, AbsmaxInt8Linear(linear.in_features, linear.out_features,
                                                        linear.bias is not None, dtype))
        return model

    def storage_bits(self, config, name, out_features, in_features):
        scale_bits = 32 if config.scale_dtype == "float32" else 16
        return out_features * in_features * 8 + out_features * scale_bits


@hookimpl
def quantkit_register_backends(register) -> None:
    register(AbsmaxInt8Backend())
