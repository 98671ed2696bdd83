"""EETQ backend: int8 weight-only per output channel, in the layout of EETQ's kernel and
transformers' EETQ integration (quantkit/builtin_backends/eetq/layout.py holds the reading of
EETQ's csrc/cutlass_kernels/cutlass_preprocessors.cc these tests pin)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

import quantkit
from quantkit.builtin_backends.eetq.config import EETQConfig
from quantkit.builtin_backends.eetq.kernels import EETQ_CAPABILITIES, GEMV_ROWS
from quantkit.builtin_backends.eetq.layout import ROW_PERMUTATION, dequantize, pack, quantize, unpack
from quantkit.builtin_backends.eetq.qlinear import EetqLinear
from quantkit.core.capabilities import ShapeLimitError
from quantkit.core.dispatch import set_kernel
from quantkit.core.errors import ConfigValueError, ModelFormatError
from quantkit.core.resolve import config_from_hf_dict
from quantkit.testing import conformance_tests, tiny_llama

test_contract = conformance_tests("eetq", [EETQConfig(), EETQConfig(modules_to_not_convert=["lm_head", "*.o_proj"])])


def marker_positions(out_features: int, in_features: int, cells: list[tuple[int, int]]) -> dict:
    """Where the code 5 placed at each ``(n, k)`` of a zero ``(out, in)`` matrix lands in the packed
    ``(in, out)`` tensor; every other byte holds the zero code (``0 + 128`` = int8 -128)."""
    found = {}
    for n, k in cells:
        codes = torch.zeros(out_features, in_features, dtype=torch.int8)
        codes[n, k] = 5
        packed = pack(codes)
        where = (packed != -128).nonzero().tolist()
        assert len(where) == 1 and packed[tuple(where[0])] == 5 + 128 - 256  # 133 as an int8
        found[(n, k)] = tuple(where[0])
    return found


def test_layout_of_the_minimum_tile_by_hand():
    """A 64x64 weight, one tile. Packed byte p (row p // 64, column p % 64 of the (in, out) tensor)
    holds, with ROW_PERMUTATION = 0 1 8 9 2 3 10 11 4 5 12 13 6 7 14 15 applied to the inputs of each
    group of 16 (step 2), channel pairs (2j, 2j+1) sharing packed row pair 2j, 2j+1 (step 4: channel
    2j at bytes 128 j .. 128 j + 63, channel 2j+1 right after), and bytes 1 and 2 of every 4 swapped
    (step 5):
    p 0..7 <- inputs 0, 8, 1, 9, 2, 10, 3, 11 of channel 0 (permuted 0 1 8 9 2 3 10 11, then swapped);
    p 8 <- input 4 (ROW_PERMUTATION[8] = 4); p 16 <- input 16 (group 1, position 0);
    p 63 <- input 63 (group 3, position 15); p 64 <- channel 1, input 0; p 128 <- channel 2, input 0;
    p 4095 <- channel 63, input 63."""
    assert marker_positions(64, 64, [(0, 0), (0, 8), (0, 1), (0, 9), (0, 2), (0, 10), (0, 3), (0, 11)]) == {
        (0, 0): (0, 0),
        (0, 8): (0, 1),
        (0, 1): (0, 2),
        (0, 9): (0, 3),
        (0, 2): (0, 4),
        (0, 10): (0, 5),
        (0, 3): (0, 6),
        (0, 11): (0, 7),
    }
    assert marker_positions(64, 64, [(0, 4), (0, 16), (0, 63), (1, 0), (2, 0), (63, 63)]) == {
        (0, 4): (0, 8),
        (0, 16): (0, 16),
        (0, 63): (0, 63),
        (1, 0): (1, 0),
        (2, 0): (2, 0),
        (63, 63): (63, 63),
    }


def test_layout_of_two_input_tiles_by_hand():
    """128 inputs, 64 channels: row j of step 4 holds tile 0 of channels 2j, 2j+1, then tile 1 of both
    (256 bytes = packed rows 4j .. 4j+3). Channel 0's input 64 starts tile 1 at byte 128 (row 2); channel
    1's input 64 at byte 192 (row 3); channel 2's input 0 at byte 256 (row 4)."""
    assert marker_positions(64, 128, [(0, 64), (1, 64), (2, 0), (1, 127)]) == {
        (0, 64): (2, 0),
        (1, 64): (3, 0),
        (2, 0): (4, 0),
        (1, 127): (3, 63),
    }


def test_codes_are_shifted_by_128():
    codes = torch.tensor([-128, -1, 0, 1, 127], dtype=torch.int8).repeat(64, 13)[:, :64]
    packed = pack(codes)
    assert sorted(set(packed.view(torch.uint8).flatten().tolist())) == [0, 127, 128, 129, 255]
    assert torch.equal(unpack(packed), codes)


def reference_preprocess(codes: np.ndarray) -> np.ndarray:
    """A line-by-line port of EETQ's preprocess_weights_for_mixed_gemm for int8 on SM 8.0 (loops
    as in the C++), on B = codes.T (rows = in_features, cols = out_features)."""
    b = np.ascontiguousarray(codes.T)
    rows, cols = b.shape
    # permute_B_rows_for_mixed_gemm: 32-bit words, B_ROWS_PER_MMA = 16, ELTS_PER_REG = 4
    src, dst = b.view(np.uint32).reshape(-1), np.empty(rows * cols // 4, np.uint32)
    num_vec_cols = cols // 4
    for base_row in range(0, rows, 16):
        for tile_row in range(16):
            tile_read_row = 8 * ((tile_row % 4) // 2) + tile_row % 2 + 2 * (tile_row // 4)
            for col in range(num_vec_cols):
                dst[(base_row + tile_row) * num_vec_cols + col] = src[(base_row + tile_read_row) * num_vec_cols + col]
    # subbyte_transpose (int8: a transpose into column-major)
    column_major = np.ascontiguousarray(dst.view(np.int8).reshape(rows, cols).T).view(np.uint32).reshape(-1)
    # interleave_column_major_tensor: rows_per_tile 64, columns_interleaved 2
    out = np.empty_like(column_major)
    num_vec_rows, vec_rows_per_tile, interleave = rows // 4, 16, 2
    for read_col in range(cols):
        write_col = read_col // interleave
        for base_vec_row in range(0, num_vec_rows, vec_rows_per_tile):
            for vec_read_row in range(base_vec_row, min(num_vec_rows, base_vec_row + vec_rows_per_tile)):
                vec_write_row = (
                    interleave * base_vec_row
                    + vec_rows_per_tile * (read_col % interleave)
                    + vec_read_row % vec_rows_per_tile
                )
                out[write_col * num_vec_rows * interleave + vec_write_row] = column_major[
                    read_col * num_vec_rows + vec_read_row
                ]
    # add_bias_and_interleave_int8s_inplace
    flat = (out.view(np.int8).astype(np.int32) + 128).astype(np.uint8).view(np.int8)
    for base in range(0, flat.size, 4):
        flat[base + 1], flat[base + 2] = flat[base + 2], flat[base + 1]
    return flat.reshape(rows, cols)


def test_pack_equals_a_literal_port_of_eetq_preprocessing():
    codes = torch.randint(-128, 128, (192, 128), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    expected = reference_preprocess(codes.numpy())
    assert ROW_PERMUTATION == (0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15)
    assert torch.equal(pack(codes), torch.from_numpy(expected))
    assert torch.equal(unpack(pack(codes)), codes)


def test_quantization_by_hand():
    """scale = absmax / 128; codes round halfway away from zero and clip to [-128, 127]."""
    weight = torch.zeros(3, 64)
    weight[0, :4] = torch.tensor([1.0, 2.5 / 128, -2.5 / 128, -0.5])
    weight[1, :2] = torch.tensor([-2.0, 1.0])  # the negative extreme fits: -128
    codes, scales = quantize(weight)
    assert codes[0, :4].tolist() == [127, 3, -3, -64]  # 128 clips to 127; 2.5 -> 3, -2.5 -> -3
    assert codes[1, :2].tolist() == [-128, 64]
    assert codes[2].abs().sum() == 0 and scales.tolist() == [1 / 128, 2 / 128, 0.0]
    assert scales.dtype == torch.float16 and codes.dtype == torch.int8
    assert torch.equal(dequantize(codes, scales)[1, :2], torch.tensor([-2.0, 1.0]))


def layer(out_features=128, in_features=192, bias=True, seed=0) -> tuple[nn.Linear, EetqLinear]:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return linear, EetqLinear.from_linear(linear, torch.device("cpu"))


@pytest.mark.parametrize("rows", [1, GEMV_ROWS, GEMV_ROWS + 1, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_forward_is_w8a16(dtype, rows):
    """EETQ's numerics on both CPU kernels: bfloat16 activations times the int8 codes, accumulated in
    float32 and rounded to bfloat16, times the scales in float32 (no activation quantization)."""
    linear, module = layer()
    x = torch.randn(rows, 192).to(dtype)
    products = F.linear(x.bfloat16().float(), module.codes().float()).bfloat16().float()
    expected = products * module.weight_scales.float() + linear.bias.detach()
    with torch.inference_mode():
        got = module(x.reshape(1, rows, 192))
    assert got.shape == (1, rows, 128) and got.dtype == dtype
    tol = 2**-7 if dtype != torch.bfloat16 else 2**-6  # a bfloat16 unit of the products (and of the output)
    assert torch.allclose(got[0].float(), expected, rtol=tol, atol=tol * expected.abs().max().item() / 50)
    exact = F.linear(x.float(), module.dequantize(), linear.bias.detach())
    assert (got[0].float() - exact).norm() / exact.norm() < 1e-2
    assert (module.dequantize() - linear.weight).norm() / linear.weight.norm() < 1e-2


def test_gradient_reaches_the_input_only():
    """The kernels have no derivative: the input's gradient is the output's times the dequantized weight."""
    _, module = layer()
    x = torch.randn(3, 192, requires_grad=True)
    upstream = torch.randn(3, 128)
    (module(x) * upstream).sum().backward()
    assert torch.allclose(x.grad, upstream @ module.dequantize(), rtol=1e-5, atol=1e-5)
    assert all(not t.requires_grad for t in module.state_dict().values())


def test_state_dict_is_eetq_layout_and_loads_back():
    _, module = layer(bias=False)
    state = module.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "weight": (torch.int8, (192, 128)),
        "weight_scales": (torch.float16, (128,)),
    }
    assert torch.equal(state["weight"], pack(module.codes()))
    assert torch.equal(module.codes(), module.weight.view(128, 192))  # in memory: the codes row-major
    empty = EetqLinear.empty_like(nn.Linear(192, 128, bias=False, device="meta"))
    empty.load_state_dict(state, assign=True)
    assert torch.equal(empty.weight, module.weight) and torch.equal(empty.weight_scales, module.weight_scales)
    with pytest.raises(ModelFormatError, match=r"weight is not an EETQ weight.*int8 \(192, 128\)"):
        EetqLinear.empty_like(nn.Linear(192, 128, bias=False, device="meta")).load_state_dict(
            {**state, "weight": module.codes()}, assign=True
        )


def test_saved_folder_is_what_transformers_eetq_integration_loads(tmp_path):
    """transformers 5.23 integrations/eetq.py: ``replace_with_eetq_linear`` puts an ``EetqLinear`` with
    ``weight`` int8 (in_features, out_features) and ``weight_scales`` float16 (out_features,) in place of
    each nn.Linear outside modules_to_not_convert; quantizer_eetq.py loads them as saved (pre_quantized).
    utils/quantization_config.py ``EetqConfig`` writes quant_method, weights, modules_to_not_convert."""
    from transformers.integrations.eetq import EetqLinear as TransformersEetqLinear
    from transformers.utils.quantization_config import EetqConfig as TransformersEetqConfig

    model = quantkit.quantize(tiny_llama(), EETQConfig(), device="cpu")
    folder = quantkit.save(model, tmp_path / "model")
    block = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert block == {"quant_method": "eetq", "weights": "int8", "modules_to_not_convert": ["lm_head"]}
    assert TransformersEetqConfig.from_dict(block).to_dict() == block
    assert config_from_hf_dict(block) == EETQConfig()

    tensors = load_file(folder / "model.safetensors")
    linears = [n for n, m in tiny_llama().named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    for name in linears:
        source = dict(tiny_llama().named_modules())[name]
        with torch.device("meta"):
            expected = TransformersEetqLinear(source.in_features, source.out_features, bias=False)
        saved = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        assert {k: (v.dtype, v.shape) for k, v in saved.items()} == {
            k: (v.dtype, v.shape) for k, v in expected.state_dict().items()
        }
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32 and "lm_head.weight" not in tensors  # tied


def test_damaged_weight_is_refused_on_load(tmp_path):
    folder = quantkit.save(quantkit.quantize(tiny_llama(), EETQConfig(), device="cpu"), tmp_path / "model")
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].T.contiguous()  # the (out, in) codes instead of EETQ's (in, out)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match=name):
        quantkit.load(folder)


def test_bad_config_names_the_field_and_the_allowed_values():
    with pytest.raises(ConfigValueError, match=r"weights.*'int4'.*'int8'"):
        EETQConfig(weights="int4")
    with pytest.raises(ConfigValueError, match="weights"):
        config_from_hf_dict({"quant_method": "eetq", "weights": "int4"})
    assert quantkit.as_config("eetq-int8") == EETQConfig() == quantkit.as_config("eetq")


def test_layers_outside_the_layout_are_refused_before_any_is_quantized():
    model = tiny_llama(hidden=96, intermediate=192)
    with pytest.raises(ShapeLimitError, match=r"in_features must be a multiple of 64.*modules_to_not_convert"):
        quantkit.quantize(model, EETQConfig(), device="cpu")
    assert not any(isinstance(m, EetqLinear) for m in model.modules())


@pytest.mark.skipif(
    not torch.cuda.is_available()
    or importlib.util.find_spec("EETQ") is None
    or not EETQ_CAPABILITIES[0] <= torch.cuda.get_device_capability() < EETQ_CAPABILITIES[1],
    reason="needs CUDA SM 7.5-8.9 and the eetq package",
)
def test_eetq_package_agrees():  # pragma: no cover - no such machine in CI
    """eetq's own quantize + preprocess equals ours, and its kernel runs our modules."""
    from EETQ import quant_weights

    linear, module = layer(bias=False)
    packed, scales = quant_weights(linear.weight.detach().half().T.contiguous(), torch.int8, False)
    ours, our_scales = quantize(linear.weight.half())
    assert torch.equal(packed, pack(ours)) and torch.equal(scales, our_scales)
    x = torch.randn(4, 192)
    expected = module(x)
    module.cuda()
    set_kernel(module, "eetq")
    assert torch.allclose(module(x.cuda()).cpu(), expected, rtol=1e-2, atol=1e-2)
