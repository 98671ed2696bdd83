"""compressed-tensors' ``pack-quantized`` layout (llm-compressor's output, vLLM's native format), for
weight-only integer schemes: written from and read into quantkit's grids.

Per quantized linear with ``in`` inputs, ``out`` outputs, ``b``-bit codes and ``G`` groups:

* ``weight_packed`` int32 ``(out, in * b / 32)``: the codes of each output row as one little-endian bit
  stream along the input dim, input ``i`` at bits ``[b * i, b * i + b)`` (GPTQ's ``qweight`` stream,
  transposed). compressed-tensors quantizes to signed ints and adds ``2**(b-1)`` before packing, so the
  packed values are the unsigned codes.
* ``weight_scale`` ``(out, G)``, in the model's float dtype where it holds the scales exactly.
* ``weight_zero_point`` int32 ``(out * b / 32, G)`` for asymmetric schemes only: the unsigned zero points
  of each group packed the same way along the output dim (no GPTQ-style ``zero - 1``). Symmetric
  schemes store none: their zero point is the grid's middle, ``2**(b-1)``.
* ``weight_shape`` int64 ``[out, in]``.

``W = scale * (code - zero)`` in every format, so the conversion moves codes and zero points bit for
bit. The ``quantization_config`` block names ``quant_method="compressed-tensors"``, ``format=
"pack-quantized"``, ``quantization_status="compressed"``, one config group per scheme (``num_bits``,
``type="int"``, ``symmetric``, ``strategy`` ``group`` or ``channel``, ``group_size``) targeting
``Linear`` (or, with several schemes, the layers by name) and the unquantized linears under ``ignore``.
compressed-tensors 0.20 dropped act-order groups (``actorder="group"`` with ``weight_g_idx``), so
act-order layers are not written; ``actorder="weight"`` only describes calibration and is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantkit.builtin_backends.gptq.packing import pack_rows, unpack_rows
from quantkit.core.errors import ConfigValueError, ModelFormatError

from .grid import Grid, GridWeight, schemes

QUANT_METHOD = "compressed-tensors"
PACKED = "pack-quantized"
STRATEGIES = ("group", "channel")


def layer_tensors(weight: GridWeight, scale_dtype: torch.dtype) -> dict[str, Tensor]:
    """The ``pack-quantized`` tensors of one layer (``bias`` too when it has one), keyed without its prefix.

    Scales are stored in ``scale_dtype`` (the model's) where that holds them exactly, as llm-compressor
    does: compressed-tensors dequantizes in the scales' dtype, so float16 scales in a float32 model would
    round every weight to float16. Otherwise they keep their own dtype.
    """
    scales = weight.scales.to(scale_dtype)
    if not torch.equal(scales.to(weight.scales.dtype), weight.scales):
        scales = weight.scales
    tensors = {
        "weight_packed": pack_rows(weight.codes.t(), weight.bits).t().contiguous(),
        "weight_scale": scales.t().contiguous(),
        "weight_shape": torch.tensor(weight.codes.shape, dtype=torch.int64),
    }
    if not weight.symmetric:
        tensors["weight_zero_point"] = pack_rows(weight.zeros.t(), weight.bits).contiguous()
    if weight.bias is not None:
        tensors["bias"] = weight.bias.detach()
    return tensors


def weights_args(grid: Grid) -> dict[str, Any]:
    """compressed-tensors' ``QuantizationArgs`` of a grid, as it serializes them."""
    channel = grid.group_size == -1
    return {
        "num_bits": grid.bits,
        "type": "int",
        "symmetric": grid.symmetric,
        "group_size": None if channel else grid.group_size,
        "strategy": "channel" if channel else "group",
        "dynamic": False,
    }


def quantization_config_block(weights: Mapping[str, GridWeight], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` block: one config group per distinct scheme among ``weights``."""
    by_scheme: dict[Grid, list[str]] = {}
    for name, grid in schemes(weights).items():
        by_scheme.setdefault(grid, []).append(name)
    groups = {
        f"group_{i}": {
            "targets": ["Linear"] if len(by_scheme) == 1 else names,
            "weights": weights_args(grid),
            "input_activations": None,
            "output_activations": None,
            "format": None,
        }
        for i, (grid, names) in enumerate(by_scheme.items())
    }
    return {
        "quant_method": QUANT_METHOD,
        "format": PACKED,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def read_block(block: Mapping[str, Any]) -> tuple[list[tuple[list[str], Grid]], list[str]]:
    """The ``(targets, grid)`` of every config group and the ``ignore`` list; anything but a
    weight-only integer ``pack-quantized`` scheme is refused, naming the field."""
    where = "quantization_config"
    expect = {"quant_method": (QUANT_METHOD,), "format": (PACKED,), "quantization_status": ("compressed",)}
    for key, allowed in expect.items():
        if block.get(key) not in allowed:
            raise ConfigValueError(where, key, block.get(key), repr(allowed[0]))
    groups = block.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise ConfigValueError(where, "config_groups", groups, "a non-empty mapping of config groups")
    found = []
    for label, group in groups.items():
        field = f"config_groups.{label}"
        if not isinstance(group, Mapping):
            raise ConfigValueError(where, field, group, "a mapping")
        for key in ("input_activations", "output_activations"):
            if group.get(key) is not None:
                raise ConfigValueError(where, f"{field}.{key}", group[key], "null (weight-only schemes)")
        if group.get("format") not in (None, PACKED):
            raise ConfigValueError(where, f"{field}.format", group.get("format"), f"null or {PACKED!r}")
        targets = _patterns(where, f"{field}.targets", group.get("targets"))
        found.append((targets, _read_weights(where, f"{field}.weights", group.get("weights"))))
    return found, _patterns(where, "ignore", block.get("ignore") or [])


def _patterns(where: str, field: str, value: Any) -> list[str]:
    allowed = "a list of names, class names or valid 're:' patterns"
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ConfigValueError(where, field, value, allowed)
    for pattern in value:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise ConfigValueError(where, field, pattern, allowed) from exc
    return value


def _read_weights(where: str, field: str, args: Any) -> Grid:
    if not isinstance(args, Mapping):
        raise ConfigValueError(where, field, args, "a mapping of quantization args")
    bits, strategy, size = args.get("num_bits"), args.get("strategy"), args.get("group_size")
    checks = (
        ("type", args.get("type") == "int", "'int'"),
        ("num_bits", isinstance(bits, int) and 1 <= bits <= 8, "an int from 1 to 8"),
        ("strategy", strategy in STRATEGIES, " or ".join(map(repr, STRATEGIES))),
        ("dynamic", args.get("dynamic", False) is False, "false"),
        ("actorder", args.get("actorder") in (None, False, "weight", "static"), "null or 'weight'"),
        ("group_size", strategy != "group" or (isinstance(size, int) and size > 0), "a positive int"),
    )
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigValueError(where, f"{field}.{key}", args.get(key), allowed)
    return Grid(bits, size if strategy == "group" else -1, bool(args.get("symmetric", True)))


def matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    """compressed-tensors' target rule: a ``re:`` pattern matched at the start of the name, the exact
    name, or the name of the module's class."""
    return any(
        re.match(p[3:], name) is not None if p.startswith("re:") else p in (name, type(module).__name__)
        for p in patterns
    )


def targeted_layers(model: nn.Module, block: Mapping[str, Any]) -> dict[str, tuple[nn.Linear, Grid]]:
    """Every linear of ``model`` a config group quantizes (and ``ignore`` leaves alone), with its grid."""
    groups, ignore = read_block(block)
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or matches(name, module, ignore):
            continue
        grid = next((grid for targets, grid in groups if matches(name, module, targets)), None)
        if grid is not None:
            found[name] = module, grid
    return found


def read_layer(name: str, linear: nn.Linear, grid: Grid, tensors: dict[str, Tensor], source: Path) -> GridWeight:
    """Pop the ``pack-quantized`` tensors of ``linear`` (module ``name``) from ``tensors``; its grid weight."""

    def take(key: str) -> Tensor:
        tensor = tensors.pop(f"{name}.{key}", None)
        if tensor is None:
            raise ModelFormatError(f"{str(source)!r}: {name} is quantized by its config but has no {key}")
        return tensor

    bits = grid.bits
    packed, scales, shape = take("weight_packed"), take("weight_scale"), take("weight_shape")
    bias = tensors.pop(f"{name}.bias", None)
    out_features, in_features = linear.out_features, linear.in_features
    if shape.dtype.is_floating_point or shape.tolist() != [out_features, in_features]:
        raise ModelFormatError(
            f"{str(source)!r}: {name}.weight_shape is {shape.tolist()}; the architecture says "
            f"[{out_features}, {in_features}]"
        )
    n_groups = 1 if grid.group_size == -1 else -(-in_features // grid.group_size)
    if in_features * bits % 32 or out_features * bits % 32:
        raise ModelFormatError(
            f"{str(source)!r}: {name} is {out_features}x{in_features} at {bits} bits; quantkit reads layers "
            "whose rows and columns fill whole 32-bit words"
        )
    expected = {
        "weight_packed": (packed, (out_features, in_features * bits // 32), (torch.int32,)),
        "weight_scale": (scales, (out_features, n_groups), (torch.float16, torch.bfloat16, torch.float32)),
    }
    zeros = None
    if not grid.symmetric:
        zeros = take("weight_zero_point")
        expected["weight_zero_point"] = (zeros, (out_features * bits // 32, n_groups), (torch.int32,))
    for key, (tensor, want_shape, dtypes) in expected.items():
        if tuple(tensor.shape) != want_shape or tensor.dtype not in dtypes:
            raise ModelFormatError(
                f"{str(source)!r}: {name}.{key} is {tensor.dtype} {list(tensor.shape)}; "
                f"expected {' or '.join(map(str, dtypes))} {list(want_shape)}"
            )
    codes = unpack_rows(packed.t().contiguous(), bits).t().contiguous()
    if zeros is None:
        zeros = torch.full((n_groups, out_features), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = unpack_rows(zeros, bits).t().contiguous()
    size = in_features if grid.group_size == -1 else grid.group_size
    g_idx = torch.arange(in_features) // size
    return GridWeight(codes, zeros, scales.t().contiguous(), g_idx, bits, bias)
