"""GGUF single-file export and import: llama.cpp metadata and layout, transformers and llama.cpp reading it."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama
from gguf import GGUFReader, LlamaFileType

import quantkit
from quantkit import GGUFConfig
from quantkit.builtin_backends.gguf.convert import type_counts
from quantkit.builtin_backends.gguf.export import rope_permutation
from quantkit.cli.main import main as cli_main
from quantkit.core.errors import ModelFormatError, QuantkitError

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # 12345",
    "naïve café – 日本語 <|im_start|>user hi<|im_end|>",
    "   leading spaces\n\n\ttabs",
]


def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (SmolLM2's kind) trained on Python's documentation."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(topics.values())[:20], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _logits(model, vocab=512, seed=1):
    quantkit.set_kernel(model, "dequantize")  # float32 products, as transformers' dequantized model
    torch.manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 10))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama quantized to Q4_K_M (K types and fallbacks) written as .gguf with a tokenizer."""
    folder = tmp_path_factory.mktemp("gguf")
    model = quantkit.quantize(make_tiny_llama(hidden=64, intermediate=256, layers=4, vocab=512), GGUFConfig())
    tokenizer = tiny_tokenizer()
    quantkit.save(model, folder / "tiny.gguf", tokenizer=tokenizer)
    return model, tokenizer, folder / "tiny.gguf"


def test_gguf_metadata_and_tensor_layout(exported):
    model, tokenizer, path = exported
    reader = GGUFReader(path)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("general.file_type") == LlamaFileType.MOSTLY_Q4_K_M
    assert field("general.quantization_version") == 2
    expected = {
        "llama.block_count": 4,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 256,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.context_length": 512,
        "llama.vocab_size": 512,
    }
    assert {key: field(key) for key in expected} == expected
    assert field("llama.rope.freq_base") == pytest.approx(10000.0)
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == 512 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokens[450] == "[PAD450]"  # the model's vocabulary is larger than the tokenizer's
    assert types[:4] == [3, 3, 3, 1] and types[450] == 5  # control, normal, unused
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert field("tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field("tokenizer.ggml.add_bos_token") is False
    assert field("tokenizer.chat_template") == CHAT_TEMPLATE

    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd as the output
    assert len(tensors) == 1 + 4 * 9 + 1
    embedding = tensors["token_embd.weight"]
    assert embedding.tensor_type.name == "Q8_0" and list(embedding.shape) == [64, 512]  # ggml order: columns first
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    layer = model.model.layers[2]
    modules = {"attn_v": layer.self_attn.v_proj, "ffn_down": layer.mlp.down_proj, "ffn_up": layer.mlp.up_proj}
    for name, module in modules.items():
        tensor = tensors[f"blk.2.{name}.weight"]
        assert tensor.tensor_type.name == module.qtype
        assert list(tensor.shape) == [module.in_features, module.out_features]
        np.testing.assert_array_equal(tensor.data, module.weight.numpy())
    q = tensors["blk.2.attn_q.weight"].data
    np.testing.assert_array_equal(q, layer.self_attn.q_proj.weight[rope_permutation(64, 4)].numpy())
    k = tensors["blk.2.attn_k.weight"].data
    np.testing.assert_array_equal(k, layer.self_attn.k_proj.weight[rope_permutation(32, 2)].numpy())


def test_rope_permutation_is_llama_cpps():
    """llama.cpp's converter: w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)."""
    w = np.arange(24 * 3).reshape(24, 3)
    expected = w.reshape(2, 2, 6, 3).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(w[rope_permutation(24, 2).numpy()], expected)


def test_quantkit_load_gives_identical_model(exported):
    model, _, path = exported
    loaded = quantkit.load(path, device="cpu")
    assert loaded.quantkit_config.quant_type == "Q4_K_M" and loaded.quantkit_config.module_overrides == {}
    assert loaded.quantkit_backend == "gguf"
    assert type_counts(loaded) == type_counts(model)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_transformers_reads_the_file(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, path = exported
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    torch.testing.assert_close(_logits(hf), _logits(model), rtol=0, atol=0)
    hf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in SAMPLES:
        assert hf_tokenizer(text).input_ids == tokenizer(text).input_ids
    specials = (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.pad_token)
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    messages = [{"role": "user", "content": "hi"}]
    chat = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    assert chat == tokenizer.apply_chat_template(messages, tokenize=False)


def test_untied_model_with_float_head_round_trips(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=512,
        tie_word_embeddings=False,
    )
    float_head = GGUFConfig(quant_type="Q5_1", modules_to_not_convert=["lm_head"])
    model = quantkit.quantize(LlamaForCausalLM(config).eval(), float_head)
    quantkit.save(model, tmp_path / "m.gguf")
    tensors = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}
    assert tensors["output.weight"].tensor_type.name == "F32"  # lm_head is in modules_to_not_convert
    assert tensors["token_embd.weight"].tensor_type.name == "Q5_1"
    loaded = quantkit.load(tmp_path / "m.gguf")
    assert loaded.quantkit_config.modules_to_not_convert == ["lm_head"]
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    torch.testing.assert_close(_logits(hf), _logits(model), rtol=0, atol=0)


@pytest.mark.parametrize(
    "damage",
    [
        "magic",
        "version",
        "truncate_header",
        "truncate_metadata",
        "truncate_tensors",
        "truncate_last_bytes",
        "empty",
        "huge_string_length",
    ],
)
def test_damaged_files_raise_model_format_error(exported, tmp_path, damage):
    _, _, path = exported
    data = path.read_bytes()
    reader = GGUFReader(path)
    data_start = min(int(t.data_offset) for t in reader.tensors)
    damaged = {
        "magic": lambda d: b"GGUX" + d[4:],
        "version": lambda d: d[:4] + (77).to_bytes(4, "little") + d[8:],
        "truncate_header": lambda d: d[:20],
        "truncate_metadata": lambda d: d[: data_start // 2],
        "truncate_tensors": lambda d: d[: data_start + (len(d) - data_start) // 2],
        "truncate_last_bytes": lambda d: d[:-40],
        "empty": lambda d: b"",
        "huge_string_length": lambda d: d[:24] + (2**62).to_bytes(8, "little") + d[32:],  # first key's length
    }[damage](data)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damaged)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ModelFormatError):
        quantkit.load(bad)
    assert bad.read_bytes() == damaged and sorted(p.name for p in tmp_path.iterdir()) == before
    assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_foreign_architecture_is_refused(tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(tmp_path / "bert.gguf", "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ModelFormatError, match="'bert' model"):
        quantkit.load(tmp_path / "bert.gguf")


def test_failed_export_leaves_the_existing_file(exported, tmp_path):
    model, tokenizer, path = exported
    target = tmp_path / "keep.gguf"
    target.write_bytes(path.read_bytes())
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(QuantkitError, match="byte-level BPE"):
        quantkit.save(model, target, tokenizer=_WordLevelTokenizer())
    assert target.read_bytes() == path.read_bytes() and sorted(p.name for p in tmp_path.iterdir()) == before


class _WordLevelTokenizer:
    """Stands for a tokenizer kind the exporter does not write."""

    @property
    def backend_tokenizer(self):
        from tokenizers import Tokenizer, models

        return Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))


def test_cli_quantizes_to_gguf_and_reads_gguf(tmp_path):
    folder = tmp_path / "float"
    make_tiny_llama(hidden=64, intermediate=256, vocab=512).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    out = tmp_path / "q.gguf"
    assert (
        cli_main(
            ["quantize", "--model", str(folder), "--method", "gguf", "--set", "quant_type=Q5_K_M", "--out", str(out)]
        )
        == 0
    )
    assert GGUFReader(out).fields["general.file_type"].contents() == LlamaFileType.MOSTLY_Q5_K_M
    again = tmp_path / "again"
    assert (
        cli_main(["quantize", "--model", str(out), "--method", "gguf", "--set", "quant_type=Q8_0", "--out", str(again)])
        == 0
    )
    assert type_counts(quantkit.load(again)) == {"Q8_0": 15}


# -- SmolLM2 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_q4_k_m(tmp_path_factory):
    from quantkit.calibration import evaluation_tokens
    from quantkit.evaluate import evaluate
    from quantkit.models import load_model

    model, tokenizer = load_model()
    tokens = evaluation_tokens(tokenizer, max_tokens=1024)
    float_ppl = evaluate(model, tokens, seqlen=512).perplexity
    quantized = quantkit.quantize(model, GGUFConfig(quant_type="Q4_K_M"), device="cpu")
    path = tmp_path_factory.mktemp("smollm2") / "smollm2-q4_k_m.gguf"
    quantkit.save(quantized, path, tokenizer=tokenizer)
    return quantized, tokenizer, path, tokens, float_ppl


@pytest.mark.slow
def test_smollm2_q4_k_m_mix_and_perplexity(smollm2_q4_k_m):
    from quantkit.evaluate import evaluate

    model, _, path, tokens, float_ppl = smollm2_q4_k_m
    # attn_q/k/output, ffn_gate/up and 16 attn_v: Q4_K -> Q5_0 (576 columns); 14 attn_v: Q6_K -> Q8_0;
    # ffn_down (1536 columns): Q6_K in 14 use_more_bits layers, else Q4_K; the tied embedding: Q8_0.
    assert type_counts(model) == {"Q4_K": 16, "Q5_0": 166, "Q6_K": 14, "Q8_0": 15}
    ppl = evaluate(model, tokens, seqlen=512).perplexity
    assert float_ppl * 1.005 < ppl < float_ppl * 1.25, (ppl, float_ppl)
    tensor_bytes = sum(int(t.n_bytes) for t in GGUFReader(path).tensors)
    assert tensor_bytes < path.stat().st_size < tensor_bytes + 4_000_000  # plus metadata (tokenizer) and padding


@pytest.mark.slow
def test_smollm2_q4_k_m_gguf_reads_back_identically(smollm2_q4_k_m):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, path, tokens, _ = smollm2_q4_k_m
    window = tokens[:, :64]
    quantkit.set_kernel(model, "dequantize")  # float32 products, as transformers' dequantized model computes
    with torch.no_grad():
        expected = model(window).logits
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        torch.testing.assert_close(hf(window).logits, expected, rtol=0, atol=0)
        del hf
        loaded = quantkit.load(path, device="cpu", kernel="dequantize")
        torch.testing.assert_close(loaded(window).logits, expected, rtol=0, atol=0)
    assert loaded.quantkit_config == GGUFConfig(quant_type="Q4_K_M", modules_to_not_convert=[])
    hf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in SAMPLES:
        assert hf_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert hf_tokenizer.chat_template == tokenizer.chat_template


@pytest.mark.slow
def test_reads_and_rewrites_a_file_llama_cpp_wrote(tmp_path):
    """The embedded SmolLM2 file came from llama.cpp's converter: read it, write it back byte for byte."""
    from quantkit.models import default_model_gguf, load_model

    source = default_model_gguf()
    model = quantkit.load(source, device="cpu", kernel="dequantize")  # float32 products, as transformers computes
    assert model.quantkit_config == GGUFConfig(
        quant_type="Q4_1", modules_to_not_convert=[], module_overrides={"model.embed_tokens": {"quant_type": "Q8_0"}}
    )
    float_model, tokenizer = load_model()  # transformers' dequantization of the same file
    ids = tokenizer(SAMPLES[0], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, float_model(ids).logits, rtol=0, atol=0)
    quantkit.save(model, tmp_path / "again.gguf", tokenizer=tokenizer)
    original = {t.name: t for t in GGUFReader(source).tensors}
    rewritten = {t.name: t for t in GGUFReader(tmp_path / "again.gguf").tensors}
    assert rewritten.keys() == original.keys()
    for name, tensor in original.items():
        assert rewritten[name].tensor_type == tensor.tensor_type, name
        np.testing.assert_array_equal(rewritten[name].data, tensor.data, err_msg=name)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_the_file(smollm2_q4_k_m):
    import llama_cpp

    model, tokenizer, path, tokens, _ = smollm2_q4_k_m
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
    assert llm.tokenize(SAMPLES[0].encode(), add_bos=False) == tokenizer(SAMPLES[0]).input_ids
    prompt = tokens[0, :48].tolist()
    llm.eval(prompt)
    llama_logits = torch.tensor(np.array(llm.scores[: len(prompt)]))
    with torch.no_grad():
        ours = model(tokens[:, :48]).logits[0]
    agreement = (llama_logits.argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(
        f"\nllama.cpp {llama_cpp.__version__} vs quantkit on the exported Q4_K_M file: top-1 agreement "
        f"{agreement:.1%} over {len(prompt)} positions, max |logit diff| {(llama_logits - ours).abs().max():.3f}"
    )
    assert agreement > 0.9
    assert llama_logits[-1].argmax() == ours[-1].argmax()
