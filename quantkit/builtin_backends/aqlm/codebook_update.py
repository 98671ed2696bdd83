"""AQLM's codebook and scale update: Adam on the output error for fixed codes."""

from __future__ import annotations

import torch
from torch import Tensor

from quantkit.layerwise import one_cpu_thread

from .beam_search import dequantize


def update_codebooks(
    weight: Tensor, H: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, *, steps: int, lr: float
) -> tuple[Tensor, Tensor]:
    """``steps`` Adam steps on codebooks and scales minimising ``tr((Ŵ - W) H (Ŵ - W)^T)``.

    The gradient of that error in ``Ŵ`` is ``2 (Ŵ - W) H``; autograd only carries it back
    through the codebook look-up, so a step costs one ``out x in x in`` matmul. That look-up's
    backward (an accumulating scatter) runs on one CPU thread: on more, its float sums come in
    another order from run to run, and quantizing twice would not write the same bytes.
    """
    codebooks = codebooks.detach().clone().requires_grad_(True)
    scales = scales.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([codebooks, scales], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            approximation = dequantize(codes, codebooks, scales)
            grad = 2 * (approximation.detach() - weight) @ H
            optimizer.zero_grad(set_to_none=False)
            with one_cpu_thread(approximation.device):
                approximation.backward(grad)
            optimizer.step()
    return codebooks.detach(), scales.detach()
