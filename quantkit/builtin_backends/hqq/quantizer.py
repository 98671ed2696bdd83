"""hqq's ``Quantizer.quantize`` with its proximal optimizer, on the CPU a slab of groups at a time.

hqq 0.2.8 quantizes a whole weight at once: a float32 copy, then its optimizer's 20 iterations over
float32 temporaries of the whole weight (about 36 bytes a weight; 2.1 GB for a 14336 x 4096 MLP
weight), each temporary read from and written back to memory at every step. Here every iteration
passes over the weight in slabs of :data:`SLAB_ELEMENTS` (cast from its stored dtype as it is read),
so the temporaries stay in the processor's caches and memory holds the weight, its 8-bit codes and
one slab. Everything but the stopping rule works group by group, and so is the same computation:
the codes, scales and zero-points equal hqq's. The stopping rule compares the mean error over the
whole weight with the previous iteration's; here that mean is summed slab by slab, so it can differ
from hqq's in its last bits, and in a near-tie stop one iteration apart.

The slabs are shared among threads that each run torch on one thread: a slab's twenty-odd
small operations, each split over torch's threads, cost a wake-up of those threads apiece, which
under ``OMP_WAIT_POLICY=PASSIVE`` made the whole 3.3x slower (8.7 s against 2.7 s for a 14336 x 4096
weight on 2 cores).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from quantkit.layerwise import one_cpu_thread

SLAB_ELEMENTS = 1 << 18
"""Weights in a slab: its float temporaries (about 6 of 1 MiB in float32) fit the caches."""
SLAB_WORKING_BYTES = 6 << 20
"""Memory one thread's slab temporaries take at once."""
LP_NORM, BETA, ITERATIONS = 0.7, 10.0, 20
"""hqq 0.2.8's ``optimize_weights_proximal_legacy`` defaults (its ``kappa`` is unused there)."""
SMALLEST_RANGE, LARGEST_SCALE = 1e-4, 2e4
"""hqq's guards: a group whose range is at most this takes scale 1; scales are clamped to this."""


class Quantized(NamedTuple):
    """A weight as hqq stores it before bit-packing: codes shaped as hqq groups them, the inverted
    (dequantization) scale and the zero-point, float32."""

    codes: Tensor
    scale: Tensor
    zero: Tensor


def _shrink(x: Tensor, beta: float) -> Tensor:
    """hqq's generalized soft-threshold (``shrink_lp_op``) for ``LP_NORM`` < 1."""
    out = torch.abs(x)
    out.sub_((1.0 / beta) * out.pow(LP_NORM - 1)).clamp_min_(0.0)
    return out.mul_(torch.sign(x))


@contextmanager
def _slab_runner() -> Iterator[Callable[[Callable[[slice], object], list[slice]], list]]:
    """``run(fn, slabs)``: ``fn`` over ``slabs`` in order, spread over torch's threads, each
    running torch on one thread (restored after)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield lambda fn, slabs: [fn(slab) for slab in slabs]
        return
    with one_cpu_thread(torch.device("cpu")), ThreadPoolExecutor(threads) as pool:
        yield lambda fn, slabs: list(pool.map(fn, slabs))


def quantize_weight(
    weight: Tensor, nbits: int, group_size: int, axis: int, optimize: bool, round_zero: bool
) -> Quantized:
    """``weight`` (on the CPU) quantized as hqq's ``Quantizer.quantize`` does (channel-wise,
    groups of ``group_size`` along ``axis``), with the optimizer's float32 temporaries one slab at
    a time."""
    shape = (-1, group_size) if axis == 1 else (group_size, -1)
    groups = weight.reshape(shape) if axis == 1 else weight.reshape(shape).t()  # (groups, group_size)
    rows = max(1, SLAB_ELEMENTS // group_size)
    slabs = [slice(start, start + rows) for start in range(0, groups.shape[0], rows)]
    top = float(round(2**nbits - 1))
    with _slab_runner() as run:
        scale = torch.empty(groups.shape[0], 1, dtype=torch.float32)
        zero = torch.empty_like(scale)

        def initial(slab: slice) -> None:
            w = groups[slab].float()
            low, high = w.min(dim=1, keepdim=True)[0], w.max(dim=1, keepdim=True)[0]
            denominator = high - low
            s = top / denominator
            s = torch.where(denominator.abs() <= SMALLEST_RANGE, torch.full_like(s, 1.0), s).clamp(max=LARGEST_SCALE)
            scale[slab], zero[slab] = s, -low * s

        run(initial, slabs)
        if round_zero:
            zero = torch.round(zero)

        if optimize:
            best = math.inf
            for _ in range(ITERATIONS):
                updated = torch.empty_like(zero)

                def step(slab: slice, zero: Tensor = zero, updated: Tensor = updated) -> float:
                    w, s, z = groups[slab].float(), scale[slab], zero[slab]
                    q = torch.round(w * s + z).clamp_(0, top)
                    r = (q - z) / s
                    e = _shrink(w - r, BETA)
                    updated[slab] = torch.mean(q - (w - e) * s, dim=1, keepdim=True)
                    return torch.abs(w - r).sum(dtype=torch.float32).item()

                error = math.fsum(run(step, slabs))
                zero = updated
                current = float(torch.tensor(error / groups.numel(), dtype=torch.float32))
                if current < best:
                    best = current
                else:
                    break

        codes = torch.empty(groups.shape, dtype=torch.uint8)

        def final(slab: slice) -> None:
            codes[slab] = torch.round(groups[slab].float() * scale[slab] + zero[slab]).clamp_(0, top).to(torch.uint8)

        run(final, slabs)
    if axis == 0:
        codes, scale, zero = codes.t(), scale.t(), zero.t()
    return Quantized(codes.contiguous(), 1.0 / scale, zero.contiguous())
