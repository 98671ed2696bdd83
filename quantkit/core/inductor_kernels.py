"""A fused dequantize-GEMV that torch.compile generates, for weights in small groups of any width.

torch's int4 CPU operator takes 4-bit codes in groups of 32 to 256 inputs. Formats outside that
(GGUF's Q6_K, Q3_K and Q2_K with a scale per 16 inputs, HQQ at 2 or 3 bits, 8-bit groups) would
otherwise dequantize their whole weight on every call. :func:`gemv_inductor_kernel` repacks such a
weight once as ``W[o, i] = codes[o, i] * scales[g, o] + offsets[g, o]`` (int8 codes, one byte a
weight, and bfloat16 scales and offsets: relative rounding 2**-9, as for the int4 kernels) and
runs each input row through one function inductor compiles to vectorized C++: codes converted,
multiplied by the row and summed per group, then scaled, in one pass over the codes. The codes
are stored input-major (``(in, out)``) so the vectorized loop runs along the outputs and the sum
over a group needs no horizontal reduction. Activations and accumulation stay float32.

Measured (``benchmarks/results/kernel_speed_inductor.txt``): at decode, 2.0-3.4x faster than a
float32 ``F.linear`` on SmolLM2's and Llama-3.2-1B's shapes with groups of 16. Above
:data:`GEMV_ROWS` rows a row-by-row GEMV would read the weight once a row, so the weight is
dequantized for the call instead (a bfloat16 GEMM from :data:`~.torch_kernels.DENSE_ROWS` rows on
CPUs that multiply bfloat16 natively, as for the int4 kernels). Compiling takes about a second per
weight shape, at the first forward; inductor caches the code on disk across runs.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .capabilities import ShapeLimit
from .hardware import Hardware
from .kernels import Kernel
from .torch_kernels import dense, dense_matmul, groups_fit, sorted_groups

GEMV_ROWS = 4
"""Input rows up to which the kernel runs one GEMV per row; above, the weight is dequantized for
the call (the GEMV reads 1.25 bytes a weight a row; dequantizing writes and reads ~9)."""
COMPILED_SHAPES = 256
"""Weight shapes the GEMV is compiled for in one process (dynamo's default limit is 8)."""
CXX = "clang++" if platform.system() == "Darwin" else "g++"
"""The compiler inductor builds CPU code with (its ``cpp.cxx`` default)."""


def _gemv(x: Tensor, codes: Tensor, scales: Tensor, offsets: Tensor | None) -> Tensor:
    """``x @ W.T`` for one float32 row ``x`` of ``in`` values (see :class:`GroupedGemvState`)."""
    n_groups, out = scales.shape
    inputs = x.view(n_groups, -1, 1)
    sums = (codes.view(n_groups, -1, out).float() * inputs).sum(1)
    product = (sums * scales.float()).sum(0)
    return product if offsets is None else product + (offsets.float() * inputs.sum(1)).sum(0)


_compiled_gemv = torch.compile(_gemv, dynamic=False, fullgraph=True)


@dataclass(frozen=True)
class GroupedGemvState:
    """A weight repacked for :func:`gemv_inductor_kernel`."""

    codes: Tensor
    """int8 ``(in, out)``: the weight's codes, input-major."""
    scales: Tensor
    """bfloat16 ``(n_groups, out)``."""
    offsets: Tensor | None
    """bfloat16 ``(n_groups, out)``; ``None`` where every offset is zero (symmetric formats)."""
    order: Tensor | None = None
    """The input channels sorted by group (act-order), ``None`` when they already are."""
    padding: int = 0
    """Zero inputs appended to each row to complete a ragged last group."""


def grouped_gemv_state(
    codes: Tensor, scales: Tensor, offsets: Tensor, group_size: int, order: Tensor | None = None
) -> GroupedGemvState:
    """Repack ``W[o, i] = codes[o, i] * scales[g, o] + offsets[g, o]`` (``(out, in)`` integer codes in
    ``[-128, 128)``, ``(n_groups, out)`` float scales and offsets, ``g = i // group_size``; a ragged
    last group is padded with zero codes, and each input row with zeros)."""
    padding = -codes.shape[1] % group_size
    state = GroupedGemvState(
        F.pad(codes.to(torch.int8), (0, padding)).t().contiguous(),
        scales.to(torch.bfloat16).contiguous(),
        offsets.to(torch.bfloat16).contiguous() if offsets.any() else None,
        order,
        padding,
    )
    # compiled here, once per weight shape: past dynamo's recompile limit (8 shapes a function, a
    # global setting) it would run the function uncompiled; a cache hit never checks the limit
    with torch._dynamo.config.patch(recompile_limit=COMPILED_SHAPES):
        _compiled_gemv(torch.zeros(state.codes.shape[0]), state.codes, state.scales, state.offsets)
    return state


def _prepare_grouped_codes(module: nn.Module) -> GroupedGemvState:
    """The state of a layer with the :class:`~.torch_kernels.GroupedCodes` interface: codes centred
    on ``2**(bits - 1)`` (8-bit codes fit int8), the zero points folded into the offsets."""
    codes, zeros, scales = module.grouped_codes()
    g_idx = module.group_index()
    order = None if torch.equal(g_idx, sorted_groups(module)) else torch.argsort(g_idx, stable=True)
    if order is not None:
        codes = codes[:, order]
    centre = 1 << (module.bits - 1)
    scales = scales.float()
    return grouped_gemv_state(codes.int() - centre, scales, scales * (centre - zeros), module.group_size, order)


def _gemv_matmul(module: nn.Module, state: GroupedGemvState, x: Tensor) -> Tensor:
    if x.shape[0] > GEMV_ROWS:
        return dense_matmul(module, x) if dense(x) else F.linear(x, module.dequantize().to(x.dtype))
    # a new float32 tensor, made under the caller's grad mode like the one compiled for
    rows = (x if state.order is None else x.index_select(1, state.order)).to(torch.float32, copy=True)
    if state.padding:
        rows = F.pad(rows, (0, state.padding))
    if rows.shape[0] == 1:
        out = _compiled_gemv(rows[0], state.codes, state.scales, state.offsets).unsqueeze(0)
    else:
        out = torch.stack([_compiled_gemv(row, state.codes, state.scales, state.offsets) for row in rows])
    return out.to(x.dtype)


def gemv_inductor_kernel(
    *layers: type[nn.Module],
    prepare: Callable[[nn.Module], GroupedGemvState] = _prepare_grouped_codes,
    fits: Callable[[nn.Module], str] | None = groups_fit,
    shape_limits: tuple[ShapeLimit, ...] = (),
    description: str = (
        "group-quantized codes of 2 to 8 bits, any group size, repacked once as int8 with bfloat16 scales "
        "and offsets; a dequantize-GEMV torch.compile generates (float32 activations); the weight "
        "dequantized above 4 rows"
    ),
) -> Kernel:
    """The ``gemv-inductor`` kernel for ``layers``: by default classes with the
    :class:`~.torch_kernels.GroupedCodes` interface (``grouped_codes()``, ``group_index()``,
    ``bits``, ``group_size``); other formats pass a ``prepare`` ending with
    :func:`grouped_gemv_state`, their ``fits`` and ``shape_limits``. Below ``int4-cpu`` and ``int4x2-cpu`` in
    priority, above the dequantize reference."""
    return Kernel(
        name="gemv-inductor",
        layers=layers,
        devices=frozenset({Hardware.CPU}),
        prepare=prepare,
        matmul=_gemv_matmul,
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        compute_dtype=torch.float32,
        fits=fits,
        shape_limits=shape_limits,
        programs=(CXX,),
        priority=10,
        description=description,
    )
