"""Registers the backend through quantkit's ``quantkit_register_backends`` hook."""

from __future__ import annotations

import torch
from torch import nn

from quantkit import ALL_HARDWARE, Backend, Capabilities, hookimpl

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
    """quantkit walks the model, checks it, swaps each linear and saves/loads the result: a
    calibration-free backend only says how one linear is quantized, stored and sized."""

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

    def quantize_linear(self, name, linear, config, device):
        return AbsmaxInt8Linear.from_linear(linear.to(device), getattr(torch, config.scale_dtype))

    def empty_module(self, name, linear, config):
        bias = linear.bias is not None
        return AbsmaxInt8Linear(linear.in_features, linear.out_features, bias, getattr(torch, config.scale_dtype))

    def storage_bits(self, config, name, out_features, in_features):
        scale_bits = 32 if config.scale_dtype == "float32" else 16
        return out_features * in_features * 8 + out_features * scale_bits


@hookimpl
def quantkit_register_backends(register) -> None:
    register(AbsmaxInt8Backend())
