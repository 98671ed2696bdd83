"""GPTQ v1 checkpoint tensors, as auto-gptq and GPTQModel write them (``checkpoint_format="gptq"``).

The layout the exllama / cuda ``QuantLinear`` kernels of auto-gptq, optimum, transformers and
vLLM load, for a linear layer with ``in_features`` inputs and ``out_features`` outputs:

* ``qweight`` int32 ``(in_features * bits // 32, out_features)``: the integer weights of each
  output column packed along the input dim as one little-endian bit stream, input ``i`` taking
  bits ``[bits * i, bits * i + bits)``. For 2, 4 and 8 bits each word holds ``32 // bits`` whole
  values, the first in the lowest bits; for 3 bits every 32 inputs fill 3 words and inputs 10
  and 21 of each such run straddle two words (auto-gptq's cross-word packing).
* ``qzeros`` int32 ``(n_groups, out_features * bits // 32)``: ``zero - 1`` packed the same way
  along the output dim; v1 stores zero points minus one and the kernels add the one back.
* ``scales`` float16 ``(n_groups, out_features)``.
* ``g_idx`` int32 ``(in_features,)``: the group of every input channel.

Zero points must lie in ``[1, 2**bits - 1]``: 0 cannot be stored at all, and ``2**bits``
(stored as ``2**bits - 1``) overflows in loaders that convert v1 to GPTQModel's v2 layout.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)
_WORD_MASK = 0xFFFFFFFF


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"GPTQ packing supports bits in {SUPPORTED_BITS}, got bits={bits}")


def _check_range(name: str, values: Tensor, low: int, high: int) -> None:
    if values.numel() and (values.min() < low or values.max() > high):
        raise ValueError(f"{name} must lie in [{low}, {high}]; got [{values.min()}, {values.max()}]")


def _to_int32(words: Tensor) -> Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _bit_offsets(n_values: int, bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Word index and shift within the word of each value of a packed bit stream."""
    offsets = torch.arange(n_values, device=device) * bits
    return offsets // 32, offsets % 32


def pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack ints ``(n, m)`` in ``[0, 2**bits)`` along dim 0 into int32 ``(n * bits // 32, m)``."""
    n_values = values.shape[0]
    if n_values * bits % 32:
        raise ValueError(f"cannot pack {n_values} values of {bits} bits into whole 32-bit words")
    if bits in (2, 4, 8):
        return _pack_bytes(values, bits)
    word, shift = _bit_offsets(n_values, bits, values.device)
    values = values.to(torch.int64)
    words = torch.zeros(n_values * bits // 32, values.shape[1], dtype=torch.int64, device=values.device)
    # Values occupy disjoint bits, so adding them is the same as or-ing them.
    words.index_add_(0, word, (values << shift[:, None]) & _WORD_MASK)
    if 32 % bits:
        spill = shift + bits > 32
        words.index_add_(0, word[spill] + 1, values[spill] >> (32 - shift[spill])[:, None])
    return _to_int32(words)


def _pack_bytes(values: Tensor, bits: int) -> Tensor:
    """:func:`pack_rows` for 2, 4 and 8 bits: the values as uint8 with each column's run contiguous
    (no copy when ``values`` is the transpose of a row-major tensor, as GPTQ's weight is), ``8 // bits``
    of them or-ed into each byte, every four bytes read as one little-endian word, and one transposed
    copy of the words. On uint8, unit-stride: 14 strided int32 passes took 5x as long."""
    n, m = values.shape
    per_byte = 8 // bits
    codes = values.to(torch.uint8).t().contiguous()  # (m, n)
    packed = codes[:, ::per_byte].clone()
    for slot in range(1, per_byte):  # at most 3 more slots; each step is one vectorised op
        packed |= codes[:, slot::per_byte] << (slot * bits)
    words = packed.view(m, -1, 4)
    if sys.byteorder == "big":
        words = words.flip(-1)
    # flat first: a view's dtype change needs unit strides, which a size-1 dimension need not have
    return words.reshape(-1).view(torch.int32).view(m, -1).t().contiguous()  # (n * bits // 32, m)


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """:func:`unpack_rows` for 2, 4 and 8 bits, as uint8: int32 ``(w, m)`` to ``(w * 32 // bits, m)``.

    The words are read as their four little-endian bytes, each byte holding ``8 // bits`` whole
    values, the first in the lowest bits: one shift and mask per value slot of a byte, on uint8
    (a fifth of the memory traffic of shifting int32 words, and no per-element shift amounts).
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"unpack_codes takes 2, 4 or 8 bits, got {bits}")
    words, m = packed.shape
    data = packed.contiguous().view(-1).view(torch.uint8).view(words, m, 4)
    if sys.byteorder == "big":
        data = data.flip(-1)
    data = data.permute(0, 2, 1)  # (words, byte, m)
    per_byte = 8 // bits
    codes = torch.empty(words, 4, per_byte, m, dtype=torch.uint8, device=packed.device)
    for slot in range(per_byte):  # at most 4 slots; each step is one vectorised op
        torch.bitwise_and(data >> (slot * bits), 2**bits - 1, out=codes[:, :, slot])
    return codes.view(-1, m)


def unpack_rows(packed: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_rows`: int32 ``(w, m)`` to int32 ``(w * 32 // bits, m)``."""
    if bits in (2, 4, 8):
        return unpack_codes(packed, bits).to(torch.int32)
    if 32 % bits == 0:  # whole values per word: one broadcast shift (the mask drops sign bits)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
        values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2**bits - 1)
        return values.reshape(-1, packed.shape[1])
    word, shift = _bit_offsets(packed.shape[0] * 32 // bits, bits, packed.device)
    words = packed.to(torch.int64) & _WORD_MASK
    values = words[word] >> shift[:, None]
    if 32 % bits:
        spill = shift + bits > 32
        values[spill] |= words[word[spill] + 1] << (32 - shift[spill])[:, None]
    return (values & (2**bits - 1)).to(torch.int32)


def pack_gptq(intweight: Tensor, zeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int) -> dict[str, Tensor]:
    """Pack one layer into GPTQ v1 tensors.

    Args:
        intweight: ``(out, in)`` integer weights in ``[0, 2**bits)``.
        zeros: ``(n_groups, out)`` integer zero points in ``[1, 2**bits)``.
        scales: ``(n_groups, out)`` scales (stored as float16).
        g_idx: ``(in,)`` group index of every input channel.
        bits: 2, 3, 4 or 8; ``in * bits`` and ``out * bits`` must be multiples of 32.

    Returns:
        ``{"qweight", "qzeros", "scales", "g_idx"}`` on the inputs' device.
    """
    _check_bits(bits)
    out_features, in_features = intweight.shape
    n_groups = scales.shape[0]
    if scales.shape != (n_groups, out_features) or zeros.shape != scales.shape:
        raise ValueError(
            f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be "
            f"(n_groups, out_features={out_features})"
        )
    if g_idx.shape != (in_features,):
        raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}; expected (in_features={in_features},)")
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if size * bits % 32:
            raise ValueError(f"{name}={size} times bits={bits} must be a multiple of 32 to pack")
    _check_range("intweight", intweight, 0, 2**bits - 1)
    _check_range("zeros", zeros, 1, 2**bits - 1)
    _check_range("g_idx", g_idx, 0, n_groups - 1)
    return {
        "qweight": pack_rows(intweight.t(), bits),
        "qzeros": pack_rows((zeros - 1).t(), bits).t().contiguous(),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(qweight: Tensor, qzeros: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Unpack GPTQ v1 tensors into int32 ``intweight (out, in)`` and ``zeros (n_groups, out)``.

    The stored ``zero - 1`` gets its one added back, as the kernels do.
    """
    _check_bits(bits)
    intweight = unpack_rows(qweight, bits).t()
    zeros = unpack_rows(qzeros.t(), bits).t() + 1
    return intweight.contiguous(), zeros.contiguous()


def dequantize_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int) -> Tensor:
    """Float32 weight ``(out, in)`` of GPTQ v1 tensors: ``scales[g] * (q - zeros[g])``.

    Without act-order (``g_idx`` numbering consecutive equal groups) the groups broadcast over
    a view; otherwise each input row gathers its group's scales and zeros.
    """
    _check_bits(bits)
    # (in, out): rows of qweight, no transposed copies; uint8 where whole values fill bytes
    intweight = unpack_codes(qweight, bits) if bits != 3 else unpack_rows(qweight, bits)
    zeros = unpack_rows(qzeros.t(), bits).t() + 1
    n_groups, out_features = scales.shape
    in_features = intweight.shape[0]
    if in_features % n_groups == 0 and torch.equal(
        g_idx, torch.arange(in_features, device=g_idx.device, dtype=g_idx.dtype) // (in_features // n_groups)
    ):
        weight = intweight.view(n_groups, -1, out_features).float()
        zeros = zeros.float().contiguous().view(n_groups, 1, out_features)  # int32 or strided: slow paths
        weight.sub_(zeros).mul_(scales.float().view(n_groups, 1, out_features))
        return weight.view(in_features, out_features).t()
    groups = g_idx.long()
    return (scales.float()[groups] * (intweight - zeros[groups])).t()
