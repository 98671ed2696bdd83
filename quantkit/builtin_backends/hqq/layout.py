"""quantkit's safetensors layout for HQQ linears, and its exact size.

hqq's own ``save_quantized`` writes a pickle and its state-dict decoder ``eval``\\ s strings
read from the file, so quantkit writes and reads this layout itself. A saved folder holds
``config.json`` (the model config; ``quantization_config`` is ``HQQConfig.to_dict()``) and
``model.safetensors``, where every tensor of the model keeps its name except each HQQ
linear ``<name>``, stored as:

==========================  ==========================  ====================================
tensor                      dtype                       shape
==========================  ==========================  ====================================
``<name>.W_q``              uint8 (1, 2, 4, 8 bits),    packed codes, see below
                            int32 (3 bits)
``<name>.scale``            the compute dtype           ``(G, 1)`` for axis 1, ``(1, G)`` for 0
``<name>.zero``             the compute dtype           same as ``scale`` (float zero points)
``<name>.bias``             the compute dtype           ``(out,)``; only when the linear has one
``<name>.quant_meta``       int32                       ``(7,)``: layout version (1),
                                                        out_features, in_features, nbits,
                                                        group_size, axis, codes per element
==========================  ==========================  ====================================

Grouping: the row-major ``(out, in)`` weight is viewed as ``(G, group_size)`` for axis 1
(runs of ``group_size`` consecutive weights of a row) or ``(group_size, G)`` for axis 0,
``G = out * in / group_size``. A weight is ``(code - zero) * scale`` with its group's
``scale`` and ``zero``.

Packing (hqq's ``BitPack``, along the first dimension of that grouped matrix; ``R`` rows,
``C`` columns), named in ``quant_meta`` by its codes per stored element:

- 8 bits (1): uint8 ``(R, C)``, codes as they are;
- 4 bits (2): uint8 ``(R/2, C)``; element ``i`` holds row ``i`` in bits 7-4, row ``i + R/2`` in bits 3-0;
- 2 bits (4): uint8 ``(R/4, C)``; row ``i + k*R/4`` in bits ``7-2k .. 6-2k``;
- 1 bit (8): uint8 ``(R/8, C)``; row ``i + k*R/8`` in bit ``7-k``;
- 3 bits (10): int32 ``(ceil(R/10), C)``; rows zero-padded to ``R' = 10*ceil(R/10)``,
  row ``i + k*R'/10`` in bits ``29-3k .. 27-3k``.
"""

from __future__ import annotations

import math

import torch

from quantkit.core.capabilities import ShapeLimit
from quantkit.core.errors import ModelFormatError

from .config import HQQConfig

LAYOUT_VERSION = 1
META_SUFFIX = "quant_meta"
CODES_PER_ELEMENT = {8: 1, 4: 2, 3: 10, 2: 4, 1: 8}
FLOAT_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}
WEIGHTS = ("out_features", "in_features")

HQQ_SHAPE_LIMITS = (
    ShapeLimit("group_size", 8, "hqq's requirement"),
    ShapeLimit(WEIGHTS, "group_size", "hqq quantizes the row-major weight in runs of group_size"),
    # axis 1 packs the out * in / group_size groups; axis 0 the group_size rows (a multiple of 8)
    ShapeLimit(WEIGHTS, ("group_size", 2), "hqq packs 2 4-bit groups per byte", when={"nbits": 4, "axis": 1}),
    ShapeLimit(WEIGHTS, ("group_size", 4), "hqq packs 4 2-bit groups per byte", when={"nbits": 2, "axis": 1}),
    ShapeLimit(WEIGHTS, ("group_size", 8), "hqq packs 8 1-bit groups per byte", when={"nbits": 1, "axis": 1}),
)
"""What hqq needs of a linear to group and pack it without losing weights (3-bit codes are padded)."""


def grouped_shape(config: HQQConfig, out_features: int, in_features: int) -> tuple[int, int]:
    """``(rows, columns)`` of the grouped weight matrix that hqq packs along its rows."""
    groups = out_features * in_features // config.group_size
    return (groups, config.group_size) if config.axis == 1 else (config.group_size, groups)


def packed_shape(config: HQQConfig, out_features: int, in_features: int) -> tuple[int, int]:
    rows, columns = grouped_shape(config, out_features, in_features)
    return math.ceil(rows / CODES_PER_ELEMENT[config.nbits]), columns


def stored_bits(config: HQQConfig, out_features: int, in_features: int) -> int:
    """Bits of ``W_q``, ``scale``, ``zero`` and ``quant_meta`` for one ``out x in`` linear."""
    rows, columns = packed_shape(config, out_features, in_features)
    codes = rows * columns * (32 if config.nbits == 3 else 8)
    groups = math.ceil(out_features * in_features / config.group_size)
    return codes + 2 * groups * FLOAT_BITS[config.compute_dtype] + 7 * 32


def layer_tensors(name: str, W_q: torch.Tensor, meta: dict, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The tensors of one HQQ linear in this layout, from hqq's ``W_q`` and ``meta``."""
    if "scale" not in meta or "zero" not in meta or meta.get("view_as_float"):
        raise ModelFormatError(
            f"{name}: HQQLinear with quantized, offloaded or float-viewed meta-data has no quantkit layout"
        )
    out_features, in_features = meta["shape"]
    info = [
        LAYOUT_VERSION,
        out_features,
        in_features,
        meta["nbits"],
        meta["group_size"],
        meta["axis"],
        CODES_PER_ELEMENT[meta["nbits"]],
    ]
    tensors = {
        f"{name}.W_q": W_q.detach(),
        f"{name}.scale": meta["scale"],
        f"{name}.zero": meta["zero"],
        f"{name}.{META_SUFFIX}": torch.tensor(info, dtype=torch.int32),
    }
    if bias is not None:
        tensors[f"{name}.bias"] = bias.detach()
    return {key: t.to("cpu").contiguous() for key, t in tensors.items()}


def pop_layer(
    name: str, config: HQQConfig, out_features: int, in_features: int, tensors: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """Take one linear's tensors out of ``tensors``; check them against ``config``.

    Returns ``W_q``, the hqq ``meta`` fields read from the file and the bias (or ``None``).
    """
    try:
        info = tensors.pop(f"{name}.{META_SUFFIX}").tolist()
        W_q, scale, zero = (tensors.pop(f"{name}.{key}") for key in ("W_q", "scale", "zero"))
    except KeyError as exc:
        raise ModelFormatError(f"{name} has no HQQ tensor {exc.args[0]!r} in the saved model") from None
    bias = tensors.pop(f"{name}.bias", None)
    expected = [
        LAYOUT_VERSION,
        out_features,
        in_features,
        config.nbits,
        config.group_size,
        config.axis,
        CODES_PER_ELEMENT[config.nbits],
    ]
    groups = out_features * in_features // config.group_size
    side = (groups, 1) if config.axis == 1 else (1, groups)
    dtype = getattr(torch, config.compute_dtype)
    problems = [
        f"{META_SUFFIX} {info} != {expected} expected from the config" if info != expected else "",
        f"W_q {W_q.dtype} {tuple(W_q.shape)}"
        if (
            tuple(W_q.shape) != packed_shape(config, out_features, in_features)
            or W_q.dtype != (torch.int32 if config.nbits == 3 else torch.uint8)
        )
        else "",
        f"scale/zero {scale.dtype} {tuple(scale.shape)}/{tuple(zero.shape)}, expected {dtype} {side}"
        if (scale.shape != side or zero.shape != side or scale.dtype != dtype or zero.dtype != dtype)
        else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ModelFormatError(f"{name}: saved HQQ tensors do not match the config: {'; '.join(problems)}")
    meta = {
        "nbits": config.nbits,
        "group_size": config.group_size,
        "axis": config.axis,
        "shape": torch.Size([out_features, in_features]),
        "scale": scale,
        "zero": zero,
    }
    return W_q, meta, bias
