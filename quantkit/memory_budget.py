"""A memory budget for a quantization run: the run plans to stay under it or fails before any heavy work.

:func:`plan_memory` predicts the run's peak (:func:`quantkit.estimate_quantization`, in memory or
streamed) and, when that passes the budget, the peak with the calibration hidden states of a
layer-by-layer calibration kept on disk (:data:`quantkit.layerwise.SPILL_ATTR`); it chooses the
spill when that fits, and otherwise raises :class:`~quantkit.core.errors.MemoryBudgetError` with
the predicted peak, what dominates it, the smallest budget that would work and, for an in-memory
run that streaming would fit, ``--stream``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from .core.config import QuantConfig
from .core.errors import ConfigValueError, MemoryBudgetError
from .core.hardware import hardware_of
from .core.registry import get_registry
from .estimate import REFERENCE_RATES, QuantizeEstimate, estimate_quantization, stored_model

log = logging.getLogger("quantkit")

BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gib": 2**30,
    "t": 2**40,
    "tib": 2**40,
}
"""Size suffixes (any case): KB, MB, GB, TB are powers of 1000; K, M, G, T and KiB, MiB, GiB, TiB powers of 1024."""


def parse_bytes(value: int | float | str, field: str = "max_memory") -> int:
    """A size in bytes from a number or a string with a unit: ``4GB`` (4e9), ``3GiB`` and ``3G``
    (3 * 2**30), ``2.5G``, ``512MiB``; :class:`ConfigValueError` naming ``field`` otherwise."""
    allowed = "a positive size in bytes, or with a unit: 4GB (10^9 bytes), 3GiB or 3G (2^30), 512MiB, 2.5G"
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", value.lower())
        if match and match.group(2) in BYTE_UNITS:
            number = float(match.group(1)) * BYTE_UNITS[match.group(2)]
    if number is None or not math.isfinite(number) or number < 1:
        raise ConfigValueError("quantize", field, value, allowed)
    return int(number)


def format_gib(size: int) -> str:
    """``size`` bytes as GiB rounded up to 0.01: a budget given as this fits ``size``."""
    return f"{math.ceil(size / 2**30 * 100) / 100:.2f}GiB"


@dataclass(frozen=True)
class MemoryPlan:
    """How a run stays under its budget: ``spill`` its calibration hidden states to disk or not;
    ``estimate`` the prediction it was planned on (``None`` without a budget)."""

    spill: bool = False
    estimate: QuantizeEstimate | None = None


def plan_memory(
    model: nn.Module | str | os.PathLike,
    config: QuantConfig,
    max_memory: int | float | str | None,
    calibration: torch.Tensor | None,
    *,
    streaming: bool,
    device: torch.device | str = "cpu",
) -> MemoryPlan:
    """Plan ``quantkit.quantize`` (``model`` in memory) or, with ``streaming``,
    ``quantkit.quantize_streaming`` (``model`` a checkpoint folder) of ``config`` on the
    ``calibration`` token ids (``None`` for calibration-free methods) under ``max_memory`` bytes
    (:func:`parse_bytes`; ``None``: no budget, nothing predicted). Spills the calibration hidden
    states only when the run would pass the budget otherwise; raises :class:`MemoryBudgetError`
    when it passes it either way."""
    if max_memory is None:
        return MemoryPlan()
    budget = parse_bytes(max_memory)
    if not isinstance(model, nn.Module):
        model = stored_model(model)
    shape = {} if calibration is None else {"nsamples": calibration.shape[0], "seqlen": calibration.shape[1]}

    def predict(streamed: bool, spill: bool) -> QuantizeEstimate:
        return estimate_quantization(
            model, config, rates=REFERENCE_RATES, streaming=streamed, spill=spill, device=device, **shape
        )

    kept = predict(streaming, False)
    if kept.peak_bytes <= budget:
        return MemoryPlan(False, kept)
    spilled = predict(streaming, True)
    best = spilled if spilled.spill and spilled.peak_bytes < kept.peak_bytes else kept
    if best.peak_bytes <= budget:
        log.info(
            "max_memory %s: calibration activations go to disk (predicted peak %s, %s in memory)",
            format_gib(budget),
            format_gib(best.peak_bytes),
            format_gib(kept.peak_bytes),
        )
        return MemoryPlan(True, best)
    run = "streamed run" if streaming else "run"
    message = (
        f"max_memory={format_gib(budget)} is too small: the {run}'s predicted peak is {format_gib(kept.peak_bytes)}"
        + (f" ({format_gib(best.peak_bytes)} with its calibration activations spilled to disk)" if best.spill else "")
        + f", mostly {best.dominant(3)}; the smallest budget that would work is {format_gib(best.peak_bytes)}"
    )
    if best.calibration and max(best.memory, key=best.memory.get) in ("hidden states", "chunk temporaries"):
        message += "; fewer or shorter calibration samples (nsamples, seqlen) lower it"
    if not streaming and _streams(config, device):
        streamed = min(predict(True, False), predict(True, True), key=lambda e: e.peak_bytes)
        if streamed.peak_bytes < best.peak_bytes:
            verdict = "fits" if streamed.peak_bytes <= budget else "would need"
            message += (
                f"; streaming from the checkpoint folder (quantize --stream, quantkit.quantize_streaming) {verdict} "
                f"{format_gib(streamed.peak_bytes)}"
            )
    raise MemoryBudgetError(message, predicted=best.peak_bytes, budget=budget)


def _streams(config: QuantConfig, device: torch.device | str) -> bool:
    """Whether ``quantkit.quantize_streaming`` can run ``config`` on ``device``."""
    backend = get_registry().backend_for(config, hardware_of(torch.device(device)))
    return backend.streams_layers if backend.needs_calibration(config) else backend.streams_modules
