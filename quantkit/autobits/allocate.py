"""The allocation: one setting per layer, least total predicted loss within a bit budget.

This is a multiple-choice knapsack. :func:`allocate` solves it by dynamic programming over the
budget: after every layer ``i``, ``best[b]`` holds the least loss of layers ``0..i`` whose extra
cost (above each layer's cheapest setting) is at most ``b`` units. One vectorized step per layer
and setting, so the work is ``layers x settings x budget units``.

Costs are measured in units of their greatest common divisor, which makes the result exact; when
that would need more than ``resolution`` units, the unit grows to ``room / resolution`` and every
cost is rounded *up* to it, so the chosen settings still fit the budget exactly (stored bits never
exceed it) and their loss is within the rounding of the optimum. Exact stored bits of GGUF's
block types share a large unit (SmolLM2: 18 432 bits), so their allocations are exact in practice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..core.errors import ConfigValueError

RESOLUTION = 1 << 16
"""Most budget units the dynamic programme tracks."""


def allocate(
    costs: Sequence[Sequence[int]],
    losses: Sequence[Sequence[float]],
    budget: int,
    *,
    resolution: int = RESOLUTION,
) -> list[int]:
    """The index of one option per item whose total loss is least with ``sum(cost) <= budget``.

    ``costs[i][j]`` and ``losses[i][j]`` are item ``i``'s option ``j`` (bits, predicted loss).
    Raises :class:`ConfigValueError` when even the cheapest options do not fit.
    """
    if len(costs) != len(losses) or any(len(c) != len(x) or not c for c, x in zip(costs, losses)):
        raise ValueError("every item needs one loss per cost and at least one option")
    n, k = len(costs), max(len(c) for c in costs)
    cost = torch.zeros(n, k, dtype=torch.int64)
    loss = torch.full((n, k), math.inf, dtype=torch.float64)
    for i, (item_costs, item_losses) in enumerate(zip(costs, losses)):
        cost[i, : len(item_costs)] = torch.tensor([int(x) for x in item_costs], dtype=torch.int64)
        loss[i, : len(item_losses)] = torch.tensor([float(x) for x in item_losses], dtype=torch.float64)
    valid = torch.isfinite(loss)
    cheapest = cost.masked_fill(~valid, torch.iinfo(torch.int64).max).amin(1)
    room = int(budget) - int(cheapest.sum())
    if room < 0:
        raise ConfigValueError("allocate", "budget", budget, f">= {int(cheapest.sum())} bits (every cheapest option)")
    extra = (cost - cheapest.unsqueeze(1)).masked_fill(~valid, 0)
    unit = math.gcd(*extra[extra > 0].tolist()) if bool((extra > 0).any()) else 1
    unit = max(unit, -(-room // resolution), 1)
    steps = -(-extra // unit)  # rounded up: never over budget
    units = room // unit
    best = torch.zeros(units + 1, dtype=torch.float64)
    choice = torch.zeros(n, units + 1, dtype=torch.int16)
    for i in range(n):
        options = torch.full((k, units + 1), math.inf, dtype=torch.float64)
        for j in torch.nonzero(valid[i]).flatten().tolist():
            s = int(steps[i, j])
            if s <= units:
                options[j, s:] = best[: units + 1 - s] + loss[i, j]
        best, choice[i] = options.min(0)
    picked, b = [0] * n, units
    for i in reversed(range(n)):
        picked[i] = int(choice[i, b])
        b -= int(steps[i, picked[i]])
    return picked
