"""HQQ, bitsandbytes and GGUF quantizing a checkpoint streamed from disk: the bytes (and config.json)
``quantkit.save(quantkit.quantize(...))`` writes for the same model loaded in its stored dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_streaming import as_bytes, tensors_of, tiny_qwen2
from transformers import AutoModelForCausalLM

import quantkit
from quantkit import streaming
from quantkit.builtin_backends.gguf.imatrix import collect_imatrix
from quantkit.core.errors import ConfigValueError
from quantkit.core.safetensors_files import INDEX_NAME
from quantkit.testing import tiny_llama, token_ids

SHARD = 60_000
"""Bytes per shard in these tests: every output has several."""
METHODS = {
    "hqq-4bit-g64": {"quant_method": "hqq", "nbits": 4, "group_size": 64},
    "hqq-2bit-g16-bf16": {"quant_method": "hqq", "nbits": 2, "group_size": 16, "axis": 0, "compute_dtype": "bfloat16"},
    "nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "quant_type": "nf4"},
    "nf4-double": {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "quant_type": "nf4",
        "use_double_quant": True,
    },
    "fp4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "quant_type": "fp4"},
    "fp4-double": {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "quant_type": "fp4",
        "use_double_quant": True,
    },
    "int8": {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True},
    **{
        f"gguf-{t}": {"quant_type": t, "quant_method": "gguf"}
        for t in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
    },
}


CHECKPOINTS = {
    # 4 layers: the K-quant mixes give attn_v/ffn_down other types in some of them
    "llama-tied-fp32": lambda: tiny_llama(0, hidden=256, intermediate=512, layers=4, outliers=False),
    "llama-tied-bf16": lambda: tiny_llama(0, hidden=256, intermediate=512, layers=4, outliers=False).to(torch.bfloat16),
    "qwen2-bf16": lambda: tiny_qwen2(hidden=256, intermediate=512, layers=4),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Each checkpoint saved by transformers in shards."""
    root = tmp_path_factory.mktemp("float")
    for name, make in CHECKPOINTS.items():
        make().save_pretrained(root / name, max_shard_size="200KB")
    return {name: root / name for name in CHECKPOINTS}


def in_memory(folder: Path, config: dict, out: Path) -> tuple[torch.nn.Module, Path]:
    """The model of ``folder`` loaded whole in its stored dtype, quantized and saved into ``out``."""
    stored = json.loads((folder / "config.json").read_text())["dtype"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, stored))
    quantized = quantkit.quantize(model, config, device="cpu")
    return quantized, quantkit.save(quantized, out)


def assert_same_output(streamed: Path, reference: Path) -> dict[str, torch.Tensor]:
    """Every tensor's dtype, shape and bytes, and config.json, as the in-memory save's."""
    expected, got = tensors_of(reference), tensors_of(streamed)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (got[name].dtype, got[name].shape) == (tensor.dtype, tensor.shape), name
        assert as_bytes(got[name]) == as_bytes(tensor), name
    read = [json.loads((folder / "config.json").read_text()) for folder in (streamed, reference)]
    assert read[0] == read[1]
    return got


CASES = [
    *((method, "llama-tied-fp32") for method in METHODS),
    *((method, "llama-tied-bf16") for method in METHODS if not method.startswith("gguf-Q") or "K_M" in method),
    ("gguf-Q4_K_M", "qwen2-bf16"),
    ("nf4", "qwen2-bf16"),
    ("hqq-4bit-g64", "qwen2-bf16"),
]


@pytest.mark.parametrize(("method", "checkpoint"), CASES)
def test_streamed_output_is_the_in_memory_save(method, checkpoint, folders, tmp_path):
    config = METHODS[method]
    model, reference = in_memory(folders[checkpoint], config, tmp_path / "ref")
    out = quantkit.quantize_streaming(folders[checkpoint], config, tmp_path / "out", max_shard_bytes=SHARD)
    assert len(json.loads((out / INDEX_NAME).read_text())["weight_map"]) > 0
    assert len(list(out.glob("*.safetensors"))) > 2
    tensors = assert_same_output(out, reference)
    if config["quant_method"] == "gguf":
        types = {name: int(t) for name, t in tensors.items() if name.endswith("ggml_type")}
        assert "model.embed_tokens.ggml_type" in types  # the token embedding is quantized as in memory
        if config["quant_type"] in ("Q4_K_M", "Q5_K_M"):  # types depend on the layer index
            assert len({types[f"model.layers.{i}.mlp.down_proj.ggml_type"] for i in range(4)}) > 1

    ids = token_ids(2, 12)
    with torch.no_grad():
        assert torch.equal(quantkit.load(out, "cpu")(ids).logits, model(ids).logits)


def test_an_importance_matrix_file_streams_and_one_from_text_is_refused(folders, tmp_path):
    folder = folders["llama-tied-bf16"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    path = collect_imatrix(model, token_ids(2, 16)).save(tmp_path / "imatrix.gguf")
    config = {"quant_method": "gguf", "quant_type": "Q4_K_M", "imatrix": str(path)}
    _, reference = in_memory(folder, config, tmp_path / "ref")
    out = quantkit.quantize_streaming(folder, config, tmp_path / "out", max_shard_bytes=SHARD)
    assert_same_output(out, reference)
    assert not torch.equal(  # the matrix was used
        tensors_of(out)["model.layers.0.mlp.up_proj.weight"],
        tensors_of(in_memory(folder, {**config, "imatrix": None}, tmp_path / "plain")[1])[
            "model.layers.0.mlp.up_proj.weight"
        ],
    )

    with pytest.raises(ConfigValueError, match=r"GGUFConfig\.imatrix='pydoc'.*importance-matrix file"):
        quantkit.quantize_streaming(folder, {**config, "imatrix": "pydoc"}, tmp_path / "text")
    assert not (tmp_path / "text").exists()


class Interrupted(Exception):
    pass


def test_an_interrupted_hqq_run_resumes_after_its_last_complete_shard(folders, tmp_path, monkeypatch):
    folder, config = folders["llama-tied-bf16"], METHODS["hqq-4bit-g64"]
    reference = quantkit.quantize_streaming(folder, config, tmp_path / "ref", max_shard_bytes=SHARD)
    quantize, calls = streaming._quantized, []

    def counted(target, tensors, steps, fail_after=None):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupted
        calls.append(target.name)
        return quantize(target, tensors, steps)

    monkeypatch.setattr(streaming, "_quantized", lambda *args: counted(*args, fail_after=20))
    with pytest.raises(Interrupted):
        quantkit.quantize_streaming(folder, config, tmp_path / "out", max_shard_bytes=SHARD)
    partial = tmp_path / ".out.quantkit-partial"
    assert json.loads((partial / streaming.JOURNAL).read_text())["modules"]

    calls.clear()
    monkeypatch.setattr(streaming, "_quantized", counted)
    out = quantkit.quantize_streaming(folder, config, tmp_path / "out", max_shard_bytes=SHARD)
    assert 0 < len(calls) < 28 - 20 + 5  # the linears after the last complete shard, not all 28
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in reference.iterdir()}
    assert not partial.exists()
