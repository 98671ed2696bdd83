"""EETQ's int8 weights: the quantization and the layout its CUTLASS kernel reads.

Read from EETQ's ``csrc/cutlass_kernels/cutlass_preprocessors.cc`` (``symmetric_quantize`` and
``preprocess_weights_for_mixed_gemm``, the FasterTransformer code EETQ ships), for int8 weights
on SM 7.5 to 8.9 (``LayoutDetailsB<uint8_t, Sm75/Sm80>``: ``ColumnMajorTileInterleave<64, 2>``
with the ``OpMultiplyAddDequantizeInterleavedBToA`` operator). EETQ's ``quant_weights`` takes
``B = weight.T``, row-major ``(in_features, out_features)``, and:

1. quantizes each column of ``B`` (an output channel): ``scale = absmax / 128``,
   ``code = clamp(round(w / scale), -128, 127)`` in float32, ``round`` halfway away from zero;
   the scale is returned as float16 (a channel's largest weight, ``128 * scale``, clips to 127
   when positive);
2. permutes the rows of ``B`` in groups of 16 (``permute_B_rows_for_mixed_gemm``): output row
   ``r`` of a group is input row :data:`ROW_PERMUTATION` ``[r]``;
3. transposes it to column-major (``subbyte_transpose``): one run of ``in_features`` bytes per
   output channel;
4. interleaves pairs of output channels in tiles of 64 inputs (``interleave_column_major_tensor``):
   the 64 bytes of tile ``t`` of channel ``2j + s`` go to row ``j`` at byte ``128 t + 64 s``;
5. adds 128 to every code (int8 wrapping, i.e. flips bit 7) and swaps the middle two bytes of every
   4 (``add_bias_and_interleave_int8s_inplace``: ``[e0 e1 e2 e3] -> [e0 e2 e1 e3]``);

and the result keeps ``B``'s shape, ``(in_features, out_features)``, int8. Both dimensions must
be multiples of 64 (the interleave checks ``out_features % 64``; the 64-input tiles need
``in_features % 64``). :func:`pack` does steps 2-5 with index operations, :func:`unpack` undoes them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantkit.core.errors import QuantizationError

TILE = 64
"""The kernel's ``ThreadblockK``: inputs per interleaved tile, and the multiple both dimensions need."""
ROW_PERMUTATION = (0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15)
"""Step 2: the input rows each group of 16 rows of ``B`` takes, in order (int8 on Turing/Ampere)."""
COLUMNS_INTERLEAVED = 2
"""Step 4: output channels sharing a tile row (128-byte cache line / 64 inputs)."""
REGISTER_ORDER = (0, 2, 1, 3)
"""Step 5: the byte order within each 32-bit register (its own inverse)."""
_INVERSE_ROW_PERMUTATION = tuple(sorted(range(16), key=ROW_PERMUTATION.__getitem__))


def quantize(weight: Tensor) -> tuple[Tensor, Tensor]:
    """EETQ's symmetric per-channel int8 quantization of ``weight`` ``(out, in)``: the codes
    ``(out, in)`` int8 and the float16 scales ``(out,)``. A channel of zeros gets scale 0 and codes 0
    (EETQ's code divides 0 by 0 there and stores 127; the weight it encodes is 0 either way)."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = absmax / 128
    x = w / torch.where(absmax > 0, scale, torch.ones_like(scale))[:, None]
    whole = torch.trunc(x)
    rounded = torch.where((x - whole).abs() >= 0.5, whole + torch.sign(x), whole)  # halfway away from zero, as C
    return rounded.clamp_(-128, 127).to(torch.int8), scale.half()


def dequantize(codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The ``(out, in)`` weight that codes ``(out, in)`` and scales ``(out,)`` encode."""
    return (codes.float() * scales.float()[:, None]).to(dtype)


def check_shape(out_features: int, in_features: int) -> None:
    """Refuse a shape EETQ's layout cannot hold (the backend's shape limits catch it first)."""
    if out_features % TILE or in_features % TILE:
        raise QuantizationError(
            f"EETQ's layout needs both dimensions to be multiples of {TILE}; got out_features={out_features}, "
            f"in_features={in_features}"
        )


def pack(codes: Tensor) -> Tensor:
    """EETQ's kernel layout ``(in, out)`` int8 of the row-major codes ``(out, in)`` (steps 2-5)."""
    n, k = codes.shape
    check_shape(n, k)
    permuted = codes.reshape(n, k // 16, 16)[:, :, list(ROW_PERMUTATION)]  # 2; (out, in) row-major is 3
    tiles = permuted.reshape(n // COLUMNS_INTERLEAVED, COLUMNS_INTERLEAVED, k // TILE, TILE).transpose(1, 2)  # 4
    registers = tiles.reshape(-1, 4)[:, list(REGISTER_ORDER)]  # 5: the swap
    return (registers ^ -128).reshape(k, n)  # 5: + 128


def unpack(packed: Tensor) -> Tensor:
    """The row-major codes ``(out, in)`` of EETQ's kernel layout ``(in, out)``: :func:`pack` undone."""
    k, n = packed.shape
    check_shape(n, k)
    registers = (packed ^ -128).reshape(-1, 4)[:, list(REGISTER_ORDER)]
    tiles = registers.reshape(n // COLUMNS_INTERLEAVED, k // TILE, COLUMNS_INTERLEAVED, TILE).transpose(1, 2)
    permuted = tiles.reshape(n, k // 16, 16)
    return permuted[:, :, list(_INVERSE_ROW_PERMUTATION)].reshape(n, k)
