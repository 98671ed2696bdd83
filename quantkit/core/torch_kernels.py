"""Kernels on torch's own int4 operators (CPU, and tinygemm on CUDA), for group-quantized layers of any format.

:func:`int4_cpu_kernel` runs torch's ``_weight_int4pack_mm_for_cpu`` for the layer classes a plugin
names. Those layers expose their weight as :class:`GroupedCodes` (``grouped_codes()``), the group
of each input (``group_index()``), ``bits`` and ``group_size``. torch's operator computes
``(q - 8) * scale + zero`` per group from a ``(n_groups, out, 2)`` tensor of ``(scale, zero)`` pairs;
with ``zero = scale * (8 - z)`` that is the format's ``scale * (q - z)``. Its float32 and float16
paths are scalar loops (seconds for a 4096x4096 weight and 128 rows, against ~60 ms in
bfloat16), so activations go to bfloat16 and the output back to their dtype: W4A16 numerics.
Act-order layers (``g_idx`` not sorted) are served when each group still holds ``group_size``
inputs: the weight's input channels are sorted by group once, and each input row is gathered
in that order. A ragged last group (SmolLM2's 576 inputs in groups of 128) is padded to a whole
group once, and each input row with zeros: the padding adds exact zeros to the product. Formats
with other parameters (GGUF's block scales and minimums, HQQ's float zero points) bring their
own ``prepare``, which ends with :func:`int4_state` on ``(scale, offset)`` pairs. Scales and
offsets are rounded to bfloat16 (relative 2**-9): every int4-cpu kernel equals
dequantize-then-matmul up to that rounding and the activations' own. From :data:`DENSE_ROWS`
input rows on it runs a bfloat16 GEMM on the dequantized weight instead (same numerics class:
the weight rounded to bfloat16). :func:`int4_cuda_kernel` runs the same groups, from the same
``prepare``, through torch's CUDA tinygemm (``_weight_int4pack_mm``, sm80 and newer): only the
packing differs, done where the weight lies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from itertools import chain
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .capabilities import ShapeLimit
from .hardware import Hardware, bf16_native
from .kernels import Kernel

INT4_GROUP_SIZES = (32, 64, 128, 256)
"""The ``qGroupSize`` values torch's int4 CPU operator takes."""
INT4_SHAPE_LIMITS = (ShapeLimit("out_features", 16, "torch's int4 CPU packing takes output channels in blocks of 16"),)
DENSE_ROWS = 128
"""From this many input rows on (a prompt, a batch), where the CPU multiplies bfloat16 natively
(AVX512-BF16, AMX), the kernel dequantizes the weight to bfloat16 for the call and runs oneDNN's
bfloat16 GEMM: torch's int4 operator is a GEMV whose time grows with the rows (half the speed of
a float32 ``F.linear`` at 128 rows), as ExLlama rebuilds the fp16 weight above a batch size. At
128 rows of a 576 x 576 layer (``benchmarks/results/kernel_speed.txt``, quiet): int4 0.71 ms,
dequantizing 0.48 ms, a bfloat16 GEMM ~0.1 ms; the dequantization's share falls as rows grow."""
INNER_K_TILES = 2
"""The CPU packing's ``innerKTiles`` (a CUDA tiling parameter the CPU layout ignores)."""
PACK_ROWS = 64
"""Rows both int4 layouts pack independently of the others (CPU: blocks of 64; CUDA: tiles of 8)."""
PACK_ELEMENTS = 1 << 24
"""Codes converted and packed at a time (64 MiB of int32)."""
CUDA_DENSE_ROWS = 64
"""From this many input rows on, ``int4-cuda`` dequantizes the weight to bfloat16 for the call and
runs cuBLAS: tinygemm is a GEMV-shaped kernel whose time grows with the rows (torchao's HQQ
benchmark on an A6000 has it slower than a dequantize-then-GEMM from 128 rows of a 4096 x 4096
layer), as ExLlama rebuilds the fp16 weight above a batch size."""


class GroupedCodes(NamedTuple):
    """A group-quantized weight: ``W[o, i] = scales[g, o] * (codes[o, i] - zeros[g, o])``, ``g`` the
    group of input ``i``."""

    codes: Tensor
    """``(out, in)`` integer codes."""
    zeros: Tensor
    """``(n_groups, out)`` integer zero points."""
    scales: Tensor
    """``(n_groups, out)`` float scales."""


@dataclass(frozen=True)
class Int4State:
    """A layer repacked for torch's int4 CPU operator."""

    packed: Tensor
    scale_zeros: Tensor
    """bfloat16 ``(n_groups, out, 2)``: each group's scale and ``scale * (8 - zero)``."""
    group_size: int
    order: Tensor | None
    """The input channels sorted by group (act-order), ``None`` when they already are."""
    padding: int
    """Zero inputs appended to each row to complete a ragged last group."""


def sorted_groups(module: nn.Module) -> Tensor:
    """The group of each input when groups are consecutive inputs (no act-order)."""
    return torch.arange(module.in_features, device=module.group_index().device) // module.group_size


def groups_fit(module: nn.Module) -> str:
    """``""`` when ``module``'s ``g_idx`` splits the inputs into whole groups (in any order), else why not."""
    g_idx = module.group_index()
    if torch.equal(g_idx.sort(stable=True).values, sorted_groups(module)):
        return ""
    return f"g_idx does not split the inputs into groups of {module.group_size} (in any order)"


def int4_state(
    codes: Tensor, scales: Tensor, offsets: Tensor, group_size: int, order: Tensor | None = None
) -> Int4State:
    """Repack a weight ``W[o, i] = (codes[o, i] - 8) * scales[g, o] + offsets[g, o]`` (``g`` the group
    of input ``i``; ``(n_groups, out)`` float scales and offsets, 4-bit ``(out, in)`` codes) for torch's
    int4 CPU operator: what every layer format's ``prepare`` ends with. A ragged last group is
    padded to ``group_size`` inputs (codes 8: weights equal to the group's offset, multiplied by
    the zero inputs the matmul appends)."""
    padding = -codes.shape[1] % group_size
    # int32 codes take 4 bytes a weight: packed a slice of rows at a time (both layouts pack
    # blocks of 64 rows independently), a 128k-row output head takes ~70 MB at once, not 1 GB
    rows = max(PACK_ROWS, PACK_ELEMENTS // codes.shape[1] // PACK_ROWS * PACK_ROWS)
    packed = torch.cat([_pack(codes[i : i + rows], padding) for i in range(0, codes.shape[0], rows)])
    scale_zeros = torch.stack([scales.float(), offsets.float()], dim=-1).to(torch.bfloat16)
    return Int4State(packed, scale_zeros, group_size, order, padding)


def _pack(codes: Tensor, padding: int) -> Tensor:
    """Rows of 4-bit codes, padded with ``padding`` codes 8, in torch's int4 layout for their device."""
    codes = F.pad(codes.to(torch.int32), (0, padding), value=8)
    if codes.device.type == "cuda":  # tinygemm takes two codes a byte, the even input in the high nibble
        nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), _inner_k_tiles(codes.shape[1]))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), INNER_K_TILES)


def _inner_k_tiles(in_features: int) -> int:
    """tinygemm's widest ``innerKTiles`` (8, 4 or 2 tiles of 16 inputs) dividing ``in_features``."""
    return next(tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0)


def _prepare_int4(module: nn.Module) -> Int4State:
    codes, zeros, scales = module.grouped_codes()
    g_idx = module.group_index()
    order = None if torch.equal(g_idx, sorted_groups(module)) else torch.argsort(g_idx, stable=True)
    if order is not None:
        codes = codes[:, order]
    scales = scales.float()
    return int4_state(codes, scales, scales * (8 - zeros), module.group_size, order)


def dense(x: Tensor) -> bool:
    """Whether ``x`` has the rows for which a bfloat16 GEMM on the dequantized weight is faster."""
    return x.shape[0] >= DENSE_ROWS and bf16_native("cpu")


def dense_matmul(module: nn.Module, x: Tensor) -> Tensor:
    """``x @ W.T`` as a bfloat16 GEMM on ``module``'s weight dequantized for the call."""
    return F.linear(x.to(torch.bfloat16), module.dequantize().to(torch.bfloat16)).to(x.dtype)


DenseProduct = Callable[[nn.Module, Tensor], Tensor]
"""``x @ W.T`` on the weight dequantized for the call: what a kernel runs for many input rows."""


def _int4_matmul(module: nn.Module, state: Int4State, x: Tensor, *, dense_product: DenseProduct) -> Tensor:
    on_cuda = x.device.type == "cuda"
    if x.shape[0] >= CUDA_DENSE_ROWS if on_cuda else dense(x):
        return dense_product(module, x)
    activations = (x if state.order is None else x.index_select(1, state.order)).to(torch.bfloat16)
    if state.padding:
        activations = F.pad(activations, (0, state.padding))
    product = torch.ops.aten._weight_int4pack_mm if on_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    return product(activations.contiguous(), state.packed, state.group_size, state.scale_zeros).to(x.dtype)


@dataclass(frozen=True)
class SplitInt4State:
    """A weight of up to 8-bit codes as two int4 products: high and low nibbles (see
    :func:`split_int4_state`)."""

    high: Int4State
    low: Int4State


def split_int4_state(codes: Tensor, scales: Tensor, offsets: Tensor, group_size: int) -> SplitInt4State:
    """Repack ``W[o, i] = codes[o, i] * scales[g, o] + offsets[g, o]`` (signed codes in
    ``[-128, 128)``) as the sum of two int4 weights torch's operator runs: the high nibbles
    ``codes >> 4`` (in ``[-8, 8)``, stored ``+ 8``) at ``16 * scale`` and no offset, the low nibbles
    ``codes & 15`` at ``scale`` with offset ``8 * scale + offsets``. Centred codes keep the offsets
    small, so their bfloat16 rounding costs what it costs a 4-bit format (a 64th of a step for
    ``8 * scale``)."""
    codes = codes.to(torch.int32)
    scales = scales.float()
    high = int4_state((codes >> 4) + 8, 16 * scales, torch.zeros_like(scales), group_size)
    low = int4_state(codes & 15, scales, 8 * scales + offsets.float(), group_size)
    return SplitInt4State(high, low)


def _split_int4_matmul(module: nn.Module, state: SplitInt4State, x: Tensor, *, dense_product: DenseProduct) -> Tensor:
    if dense(x):
        return dense_product(module, x)
    activations = x.to(torch.bfloat16)
    out = [
        torch.ops.aten._weight_int4pack_mm_for_cpu(activations, part.packed, part.group_size, part.scale_zeros)
        for part in (state.high, state.low)
    ]
    return (out[0].float() + out[1].float()).to(x.dtype)


def split_int4_cpu_kernel(
    *layers: type[nn.Module],
    prepare: Callable[[nn.Module], SplitInt4State],
    fits: Callable[[nn.Module], str],
    description: str,
    dense_product: DenseProduct = dense_matmul,
) -> Kernel:
    """The ``int4x2-cpu`` kernel for ``layers`` whose ``prepare`` ends with :func:`split_int4_state`:
    two int4 products a call (a byte a weight read), below ``int4-cpu`` in priority; from
    :data:`DENSE_ROWS` rows ``dense_product``."""
    return Kernel(
        name="int4x2-cpu",
        layers=layers,
        devices=frozenset({Hardware.CPU}),
        prepare=prepare,
        matmul=partial(_split_int4_matmul, dense_product=dense_product),
        compute_dtype=torch.bfloat16,
        shape_limits=INT4_SHAPE_LIMITS,
        fits=fits,
        priority=15,
        description=description,
    )


def int4_cpu_kernel(
    *layers: type[nn.Module],
    prepare: Callable[[nn.Module], Int4State] = _prepare_int4,
    fits: Callable[[nn.Module], str] | None = groups_fit,
    group_sizes: tuple[int, ...] = INT4_GROUP_SIZES,
    shape_limits: tuple[ShapeLimit, ...] = INT4_SHAPE_LIMITS,
    description: str = (
        "torch's _weight_int4pack_mm_for_cpu on codes repacked once, bfloat16 activations (W4A16); "
        f"from {DENSE_ROWS} rows a bfloat16 GEMM on the weight dequantized per call (native bfloat16 CPUs)"
    ),
    dense_product: DenseProduct = dense_matmul,
) -> Kernel:
    """The ``int4-cpu`` kernel for ``layers``: by default classes with the interface of the module
    docstring; a format whose weights are not :class:`GroupedCodes` passes its own ``prepare``
    (ending with :func:`int4_state`), ``fits``, ``group_sizes`` and ``shape_limits``, and may pass
    the ``dense_product`` of many rows (default :func:`dense_matmul`)."""
    return Kernel(
        name="int4-cpu",
        layers=layers,
        devices=frozenset({Hardware.CPU}),
        prepare=prepare,
        matmul=partial(_int4_matmul, dense_product=dense_product),
        compute_dtype=torch.bfloat16,
        bits=(4,),
        group_sizes=group_sizes,
        shape_limits=shape_limits,
        fits=fits,
        priority=20,
        description=description,
    )


def _ampere(module: nn.Module) -> str:
    """``""`` when ``module``'s CUDA device is sm80 or newer (tinygemm's tensor-core tiles)."""
    device = next(chain(module.buffers(), module.parameters())).device  # HQQ's layers hold parameters only
    if device.type != "cuda":
        return ""  # checked on its own device when it gets there
    major, minor = torch.cuda.get_device_capability(device)
    return "" if major >= 8 else f"tinygemm needs compute capability 8.0 or newer, not {major}.{minor}"


def int4_cuda_kernel(cpu_kernel: Kernel) -> Kernel:
    """The ``int4-cuda`` kernel serving what ``cpu_kernel`` (an :func:`int4_cpu_kernel`) serves, from
    the same ``prepare``, layers and declarations: torch's own tinygemm (``_weight_int4pack_mm``,
    what torchao's int4 weight-only layout runs) on the same ``(q - 8) * scale + zero`` groups;
    declared for NVIDIA GPUs, checked by ``benchmarks/gpu_check.py``."""
    fits = cpu_kernel.fits
    return replace(
        cpu_kernel,
        name="int4-cuda",
        devices=frozenset({Hardware.CUDA}),
        fits=lambda module: (fits(module) if fits is not None else "") or _ampere(module),
        description=(
            "torch's tinygemm _weight_int4pack_mm on codes repacked once (sm80+), bfloat16 activations (W4A16); "
            f"from {CUDA_DENSE_ROWS} rows cuBLAS on the weight dequantized to bfloat16 per call"
        ),
    )
