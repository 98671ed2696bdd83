"""A llama ``.gguf`` as a streamed float checkpoint: every tensor as transformers' GGUF loader reads it."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file
from test_gguf_export import tiny_tokenizer
from transformers import AutoModelForCausalLM

import quantkit
from quantkit.builtin_backends.gguf import export
from quantkit.builtin_backends.gguf.qlinear import GGUFWeight
from quantkit.builtin_backends.gguf.rope import ROPE_FREQS, freq_factors
from quantkit.builtin_backends.gguf.streamed_input import GGUFCheckpoint
from quantkit.core.errors import ModelFormatError
from quantkit.core.hardware import hardware_of
from quantkit.core.registry import get_registry
from quantkit.core.resolve import as_config
from quantkit.core.streamed_checkpoints import StreamedCheckpoint
from quantkit.models import load_model

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "Q8_0": torch.float32}


def _gguf(qtype: str, layers: int):
    return quantkit.quantize(
        make_tiny_llama(hidden=64, layers=layers, vocab=512), {"quant_method": "gguf", "quant_type": qtype}
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama (tied head, grouped-query attention) quantized by quantkit to each type and written as .gguf."""
    folder, tokenizer = tmp_path_factory.mktemp("gguf_input"), tiny_tokenizer()
    written = {}
    for qtype in DTYPES:
        model = _gguf(qtype, layers=2)
        written[qtype] = (model, quantkit.save(model, folder / f"tiny-{qtype}.gguf", tokenizer=tokenizer))
    return written


def _materialised(checkpoint: GGUFCheckpoint) -> dict[str, torch.Tensor]:
    """Every tensor, module by module, as streaming reads them (moved back to meta after each module)."""
    tensors = {}
    for module, _ in checkpoint.modules():
        tensors.update({name: t.clone() for name, t in checkpoint.materialise(module).items()})
        checkpoint.model.get_submodule(module).to("meta")
    return tensors


@pytest.mark.parametrize("qtype", DTYPES)
def test_every_tensor_is_transformers_gguf_loaders(files, qtype):
    quantized, path = files[qtype]
    reference, _ = load_model(path)  # transformers' GGUF loader, float32
    with GGUFCheckpoint(path) as checkpoint:
        assert isinstance(checkpoint, GGUFCheckpoint) and isinstance(checkpoint, StreamedCheckpoint)
        assert checkpoint.dtype == DTYPES[qtype] and checkpoint.rope_freqs is None
        assert checkpoint.model.config.tie_word_embeddings and "lm_head.weight" not in checkpoint.stored
        assert all(p.is_meta for p in checkpoint.model.parameters())
        tensors = _materialised(checkpoint)
        buffers = dict(checkpoint.model.named_buffers())
    # transformers loading the file in the checkpoint's dtype: norms cast, rotary buffers kept float32
    in_dtype = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=checkpoint.dtype)
    assert buffers.keys() == dict(in_dtype.named_buffers()).keys()
    assert all(torch.equal(buffer, in_dtype.get_buffer(name)) for name, buffer in buffers.items())
    expected = {k: t for k, t in reference.state_dict().items() if k != "lm_head.weight"}
    assert sorted(tensors) == sorted(expected)
    same_dtype = in_dtype.state_dict()
    for name, tensor in tensors.items():
        assert tensor.dtype == checkpoint.dtype, name
        assert torch.equal(tensor, same_dtype[name]), name
        if tensor.dim() == 2:  # matrices exactly as stored (norms are F32 in the file, cast to the dtype)
            assert torch.equal(tensor.float(), expected[name]), name
    if qtype == "Q8_0":  # quantized tensors are quantkit's own decoding of the file's bytes
        packed = {
            f"{n}.weight": m for n, m in quantized.named_modules() if isinstance(m, GGUFWeight) and n != "lm_head"
        }
        assert len(packed) == 1 + 2 * 7  # the embedding (the tied head's matrix) and every linear
        assert all(torch.equal(tensors[name], module.dequantize()) for name, module in packed.items())


def test_float_tensors_are_views_of_the_file_but_permuted_rows(files):
    _, path = files["F16"]
    with GGUFCheckpoint(path) as checkpoint:
        mapped = checkpoint._mapped()
        base = torch.frombuffer(mapped, dtype=torch.uint8).data_ptr()
        down = checkpoint.read_tensor("model.layers.0.mlp.down_proj.weight")
        assert down.data_ptr() == base + checkpoint.stored["model.layers.0.mlp.down_proj.weight"].offset
        query = checkpoint.read_tensor("model.layers.0.self_attn.q_proj.weight")
        assert not base <= query.data_ptr() < base + len(mapped)  # reordered: a copy


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_rtn_from_streamed_tensors_equals_rtn_in_memory(files, qtype):
    """What streaming does per linear (quantize_linear on the module's tensors) gives the modules that
    quantizing the model loaded in memory in the same dtype gives."""
    _, path = files[qtype]
    config = as_config({"quant_method": "rtn", "bits": 4, "group_size": 32})
    backend = get_registry().backend_for(config, hardware_of(torch.device("cpu")))
    with GGUFCheckpoint(path) as checkpoint:
        reference, _ = load_model(path, dtype=checkpoint.dtype)
        in_memory = dict(quantkit.quantize(reference, config, device="cpu").named_modules())
        targets = backend.targets(checkpoint.model, config, check_weights=False)
        assert len(targets) == 2 * 7
        for name, meta, effective in targets:
            with checkpoint.tensors([f"{name}.weight"]) as tensors:
                linear = torch.nn.Linear(meta.in_features, meta.out_features, bias=False, device="meta")
                linear.load_state_dict({"weight": tensors[f"{name}.weight"]}, assign=True)
                with torch.no_grad():
                    streamed = backend.quantize_linear(name, linear, effective, torch.device("cpu")).state_dict()
            expected = in_memory[name].state_dict()
            assert streamed.keys() == expected.keys()
            assert all(torch.equal(streamed[k], expected[k]) for k in expected), name


def test_tokenizer_is_the_files(files, tmp_path):
    _, path = files["F16"]
    reference = load_model(path)[1]
    with GGUFCheckpoint(path) as checkpoint:
        tokenizer = checkpoint.tokenizer()
    text = "The quick brown fox <|im_start|>user hi<|im_end|>"
    assert tokenizer(text).input_ids == reference(text).input_ids
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    streamed, in_memory = tokenizer.save_pretrained(tmp_path / "a"), reference.save_pretrained(tmp_path / "b")
    assert [p.name for p in map(Path, streamed)] == [p.name for p in map(Path, in_memory)]  # what quantkit.save writes
    assert all(Path(a).read_bytes() == Path(b).read_bytes() for a, b in zip(streamed, in_memory))


def test_llama3_rope_freqs_are_kept_not_loaded(tmp_path, monkeypatch):
    factors = torch.linspace(1, 8, 8)  # head_dim 16
    tensors, extra = export.file_tensors, export.FileTensor(ROPE_FREQS, ROPE_FREQS, factors, None)
    monkeypatch.setattr(export, "file_tensors", lambda model: [*tensors(model), extra])
    path = quantkit.save(_gguf("BF16", layers=1), tmp_path / "llama3.gguf")
    with GGUFCheckpoint(path) as checkpoint:
        assert torch.equal(checkpoint.rope_freqs, factors)
        assert ROPE_FREQS not in checkpoint.stored and all(ROPE_FREQS not in n for _, n in checkpoint.modules())
        assert len(_materialised(checkpoint)) == 2 + 9
    assert torch.equal(freq_factors(quantkit.load(path)), factors)  # quantkit's reader applies them


def _patched(source, tmp_path, old: bytes, new: bytes):
    data = source.read_bytes()
    assert data.count(old) == 1
    path = tmp_path / "patched.gguf"
    path.write_bytes(data.replace(old, new))
    return path


def test_bad_files_are_refused_with_the_reason(files, tmp_path):
    _, path = files["F16"]
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelFormatError, match="end past the end of the file"):
        GGUFCheckpoint(truncated)
    key = b"llama.feed_forward_length"
    width = _patched(path, tmp_path, key + struct.pack("<II", 4, 128), key + struct.pack("<II", 4, 96))
    with pytest.raises(ModelFormatError, match=r"blk\.0\.ffn_gate\.weight' has ggml shape \[64, 128\]; .*\[64, 96\]"):
        GGUFCheckpoint(width)
    other = _patched(path, tmp_path, b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00qwen2")
    with pytest.raises(ModelFormatError, match="holds a 'qwen2' model; quantkit reads and streams llama GGUF files"):
        GGUFCheckpoint(other)
    shrinking = tmp_path / "shrinking.gguf"
    shutil.copyfile(path, shrinking)
    with GGUFCheckpoint(shrinking) as checkpoint:
        with shrinking.open("r+b") as file:
            file.truncate(shrinking.stat().st_size // 2)
        with pytest.raises(ModelFormatError, match="not the .* its header was read from"):
            checkpoint.read_tensor("model.norm.weight")


@pytest.mark.parametrize(
    ("qtype", "config"),
    [
        ("F16", {"quant_method": "rtn", "bits": 4, "group_size": 32}),
        ("Q8_0", {"quant_method": "gptq", "bits": 4, "group_size": 32, "nsamples": 4, "seqlen": 32}),
    ],
)
def test_quantize_streaming_a_gguf_gives_the_in_memory_bytes(files, tmp_path, qtype, config):
    """``quantize_streaming("x.gguf", ...)`` against quantizing transformers' load of the same file
    in the checkpoint's dtype: every tensor, the quantization_config, the tokenizer and the logits."""
    _, path = files[qtype]
    with GGUFCheckpoint(path) as checkpoint:
        dtype = checkpoint.dtype
    in_memory = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    in_memory.hf_quantizer = None
    calibration = torch.randint(0, 400, (4, 32), generator=torch.Generator().manual_seed(0))
    tokens = calibration if config["quant_method"] == "gptq" else None
    reference = quantkit.save(quantkit.quantize(in_memory, config, calibration=tokens, device="cpu"), tmp_path / "ref")
    out = quantkit.quantize_streaming(path, config, tmp_path / "out", calibration=tokens)
    ours, theirs = (load_file(folder / "model.safetensors") for folder in (out, reference))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    blocks = [json.loads((folder / "config.json").read_text())["quantization_config"] for folder in (out, reference)]
    assert blocks[0] == blocks[1]
    assert (out / "tokenizer.json").is_file()  # the file's tokenizer, saved beside the weights
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(quantkit.load(out, "cpu")(ids).logits, quantkit.load(reference, "cpu")(ids).logits)


def test_a_file_no_backend_streams_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(ModelFormatError, match="no backend streams .bin files"):
        quantkit.quantize_streaming(path, "rtn-4bit-g128", tmp_path / "out")
    assert not (tmp_path / "out").exists()
