"""A fused dequantize-GEMV that torch.compile generates, for weights in small groups of any width.

torch's int4 CPU operator takes 4-bit codes in groups of 32 to 256 inputs. Formats outside that
(GGUF's Q6_K, Q3_K and Q2_K with a scale per 16 inputs, HQQ at 2 or 3 bits, 8-bit groups) would
otherwise dequantize their whole weight on every call. :func:`gemv_inductor_kernel` repacks such a
weight once as ``W[o, i] = codes[o, i] * scales[g, o] + offsets[g, o]`` (int8 codes, one byte a
weight, and bfloat16 scales and offsets: relative rounding 2**-9, as for the int4 kernels) and
runs the input rows through one function inductor compiles to vectorized C++: codes converted,
multiplied by the row and summed per group, then scaled and summed over the groups (a layer
whose per-group sums would not stay in cache, a vocabulary-sized head, scales each code inside
a single sum instead, see :data:`GROUP_SUMS_BYTES`). The codes are
stored in blocks of 16 outputs, input-major within a block (``(out / 16, in, 16)``): the vectorized
loop runs along a block's outputs, reads the codes in order, and keeps a block's group sums in
cache. Activations and accumulation stay float32.

Measured per layer at batch 1 (``benchmarks/results/kernel_speed_inductor.txt``): 2.3-5.3x faster
than a float32 ``F.linear`` on SmolLM2's and Llama-3.2-1B's shapes, 0.5-0.8x the speed of
``int4-cpu`` where both can run. Above :data:`GEMV_ROWS` rows a row-by-row GEMV would read the
weight once a row, so the weight is dequantized for the call instead (a bfloat16 GEMM from
:data:`~.torch_kernels.DENSE_ROWS` rows on CPUs that multiply bfloat16 natively, as for the int4
kernels). Compiling takes about a second per weight shape, at the first forward; inductor caches
the code on disk across runs.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn import functional as F

from .capabilities import ShapeLimit
from .hardware import Hardware
from .kernels import Kernel
from .torch_kernels import dense, dense_matmul, groups_fit, sorted_groups

BLOCK = 16
"""Outputs per block: the vector width of the compiled loop (16 float32 lanes of AVX512)."""
GEMV_ROWS = 4
"""Input rows up to which the kernel runs one GEMV per row; above, the weight is dequantized for
the call (the GEMV reads 1.125 bytes a weight a row; dequantizing writes and reads ~9)."""
GROUP_SUMS_BYTES = 16 << 20
"""Largest per-group sums (float32, a value per output and group) the GEMV materializes between
its two loop nests; above (a vocabulary-sized head), each weight is scaled inside a single
reduction instead: the sums would fall out of cache, and past glibc's 32 MiB mmap threshold be
mapped afresh on every call."""
SPAN = 4096
"""Longest run of inputs one accumulator of the single reduction sums: inductor's generated C++
adds pairwise-summation bookkeeping to every step of a longer float32 sum."""
CXX = "clang++" if platform.system() == "Darwin" else "g++"
"""The compiler inductor builds CPU code with (its ``cpp.cxx`` default)."""


def _gemv(x: Tensor, codes: Tensor, scales: Tensor, offsets: Tensor | None) -> Tensor:
    """``x @ W.T`` for one float32 row ``x`` of ``in`` values (see :class:`GroupedGemvState`)."""
    blocks, n_groups, width = scales.shape
    inputs = x.view(1, n_groups, -1, 1)
    codes = codes.view(blocks, n_groups, -1, width).float()
    if blocks * n_groups * width * 4 <= GROUP_SUMS_BYTES:
        product = ((codes * inputs).sum(2) * scales.float()).sum(1)
    else:
        group_size = inputs.shape[2]
        spans = next(s for s in range(1, n_groups + 1) if n_groups % s == 0 and n_groups // s * group_size <= SPAN)
        weighted = codes * (inputs * scales.float().unsqueeze(2))
        product = weighted.view(blocks, spans, -1, width).sum(2).sum(1)
    if offsets is not None:
        product = product + (offsets.float() * inputs.sum(2)).sum(1)
    return product.view(-1)


def _gemv_rows(
    x: Tensor,
    codes: Tensor,
    scales: Tensor,
    offsets: Tensor | None,
    order: Tensor | None,
    padding: int,
    out: int,
) -> Tensor:
    """``x @ W.T`` for the few rows of ``x``: one graph from the activations as they come (gathered
    in group order, padded, float32) to the output in their dtype."""
    rows = F.pad((x if order is None else x.index_select(1, order)).float(), (0, padding))
    products = torch.stack([_gemv(row, codes, scales, offsets) for row in rows])
    return products[:, :out].to(x.dtype)


_COMPILED: dict[tuple, Callable[..., Sequence[Tensor]]] = {}
"""The compiled GEMVs of this process, by the shapes, strides and dtypes of their inputs and their
constants: layers of one shape share one."""


def _compiled(function: Callable[..., tuple[Tensor]], constants: tuple, tensors: list[Tensor]) -> Callable:
    """``function(*constants, *tensors)`` compiled by inductor for ``tensors`` as they are (static
    shapes), once per function, constants and tensor layout.
    Traced with ``make_fx`` on fake tensors (tracing computes nothing: a vocabulary-sized head's
    float32 intermediates would take gigabytes) and called directly: no dynamo guards to evaluate
    on each call (~40 us, what the GEMV itself takes on a small layer). ``emulate_precision_casts``:
    a float16 rounding in the graph (LLM.int8's) stays one."""
    key = (function, constants, *((t.shape, t.stride(), t.dtype) for t in tensors))
    compiled = _COMPILED.get(key)
    if compiled is None:
        with torch._inductor.config.patch(emulate_precision_casts=True):
            graph = make_fx(partial(function, *constants), tracing_mode="fake")(*tensors)
            compiled = torch._inductor.compile(graph, tensors)
        _COMPILED[key] = compiled
    return compiled


@dataclass(frozen=True)
class GroupedGemvState:
    """A weight repacked for :func:`gemv_inductor_kernel`, in blocks of :data:`BLOCK` outputs."""

    codes: Tensor
    """int8 ``(out / BLOCK, in, BLOCK)``: each block's codes, input-major."""
    scales: Tensor
    """``(out / BLOCK, n_groups, BLOCK)``, bfloat16 unless the format asked for more."""
    offsets: Tensor | None
    """Laid out as ``scales``; ``None`` where every offset is zero (symmetric formats)."""
    out_features: int
    prologue: Callable[[Tensor], Tensor] | None = None
    """Applied to the activations before the product (float32 out), compiled as a graph of its own
    (inside the GEMV's, inductor would recompute it once per block of outputs): a format that also
    quantizes its activations (LLM.int8) does it here. Hashable by value (a frozen dataclass):
    layers with equal prologues share their compiled code."""
    order: Tensor | None = None
    """The input channels sorted by group (act-order), ``None`` when they already are."""
    padding: int = 0
    """Zero inputs appended to each row to complete a ragged last group."""


def _blocked(values: Tensor, out_padding: int, dtype: torch.dtype) -> Tensor:
    """``(out, n)`` -> ``(out / BLOCK, n, BLOCK)`` contiguous, ``out`` padded with zero rows."""
    values = F.pad(values, (0, 0, 0, out_padding)).to(dtype)
    return values.view(-1, BLOCK, values.shape[1]).transpose(1, 2).contiguous()


def grouped_gemv_state(
    codes: Tensor,
    scales: Tensor,
    offsets: Tensor,
    group_size: int,
    order: Tensor | None = None,
    prologue: Callable[[Tensor], Tensor] | None = None,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> GroupedGemvState:
    """Repack ``W[o, i] = codes[o, i] * scales[g, o] + offsets[g, o]`` (``(out, in)`` integer codes in
    ``[-128, 128)``, ``(n_groups, out)`` float scales and offsets, ``g = i // group_size``; a ragged
    last group is padded with zero codes, and each input row with zeros; the outputs are padded
    to whole blocks with zero rows). ``prologue``: see :class:`GroupedGemvState`; ``scale_dtype``:
    bfloat16 (half the bytes to read) unless a format's scales are few and must stay exact."""
    out_features = codes.shape[0]
    padding, out_padding = -codes.shape[1] % group_size, -out_features % BLOCK
    state = GroupedGemvState(
        _blocked(F.pad(codes.to(torch.int8), (0, padding)), out_padding, torch.int8),
        _blocked(scales.t(), out_padding, scale_dtype),
        _blocked(offsets.t(), out_padding, scale_dtype) if offsets.any() else None,
        out_features,
        prologue,
        order,
        padding,
    )
    run_gemv(state, torch.zeros(1, codes.shape[1]))  # compiled at the first forward, not in a timed one
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


def run_gemv(state: GroupedGemvState, x: Tensor) -> Tensor:
    """The compiled GEMV on the rows of ``x`` (at most :data:`GEMV_ROWS`), the state's prologue
    applied first; each new input shape and dtype compiles once (in this process; inductor's disk
    cache keeps the code across runs)."""
    rows = x if state.prologue is None else _compiled(_prologue_call, (state.prologue,), [x])(x)[0]
    tensors = [t for t in (rows, state.codes, state.scales, state.offsets, state.order) if t is not None]
    constants = (state.offsets is not None, state.order is not None, state.padding, state.out_features)
    return _compiled(_gemv_call, constants, tensors)(*tensors)[0].to(x.dtype)


def _prologue_call(prologue: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor]:
    return (prologue(x),)


def _gemv_call(
    has_offsets: bool, has_order: bool, padding: int, out: int, x: Tensor, codes: Tensor, scales: Tensor, *rest: Tensor
) -> tuple[Tensor]:
    """:func:`_gemv_rows` on the tensors :func:`run_gemv` passes (``None`` ones left out)."""
    offsets = rest[0] if has_offsets else None
    order = rest[-1] if has_order else None
    return (_gemv_rows(x, codes, scales, offsets, order, padding, out),)


def _dense_rows(module: nn.Module, x: Tensor) -> Tensor:
    """Above :data:`GEMV_ROWS` rows: the weight dequantized for the call."""
    return dense_matmul(module, x) if dense(x) else F.linear(x, module.dequantize().to(x.dtype))


def _gemv_matmul(
    module: nn.Module, state: GroupedGemvState, x: Tensor, *, many_rows: Callable[[nn.Module, Tensor], Tensor]
) -> Tensor:
    return run_gemv(state, x) if x.shape[0] <= GEMV_ROWS else many_rows(module, x)


def gemv_inductor_kernel(
    *layers: type[nn.Module],
    prepare: Callable[[nn.Module], GroupedGemvState] = _prepare_grouped_codes,
    fits: Callable[[nn.Module], str] | None = groups_fit,
    shape_limits: tuple[ShapeLimit, ...] = (),
    many_rows: Callable[[nn.Module, Tensor], Tensor] = _dense_rows,
    activation_bits: int | None = None,
    description: str = (
        "group-quantized codes of 2 to 8 bits, any group size, repacked once as int8 with bfloat16 scales "
        "and offsets; a dequantize-GEMV torch.compile generates (float32 activations); the weight "
        "dequantized above 4 rows"
    ),
) -> Kernel:
    """The ``gemv-inductor`` kernel for ``layers``: by default classes with the
    :class:`~.torch_kernels.GroupedCodes` interface (``grouped_codes()``, ``group_index()``,
    ``bits``, ``group_size``); other formats pass a ``prepare`` ending with
    :func:`grouped_gemv_state`, their ``fits`` and ``shape_limits``, and ``many_rows``, the
    product above :data:`GEMV_ROWS` rows (default: the weight dequantized for the call), and
    ``activation_bits`` when their ``prepare``'s prologue quantizes the activations. Below
    ``int4-cpu`` and ``int4x2-cpu`` in priority, above the dequantize reference."""
    return Kernel(
        name="gemv-inductor",
        layers=layers,
        devices=frozenset({Hardware.CPU}),
        prepare=prepare,
        matmul=partial(_gemv_matmul, many_rows=many_rows),
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        compute_dtype=torch.float32,
        fits=fits,
        shape_limits=shape_limits,
        activation_bits=activation_bits,
        programs=(CXX,),
        priority=10,
        description=description,
    )
