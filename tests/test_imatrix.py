"""Importance matrices: llama.cpp's two file formats byte for byte, collection, config, weighted quantization."""

from __future__ import annotations

import copy
import struct

import numpy as np
import pytest
import torch

import quantkit
from quantkit.builtin_backends.gguf import quants
from quantkit.builtin_backends.gguf.backend import GGUFBackend
from quantkit.builtin_backends.gguf.config import GGUFConfig
from quantkit.builtin_backends.gguf.imatrix import collect_imatrix
from quantkit.builtin_backends.gguf.imatrix_files import ImportanceMatrix, load_imatrix
from quantkit.core.errors import ConfigTypeError, ConfigValueError, ModelFormatError, QuantizationError
from quantkit.testing.models import tiny_llama, token_ids

NAMES = ("blk.0.attn_q.weight", "blk.0.ffn_down.weight")
SUMS = {NAMES[0]: np.array([1.5, 0.25, 3.0, 8.0], dtype=np.float32), NAMES[1]: np.array([2.0, 0.5], dtype=np.float32)}
COUNTS = {NAMES[0]: 1024, NAMES[1]: 512}


def _s(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def _pad32(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 32)


def llama_cpp_gguf(datasets: list[str], chunk_count: int, chunk_size: int) -> bytes:
    """What llama-imatrix's save_imatrix writes, by gguf.cpp's rules: KVs in order, tensors
    sorted, in_sum2 then counts, 1-d shapes (ggml_n_dims), data aligned to 32 bytes."""
    kv = [
        _s("general.type") + struct.pack("<I", 8) + _s("imatrix"),
        _s("imatrix.datasets") + struct.pack("<IIQ", 9, 8, len(datasets)) + b"".join(_s(d) for d in datasets),
        _s("imatrix.chunk_count") + struct.pack("<II", 4, chunk_count),
        _s("imatrix.chunk_size") + struct.pack("<II", 4, chunk_size),
    ]
    infos, data = b"", b""
    for name in sorted(SUMS):
        for suffix, values in ((".in_sum2", SUMS[name]), (".counts", np.array([COUNTS[name]], np.float32))):
            infos += _s(name + suffix) + struct.pack("<Iq", 1, values.size) + struct.pack("<IQ", 0, len(data))
            data += _pad32(values.tobytes())
    head = b"GGUF" + struct.pack("<Iqq", 3, 2 * len(SUMS), len(kv)) + b"".join(kv) + infos
    return _pad32(head) + data


def llama_cpp_dat(ncalls: dict[str, int], means: dict[str, np.ndarray], last_chunk: int, dataset: str) -> bytes:
    """What save_imatrix_legacy writes: values are mean * ncall, then the chunk count and dataset."""
    out = struct.pack("<i", len(ncalls))
    for name in sorted(ncalls):
        values = (means[name] * np.float32(ncalls[name])).astype(np.float32)
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncalls[name], values.size)
        out += values.tobytes()
    return out + struct.pack("<ii", last_chunk, len(dataset)) + dataset.encode()


def test_gguf_imatrix_reads_and_writes_llama_cpp_bytes(tmp_path):
    original = llama_cpp_gguf(["wiki.train.raw"], 2, 512)
    (tmp_path / "in.gguf").write_bytes(original)
    matrix = load_imatrix(tmp_path / "in.gguf")
    assert matrix.names() == sorted(NAMES) and matrix.datasets == ["wiki.train.raw"]
    assert (matrix.chunk_size, matrix.chunk_count) == (512, 2)
    for name in NAMES:
        assert int(matrix.counts[name]) == COUNTS[name]
        torch.testing.assert_close(matrix.values(name), torch.from_numpy(SUMS[name] / COUNTS[name]))
    matrix.save(tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == original


def test_dat_imatrix_reads_and_writes_llama_cpp_bytes(tmp_path):
    means = {name: SUMS[name] / np.float32(COUNTS[name]) for name in NAMES}
    ncalls = {name: COUNTS[name] // 512 for name in NAMES}
    original = llama_cpp_dat(ncalls, means, 2, "wiki.train.raw")
    (tmp_path / "in.dat").write_bytes(original)
    matrix = load_imatrix(tmp_path / "in.dat")
    assert matrix.names() == sorted(NAMES) and matrix.datasets == ["wiki.train.raw"]
    for name in NAMES:  # llama-quantize's values: stored / ncall
        torch.testing.assert_close(matrix.values(name), torch.from_numpy(means[name]))
    matrix.save(tmp_path / "out.dat")
    assert (tmp_path / "out.dat").read_bytes() == original
    # the GGUF file of the same matrix, as llama-imatrix --in-file x.dat -o x.gguf would convert it
    matrix.save(tmp_path / "converted.gguf")
    back = load_imatrix(tmp_path / "converted.gguf")
    for name in NAMES:
        torch.testing.assert_close(back.values(name), matrix.values(name))


def test_damaged_or_foreign_files_are_refused(tmp_path):
    (tmp_path / "short.dat").write_bytes(
        llama_cpp_dat({"a.weight": 1}, {"a.weight": np.ones(4, np.float32)}, 1, "")[:20]
    )
    with pytest.raises(ModelFormatError, match="truncated"):
        load_imatrix(tmp_path / "short.dat")
    (tmp_path / "model.gguf").write_bytes(llama_cpp_gguf([], 1, 512).replace(b"imatrix\x10", b"imatriX\x10", 1))
    with pytest.raises(ModelFormatError, match="not an importance matrix"):
        load_imatrix(tmp_path / "model.gguf")
    with pytest.raises(ModelFormatError):
        load_imatrix(tmp_path / "missing.gguf")
    with pytest.raises(ConfigValueError, match="format"):
        ImportanceMatrix({"a": torch.ones(2)}, {"a": torch.tensor(1)}).save(tmp_path / "x.gguf", format="bin")


def test_collection_is_the_mean_square_of_the_float_models_inputs():
    model = tiny_llama(1)
    ids = token_ids(3, 16, seed=2)
    targets = GGUFBackend().targets(model, GGUFConfig())
    matrix = collect_imatrix(model, ids, targets, dataset="random")
    direct: dict[str, list[torch.Tensor]] = {}
    hooks = [
        linear.register_forward_pre_hook(
            lambda module, args, name=name: direct.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for name, linear, _ in targets
    ]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    assert len(matrix.names()) == len(targets) == 14
    for name, _, _ in targets:
        gguf = name.replace("model.layers.", "blk.").replace("self_attn.", "attn_").replace("_proj", "")
        gguf = gguf.replace("attn_o", "attn_output").replace("mlp.", "ffn_") + ".weight"
        x = torch.cat(direct[name])
        assert int(matrix.counts[gguf]) == 48
        torch.testing.assert_close(matrix.values(gguf), x.square().mean(0), rtol=1e-5, atol=1e-7)
    assert (matrix.chunk_size, matrix.chunk_count, matrix.datasets) == (16, 3, ["random"])


def test_config_validation():
    assert GGUFConfig(imatrix="m.GGUF").imatrix_is_file and GGUFConfig(imatrix="x.dat").dataset is None
    assert GGUFConfig(imatrix="pydoc").dataset == "pydoc" and not GGUFConfig(imatrix="notes.txt").imatrix_is_file
    config = GGUFConfig(quant_type="Q3_K_M", imatrix="calib.txt", nsamples=4, seqlen=64)
    assert GGUFConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigValueError, match="imatrix"):
        GGUFConfig(imatrix=" ")
    with pytest.raises(ConfigTypeError, match="imatrix"):
        GGUFConfig(imatrix=3)
    with pytest.raises(ConfigValueError, match="nsamples"):
        GGUFConfig(nsamples=0)
    with pytest.raises(ConfigValueError, match="whole model"):
        GGUFConfig(module_overrides={"*.down_proj": {"imatrix": "other.gguf"}})


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q4_1"])
def test_weighted_quantization_lowers_the_weighted_error(qtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 512, generator=generator)
    importance = torch.rand(512, generator=generator).pow(4) * 100  # a few columns dominate, as in real models
    error = {}
    for use in (False, True):
        packed = quants.quantize(weight, qtype, importance if use else None)
        error[use] = float((importance * (quants.dequantize(packed, qtype, weight.shape) - weight).square()).sum())
    assert error[True] < 0.9 * error[False]


def test_quantize_collects_from_text_or_reads_a_file(tmp_path):
    model = tiny_llama(3)
    ids = token_ids(2, 32, seed=4)
    config = GGUFConfig(quant_type="Q4_K_M")
    matrix = collect_imatrix(model, ids, GGUFBackend().targets(model, config))
    matrix.save(tmp_path / "imatrix.gguf")
    from_text = quantkit.quantize(
        copy.deepcopy(model), GGUFConfig(imatrix="pydoc", nsamples=2, seqlen=32), calibration=ids
    )
    from_file = quantkit.quantize(copy.deepcopy(model), GGUFConfig(imatrix=str(tmp_path / "imatrix.gguf")))
    plain = quantkit.quantize(copy.deepcopy(model), config)
    down = "model.layers.0.mlp.down_proj"
    assert torch.equal(from_text.get_submodule(down).weight, from_file.get_submodule(down).weight)
    assert not torch.equal(from_text.get_submodule(down).weight, plain.get_submodule(down).weight)

    wrong = ImportanceMatrix()
    wrong.add("blk.0.ffn_down.weight", torch.ones(8), 4)
    wrong.save(tmp_path / "wrong.dat")
    with pytest.raises(QuantizationError, match="another model"):
        quantkit.quantize(copy.deepcopy(model), GGUFConfig(imatrix=str(tmp_path / "wrong.dat")))
    with pytest.raises(ModelFormatError, match="cannot be read"):
        quantkit.quantize(copy.deepcopy(model), GGUFConfig(imatrix=str(tmp_path / "absent.gguf")))


# sqrt(sum(s (W - deq(q(W)))^2) / sum(s W^2)) of ggml_quantize_chunk (ggml 0.25.3, llama-cpp-python 0.3.36)
# on standard-normal W (64 x 1024, seed 0); s: ones, or the importance values rand(seed 1)^4 * 10.
GGML_IQ4_ERROR = {
    ("IQ4_NL", False): 0.076012,
    ("IQ4_NL", True): 0.068026,
    ("IQ4_XS", False): 0.076606,
    ("IQ4_XS", True): 0.06886,
}


@pytest.mark.parametrize(("qtype", "weighted"), list(GGML_IQ4_ERROR))
def test_iq4_error_matches_ggml(qtype, weighted):
    weight = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    importance = torch.rand(1024, generator=torch.Generator().manual_seed(1)).pow(4) * 10 if weighted else None
    restored = quants.dequantize(quants.quantize(weight, qtype, importance), qtype, weight.shape)
    scale = torch.ones(1024) if importance is None else importance
    error = ((scale * (restored - weight).square()).sum() / (scale * weight.square()).sum()).sqrt()
    assert float(error) == pytest.approx(GGML_IQ4_ERROR[qtype, weighted], rel=1e-4)


def test_iq4_types_quantize_a_model_and_fall_back_like_llama_cpp():
    model = tiny_llama(5, hidden=96)  # 96 inputs: IQ4_XS's 256-weight super-blocks do not fit, IQ4_NL's 32 do
    quantized = quantkit.quantize(model, GGUFConfig(quant_type="IQ4_XS"))
    assert quantized.get_submodule("model.layers.0.self_attn.q_proj").qtype == "IQ4_NL"
    assert quantized.get_submodule("model.layers.0.mlp.down_proj").qtype == "IQ4_XS"
