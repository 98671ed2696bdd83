"""A .gguf written from a float checkpoint streamed from disk: the bytes of the in-memory save."""

import errno

import pytest
import torch
from gguf import GGUFReader
from test_gguf_export import tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import quantkit
from quantkit import GGUFConfig
from quantkit.builtin_backends.gguf import stream_export
from quantkit.builtin_backends.gguf.imatrix import collect_imatrix
from quantkit.builtin_backends.gguf.qlinear import GGUFEmbedding
from quantkit.builtin_backends.gguf.stream_export import write_gguf_streamed
from quantkit.cli.main import main
from quantkit.core.errors import QuantizationError, QuantkitError
from quantkit.core.streamed_checkpoints import StreamedCheckpoint
from quantkit.testing import token_ids

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _checkpoint(folder, dtype: torch.dtype, tied: bool):
    """A tiny Llama (256-wide: K-quant super-blocks fit; 64-wide MLP input: fallbacks) saved in ``dtype``."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=320,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    return folder


def _streamed(folder, quant_type, path, tokenizer):
    with StreamedCheckpoint(folder) as checkpoint:
        write_gguf_streamed(checkpoint, GGUFConfig(quant_type=quant_type), path, tokenizer, CPU)
    return path


@pytest.mark.parametrize(
    ("dtype", "tied", "quant_type"),
    [
        (torch.bfloat16, True, "Q4_K_M"),
        (torch.float32, False, "Q4_K_M"),
        (torch.bfloat16, False, "Q8_0"),
        (torch.float32, True, "Q4_0"),
    ],
)
def test_streamed_gguf_is_the_in_memory_save(tmp_path, tokenizer, dtype, tied, quant_type):
    folder = _checkpoint(tmp_path / "float", dtype, tied)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    assert model.dtype == dtype
    quantized = quantkit.quantize(model, GGUFConfig(quant_type=quant_type))
    expected = quantkit.save(quantized, tmp_path / "memory.gguf", tokenizer=tokenizer)
    path = _streamed(folder, quant_type, tmp_path / "streamed.gguf", tokenizer)
    assert path.read_bytes() == expected.read_bytes()
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert ("output.weight" in types) is not tied
    if quant_type == "Q4_K_M":  # the mix gives types by layer position, with fallbacks for 320-wide rows
        assert [types[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
        assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["Q5_0", "Q5_0", "Q8_0", "Q8_0"]
    loaded = quantkit.load(path)
    logits = loaded(torch.tensor([[1, 5, 9, 33]])).logits
    assert loaded.quantkit_backend == "gguf" and logits.shape == (1, 4, 512) and logits.isfinite().all()


def test_interrupted_write_keeps_the_previous_file(tmp_path, tokenizer, monkeypatch):
    folder = _checkpoint(tmp_path / "float", torch.bfloat16, True)
    path = tmp_path / "out.gguf"
    path.write_bytes(b"previous")
    calls = []
    quantize = stream_export._quantize

    def failing(*args):
        calls.append(args[1])
        if len(calls) == 5:
            raise RuntimeError("interrupted")
        return quantize(*args)

    monkeypatch.setattr(stream_export, "_quantize", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        _streamed(folder, "Q8_0", path, tokenizer)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "out.gguf"]

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    embedding = GGUFEmbedding.from_embedding

    def other_type(module, qtype, device=None):
        return embedding(module, "Q4_0", device)

    for target, patch, error, match in [
        (stream_export, ("_quantize", full), QuantkitError, "out.gguf"),  # a full disk: a SaveError naming the output
        (GGUFEmbedding, ("from_embedding", other_type), QuantizationError, "token_embd.weight.*header announced"),
    ]:
        monkeypatch.undo()
        monkeypatch.setattr(target, *patch)
        with pytest.raises(error, match=match):
            _streamed(folder, "Q8_0", path, tokenizer)
        assert path.read_bytes() == b"previous"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "out.gguf"]


def test_importance_matrix_from_the_config_or_given(tmp_path, tokenizer):
    folder = _checkpoint(tmp_path / "float", torch.bfloat16, True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    matrix = collect_imatrix(model, token_ids(2, 16))
    config = GGUFConfig(quant_type="Q4_K_M", imatrix=str(matrix.save(tmp_path / "imatrix.gguf")))
    expected = quantkit.save(quantkit.quantize(model, config), tmp_path / "memory.gguf", tokenizer=tokenizer)
    with StreamedCheckpoint(folder) as checkpoint:
        write_gguf_streamed(checkpoint, config, tmp_path / "config.gguf", tokenizer, CPU)
        write_gguf_streamed(checkpoint, GGUFConfig(), tmp_path / "given.gguf", tokenizer, CPU, imatrix=config.imatrix)
    assert (tmp_path / "config.gguf").read_bytes() == expected.read_bytes()
    assert (tmp_path / "given.gguf").read_bytes() == expected.read_bytes()
    assert _streamed(folder, "Q4_K_M", tmp_path / "plain.gguf", tokenizer).read_bytes() != expected.read_bytes()


def test_quantize_streaming_to_a_gguf_path_embeds_the_folders_tokenizer(tmp_path, tokenizer):
    """``quantize_streaming(folder, gguf, "x.gguf")`` and ``quantize --stream --out x.gguf``: the
    file the in-memory save writes, with the tokenizer saved in the checkpoint folder."""
    folder = _checkpoint(tmp_path / "float", torch.bfloat16, False)
    tokenizer.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    expected = quantkit.save(
        quantkit.quantize(model, GGUFConfig(quant_type="Q4_K_M")), tmp_path / "memory.gguf", tokenizer=tokenizer
    )
    path = quantkit.quantize_streaming(folder, "gguf-q4_k_m", tmp_path / "api.gguf")
    assert path.read_bytes() == expected.read_bytes()
    assert (
        main(
            [
                "quantize",
                "--stream",
                "--model",
                str(folder),
                "--method",
                "gguf-q4_k_m",
                "--out",
                str(tmp_path / "cli.gguf"),
            ]
        )
        == 0
    )
    assert (tmp_path / "cli.gguf").read_bytes() == expected.read_bytes()
