"""Mixed precision chosen for the user: per-layer settings of one method under a bit budget.

:func:`choose_mixed_precision` measures what each linear's candidate settings would cost
(:mod:`.sensitivity`; the candidates and their quantizers in :mod:`.candidates`), counts each
setting's exact stored bits with the estimator's :func:`~quantkit.estimate.layer_bits`, picks the
settings with the least total predicted loss whose stored bits per parameter (over the quantized
linears, the measure of ``quantkit compare`` and ``quantkit estimate``) stay within the target
(:mod:`.allocate`), and returns an ordinary config of the method: its own fields hold the most
common choice and ``module_overrides`` every other linear's, so it reads, saves as JSON and
reruns like any config (``quantkit quantize --config chosen.json``).

Tensors outside the allocation keep what the base config gives them: GGUF also packs the token
embedding, and the chosen config pins it (an override) to the type the base config (by default
the Q4_K_M mix) stores it in. The base config's own ``module_overrides`` are replaced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..builtin_backends.gguf.convert import embedding_plan
from ..builtin_backends.gguf.mixes import ModelShape
from ..calibration import calibration_tokens
from ..core.config import QuantConfig
from ..core.errors import ConfigValueError, QuantizationError
from ..core.linears import quantizable_linears
from ..core.progress import track
from ..core.registry import get_registry
from ..core.resolve import as_config, config_from_dict
from ..estimate import estimate, layer_bits
from .allocate import allocate
from .candidates import METHODS, apply, candidate_settings, dequantized
from .sensitivity import WEIGHTINGS, collect_statistics, predicted_loss

log = logging.getLogger("quantkit")

Setting = dict[str, Any]


@dataclass
class LayerOptions:
    """One linear's candidate settings, cheapest first, with their stored bits and predicted losses."""

    name: str
    params: int
    settings: list[Setting]
    bits: list[int]
    losses: list[float] = dataclasses.field(default_factory=list)


@dataclass
class Sensitivity:
    """What every candidate setting of every quantized linear would cost, in bits and in loss."""

    config: QuantConfig
    """The base config: the method and its fields that no candidate sets."""
    layers: list[LayerOptions]
    pinned: dict[str, Setting]
    """Overrides of tensors outside the allocation (GGUF's token embedding)."""

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def bits_range(self) -> tuple[float, float]:
        """The lowest and highest stored bits per parameter the candidates allow."""
        return (
            sum(min(layer.bits) for layer in self.layers) / self.params,
            sum(max(layer.bits) for layer in self.layers) / self.params,
        )

    def check_target(self, target_bits: float) -> None:
        """Refuse a target outside :meth:`bits_range`, naming the range."""
        low, high = self.bits_range()
        if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)) or not low <= target_bits <= high:
            raise ConfigValueError(
                "mixed precision",
                "target_bits",
                target_bits,
                f"{math.ceil(low * 1000) / 1000:.3f} to {math.floor(high * 1000) / 1000:.3f} stored bits per "
                f"parameter for {self.config.quant_method} on this model (its cheapest and costliest settings)",
            )

    def allocate(self, target_bits: float) -> dict[str, Setting]:
        """Each linear's setting: least total predicted loss within ``target_bits`` per parameter."""
        self.check_target(target_bits)
        budget = math.floor(target_bits * self.params)
        picked = allocate([layer.bits for layer in self.layers], [layer.losses for layer in self.layers], budget)
        return {layer.name: layer.settings[j] for layer, j in zip(self.layers, picked)}

    def config_for(self, choice: Mapping[str, Setting]) -> QuantConfig:
        """The config storing ``choice``: the most common setting as its fields, the others as
        ``module_overrides`` (exact module names), validated through :func:`config_from_dict`."""
        counts = Counter(json.dumps(choice[layer.name], sort_keys=True) for layer in self.layers)
        default = json.loads(counts.most_common(1)[0][0])
        overrides = {layer.name: choice[layer.name] for layer in self.layers if choice[layer.name] != default}
        config = dataclasses.replace(self.config, **default, module_overrides={**overrides, **self.pinned})
        return config_from_dict(config.to_dict())

    def totals(self, choice: Mapping[str, Setting]) -> tuple[float, float]:
        """Stored bits per parameter and total predicted loss of ``choice``."""
        bits = loss = 0.0
        for layer in self.layers:
            j = layer.settings.index(choice[layer.name])
            bits, loss = bits + layer.bits[j], loss + layer.losses[j]
        return bits / self.params, loss


def candidate_options(model: nn.Module, config: QuantConfig) -> Sensitivity:
    """Each linear's candidate settings and their exact stored bits (the estimator's count),
    cheapest first; losses not measured yet."""
    check_method(config)
    backend = get_registry().backends_for_method(config.quant_method)[0]
    layers = []
    with backend.storage_context(model):
        for name, linear, _ in quantizable_linears(model, config):
            shape = (linear.out_features, linear.in_features)
            options = sorted(
                ((layer_bits(apply(config, s), name, *shape, 32), s) for s in candidate_settings(config, name, linear)),
                key=lambda option: option[0],
            )
            layers.append(LayerOptions(name, linear.weight.numel(), [o[1] for o in options], [o[0] for o in options]))
    return Sensitivity(config, layers, _pinned(model, config))


def measure_sensitivity(
    model: nn.Module, config: QuantConfig, tokens: torch.Tensor, *, weighting: str = "fisher"
) -> Sensitivity:
    """Every candidate setting's stored bits and predicted loss for each linear ``config``
    quantizes in the float ``model``, from calibration ``tokens`` ``(samples, seqlen)``."""
    if weighting not in WEIGHTINGS:
        raise ConfigValueError("mixed precision", "weighting", weighting, ", ".join(map(repr, WEIGHTINGS)))
    sensitivity = candidate_options(model, config)
    modules = dict(model.named_modules())
    stats = collect_statistics(model, [layer.name for layer in sensitivity.layers], tokens, weighting=weighting)
    for layer in track(sensitivity.layers, f"sensitivity of {len(sensitivity.layers)} linears"):
        weight = modules[layer.name].weight.detach().float()
        layer.losses = [
            predicted_loss(dequantized(apply(config, s), weight) - weight, stats[layer.name]) for s in layer.settings
        ]
        del stats[layer.name]
    return sensitivity


def check_method(config: QuantConfig) -> None:
    """Refuse a method without per-layer candidate settings, naming those with them."""
    if config.quant_method not in METHODS:
        raise ConfigValueError(
            "mixed precision",
            "method",
            config.quant_method,
            f"{', '.join(METHODS)} (the methods with per-layer candidate settings)",
        )


def _pinned(model: nn.Module, config: QuantConfig) -> dict[str, Setting]:
    """GGUF's token embedding at the type the base config stores it in."""
    if config.quant_method != "gguf":
        return {}
    plan = embedding_plan(model, config, ModelShape.of(getattr(model, "config", None)))
    return {} if plan is None else {plan.name: {"quant_type": plan.qtype}}


def choose_mixed_precision(
    model: nn.Module,
    method: QuantConfig | Mapping[str, Any] | str,
    target_bits: float,
    *,
    calibration: torch.Tensor | str | os.PathLike | None = None,
    tokenizer: Any = None,
    nsamples: int = 8,
    seqlen: int = 512,
    weighting: str = "fisher",
) -> QuantConfig:
    """A config of ``method`` (a method or preset name, a config or dict: its other fields are
    kept) whose per-layer settings have the least predicted KL divergence from the float
    ``model`` at no more than ``target_bits`` stored bits per parameter of the quantized linears.

    ``calibration``: token ids ``(samples, seqlen)``, or a dataset name or text file read with
    ``tokenizer`` (``None``: the built-in text; ``nsamples`` x ``seqlen`` tokens of its calibration
    split). ``model`` is left unchanged. Raises :class:`ConfigValueError` for a method without
    candidate settings or a target outside the range its settings allow on this model.
    """
    config = as_config(method)
    candidate_options(model, config).check_target(target_bits)  # before the calibration passes
    tokens = _tokens(calibration, tokenizer, nsamples, seqlen)
    sensitivity = measure_sensitivity(model, config, tokens, weighting=weighting)
    choice = sensitivity.allocate(target_bits)
    chosen = sensitivity.config_for(choice)
    measured = estimate(config=chosen, model_config=model.config.to_dict()).bits_per_param
    if measured > target_bits:
        raise QuantizationError(f"the chosen settings store {measured:.4f} bits per parameter, over {target_bits}")
    bits, loss = sensitivity.totals(choice)
    log.info(
        "%s mixed precision: %.4f stored bits per parameter (target %s), predicted loss %.4g, %d overrides",
        config.quant_method,
        bits,
        target_bits,
        loss,
        len(chosen.module_overrides),
    )
    return chosen


def _tokens(calibration: Any, tokenizer: Any, nsamples: int, seqlen: int) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int32, torch.int64):
            shape = tuple(calibration.shape)
            raise ConfigValueError("mixed precision", "calibration", shape, "token ids (samples, seqlen)")
        return calibration
    if tokenizer is None:
        raise ConfigValueError(
            "mixed precision", "tokenizer", None, "the model's tokenizer, to read calibration text (or token ids)"
        )
    return calibration_tokens(tokenizer, calibration, nsamples=nsamples, seqlen=seqlen)
