"""GGUF backend: llama.cpp's mix rules and fallbacks, GGUF modules, quantize, save/load, storage bits."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama
from safetensors import safe_open
from torch import nn
from transformers import LlamaConfig

import quantkit
from quantkit import GGUFConfig
from quantkit.builtin_backends.gguf import quants
from quantkit.builtin_backends.gguf.convert import type_counts
from quantkit.builtin_backends.gguf.mixes import ModelShape, Role, _use_more_bits, role_of, tensor_type, with_fallback
from quantkit.builtin_backends.gguf.qlinear import GGUFEmbedding, GGUFLinear
from quantkit.core.errors import QuantizationError, QuantkitError
from quantkit.core.registry import get_registry
from quantkit.testing import conformance_tests, predicted_storage_bits

SMOLLM2 = ModelShape(n_layer=30, n_gqa=3)  # 9 heads, 3 KV heads
LLAMA_7B = ModelShape(n_layer=32, n_gqa=1)
LLAMA_70B = ModelShape(n_layer=80, n_gqa=8)


def backend():
    return get_registry().backends["gguf"]


# -- llama.cpp's rules ------------------------------------------------------------------


def test_use_more_bits_picks_llama_cpp_layers():
    assert [i for i in range(30) if _use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(32) if _use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


@pytest.mark.parametrize(
    ("qtype", "cols", "expected"),
    [
        ("Q4_K", 576, "Q5_0"),
        ("Q5_K", 576, "Q5_1"),
        ("Q6_K", 576, "Q8_0"),
        ("Q3_K", 576, "Q4_0"),
        ("Q2_K", 576, "Q4_0"),
        ("Q4_K", 1536, "Q4_K"),
        ("Q6_K", 4096, "Q6_K"),
        ("Q4_K", 100, "F16"),
        ("Q4_0", 100, "F16"),
        ("Q8_0", 48, "F16"),
        ("F16", 7, "F16"),
        ("BF16", 7, "BF16"),
    ],
)
def test_row_size_fallback(qtype, cols, expected):
    assert with_fallback(qtype, cols) == expected


def test_q4_k_m_on_smollm2_shapes():
    """hidden 576 = 2.25 x 256: every matrix reading the hidden state takes a fallback type."""
    t = lambda kind, layer, cols: tensor_type("Q4_K_M", Role(kind, layer), cols, SMOLLM2)  # noqa: E731
    assert t("attn_q", 3, 576) == "Q5_0"
    assert t("attn_v", 0, 576) == "Q8_0"  # Q6_K (use_more_bits), falling back
    assert t("attn_v", 3, 576) == "Q5_0"
    assert t("ffn_down", 0, 1536) == "Q6_K"  # 1536 = 6 x 256: no fallback
    assert t("ffn_down", 3, 1536) == "Q4_K"
    assert t("ffn_up", 5, 576) == "Q5_0"
    assert t("output", None, 576) == "Q8_0"  # 576 % 256 != 0: llama.cpp's Q8_0 for the output
    assert t("token_embd", None, 576) == "Q5_0"


@pytest.mark.parametrize(
    ("mix", "kind", "layer", "shape", "expected"),
    [
        ("Q4_K_M", "attn_v", 0, LLAMA_7B, "Q6_K"),
        ("Q4_K_M", "attn_v", 4, LLAMA_7B, "Q4_K"),
        ("Q4_K_M", "attn_v", 6, LLAMA_7B, "Q6_K"),
        ("Q4_K_M", "ffn_down", 31, LLAMA_7B, "Q6_K"),
        ("Q4_K_M", "attn_q", 0, LLAMA_7B, "Q4_K"),
        ("Q4_K_M", "attn_output", 0, LLAMA_7B, "Q4_K"),
        ("Q4_K_M", "output", None, LLAMA_7B, "Q6_K"),
        ("Q4_K_M", "token_embd", None, LLAMA_7B, "Q4_K"),
        ("Q5_K_M", "ffn_down", 3, LLAMA_7B, "Q6_K"),
        ("Q5_K_M", "ffn_down", 4, LLAMA_7B, "Q5_K"),
        ("Q5_K_S", "attn_v", 0, LLAMA_7B, "Q5_K"),
        ("Q5_K_S", "output", None, LLAMA_7B, "Q6_K"),
        ("Q4_K_S", "attn_v", 3, LLAMA_7B, "Q5_K"),
        ("Q4_K_S", "attn_v", 4, LLAMA_7B, "Q4_K"),
        ("Q4_K_S", "ffn_down", 3, LLAMA_7B, "Q5_K"),
        ("Q4_K_S", "ffn_down", 4, LLAMA_7B, "Q4_K"),
        ("Q3_K_S", "attn_v", 0, LLAMA_7B, "Q3_K"),
        ("Q3_K_S", "ffn_down", 0, LLAMA_7B, "Q3_K"),
        ("Q3_K_M", "attn_v", 1, LLAMA_7B, "Q5_K"),
        ("Q3_K_M", "attn_v", 2, LLAMA_7B, "Q4_K"),
        ("Q3_K_M", "ffn_down", 1, LLAMA_7B, "Q5_K"),
        ("Q3_K_M", "ffn_down", 2, LLAMA_7B, "Q4_K"),
        ("Q3_K_M", "attn_output", 9, LLAMA_7B, "Q4_K"),
        ("Q3_K_M", "ffn_gate", 9, LLAMA_7B, "Q3_K"),
        ("Q3_K_L", "attn_v", 9, LLAMA_7B, "Q5_K"),
        ("Q3_K_L", "ffn_down", 9, LLAMA_7B, "Q5_K"),
        ("Q3_K_L", "attn_output", 9, LLAMA_7B, "Q5_K"),
        ("Q2_K", "attn_v", 9, LLAMA_7B, "Q3_K"),
        ("Q2_K", "attn_v", 9, ModelShape(32, 4), "Q4_K"),
        ("Q2_K", "ffn_down", 9, LLAMA_7B, "Q3_K"),
        ("Q2_K", "attn_output", 9, LLAMA_7B, "Q3_K"),
        ("Q2_K", "ffn_up", 9, LLAMA_7B, "Q2_K"),
        ("Q4_K_S", "attn_v", 10, LLAMA_70B, "Q5_K"),
        ("Q3_K_S", "attn_v", 10, LLAMA_70B, "Q5_K"),
        ("Q4_K_M", "attn_v", 10, LLAMA_70B, "Q5_K"),
        ("Q4_K_M", "attn_v", 2, LLAMA_70B, "Q6_K"),
    ],
)
def test_mix_rules(mix, kind, layer, shape, expected):
    assert tensor_type(mix, Role(kind, layer), 4096, shape) == expected


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q6_K", "Q4_K", "F16"])
def test_single_types_are_pure(qtype):
    for role in (Role("attn_v", 0), Role("ffn_down", 0), Role("output"), Role("token_embd"), None):
        assert tensor_type(qtype, role, 4096, LLAMA_7B) == qtype
    assert tensor_type(qtype, Role("attn_q", 0), 576, SMOLLM2) == with_fallback(qtype, 576)


def test_roles_of_transformers_names():
    assert role_of("model.layers.7.self_attn.v_proj") == Role("attn_v", 7)
    assert role_of("model.layers.29.mlp.down_proj", 30) == Role("ffn_down", 29)
    assert role_of("lm_head") == Role("output")
    assert role_of("model.embed_tokens") == Role("token_embd")
    assert role_of("") is None
    assert role_of("encoder.layer.0.attention.self.query") == Role("attn_q", 0)  # gguf-py knows BERT names too
    assert role_of("classifier.dense") is None


def test_mixes_need_the_model_for_layer_dependent_tensors():
    config = GGUFConfig(quant_type="Q4_K_M")
    b = backend()
    assert b.storage_bits(config, "model.layers.0.self_attn.q_proj", 576, 576) == 576 * (576 // 32) * 22 * 8
    with pytest.raises(QuantkitError, match="storage_context"):
        b.storage_bits(config, "model.layers.0.self_attn.v_proj", 192, 576)
    smollm2 = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    model = SimpleNamespace(config=smollm2)
    with b.storage_context(model):
        assert b.storage_bits(config, "model.layers.0.self_attn.v_proj", 192, 576) == 192 * 576 // 32 * 34 * 8
        assert b.storage_bits(config, "model.layers.3.self_attn.v_proj", 192, 576) == 192 * 576 // 32 * 22 * 8
    assert b.storage_bits(GGUFConfig(quant_type="Q4_0"), "", 4096, 4096) == 4096 * 4096 // 32 * 18 * 8


# -- GGUF modules ---------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K", "Q5_1", "F16"])
def test_gguf_linear_matches_its_dequantized_weight(qtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 48, bias=True)
    module = GGUFLinear.from_linear(linear, qtype)
    quantkit.set_kernel(module, "dequantize")  # exact float32; int4-cpu (Q4_K) is tested in test_kernels.py
    x = torch.randn(3, 5, 256)
    weight = quants.dequantize(module.weight, qtype, (48, 256))
    # the layer adds its bias after the product: F.linear(x, w, b) rounds otherwise on some CPUs
    torch.testing.assert_close(module(x), torch.nn.functional.linear(x, weight) + linear.bias, rtol=0, atol=0)
    error = (weight - linear.weight).norm() / linear.weight.norm()
    assert error < {"Q8_0": 0.01, "Q4_K": 0.12, "Q6_K": 0.03, "Q5_1": 0.05, "F16": 1e-3}[qtype]
    assert module.weight.dtype == torch.uint8
    assert tuple(module.weight.shape) == (48, 256 // quants.block_size(qtype) * quants.type_size(qtype))
    assert int(module.ggml_type) == {"Q8_0": 8, "Q4_K": 12, "Q6_K": 14, "Q5_1": 7, "F16": 1}[qtype]


def test_gguf_embedding_dequantizes_only_the_looked_up_rows():
    torch.manual_seed(0)
    embedding = nn.Embedding(100, 64)
    module = GGUFEmbedding.from_embedding(embedding, "Q8_0")
    ids = torch.tensor([[3, 99, 3], [0, 1, 2]])
    table = quants.dequantize(module.weight, "Q8_0", (100, 64))
    torch.testing.assert_close(module(ids), table[ids], rtol=0, atol=0)
    assert module.to(torch.float16)(ids).dtype == torch.float16


# -- the backend on a small Llama -----------------------------------------------------


def _logits(model, seed=1):
    torch.manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        return model(ids).logits


def test_quantize_follows_the_mix_rules_and_ties_the_head():
    """hidden 64: the K types of matrices reading the hidden state fall back; ffn_down (256 columns) does not."""
    model = make_tiny_llama(hidden=64, intermediate=256, layers=8)
    reference = _logits(model)
    quantkit.quantize(model, GGUFConfig(quant_type="Q4_K_M"), device="cpu")
    layers = model.model.layers
    more_bits = [True, False, False, True, False, False, True, True]  # use_more_bits over 8 layers
    assert {layer.self_attn.q_proj.qtype for layer in layers} == {"Q5_0"}
    assert [layer.self_attn.v_proj.qtype for layer in layers] == ["Q8_0" if m else "Q5_0" for m in more_bits]
    assert [layer.mlp.down_proj.qtype for layer in layers] == ["Q6_K" if m else "Q4_K" for m in more_bits]
    assert isinstance(model.model.embed_tokens, GGUFEmbedding) and model.model.embed_tokens.qtype == "Q8_0"
    assert isinstance(model.lm_head, GGUFLinear) and model.lm_head.weight is model.model.embed_tokens.weight
    logits = _logits(model)
    assert (logits - reference).norm() / reference.norm() < 0.2


def test_modules_to_not_convert_and_overrides():
    model = make_tiny_llama(hidden=64, intermediate=128, layers=2)
    config = GGUFConfig(
        quant_type="Q4_0",
        modules_to_not_convert=["model.embed_tokens", "model.layers.0.self_attn.q_proj"],
        module_overrides={
            "*.mlp.down_proj": {"quant_type": "Q8_0"},
            "model.layers.1.self_attn.v_proj": {"quant_type": "Q4_K_M"},
        },
    )
    quantkit.quantize(model, config, device="cpu")
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[1].self_attn.q_proj.qtype == "Q4_0"
    assert {layer.mlp.down_proj.qtype for layer in model.model.layers} == {"Q8_0"}
    # Q4_K_M gives the last attn_v Q6_K, which falls back on 64 columns
    assert model.model.layers[1].self_attn.v_proj.qtype == "Q8_0"


def test_untied_output_takes_the_output_rule_unless_skipped():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=False,
    )
    model = quantkit.quantize(LlamaForCausalLM(config).eval(), GGUFConfig(quant_type="Q4_K_M"))  # as llama.cpp
    assert model.lm_head.qtype == "Q8_0"  # llama.cpp's output rule when rows are not multiples of 256
    assert model.model.embed_tokens.qtype == "Q5_0"  # token_embd: the mix's Q4_K, falling back
    skipped = GGUFConfig(quant_type="Q4_K_M", modules_to_not_convert=["lm_head"])
    kept = quantkit.quantize(LlamaForCausalLM(config).eval(), skipped)
    assert type(kept.lm_head) is nn.Linear


def test_non_finite_weights_are_refused():
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 2] = float("nan")
    with pytest.raises(QuantizationError, match="embed_tokens"):
        quantkit.quantize(model, GGUFConfig(quant_type="Q8_0"))


test_contract = conformance_tests(
    "gguf",
    [GGUFConfig(quant_type=t) for t in ("Q3_K_S", "BF16", "Q2_K")],
    checks=("reload_is_exact", "storage_bits_match_saved_bytes"),
    storage_rtol=1e-3,
)
"""The checks of quantkit.testing run here on types tests/test_conformance.py leaves out (it runs
every check on Q4_K_M and Q8_0): the folder and the ``.gguf`` file reload exactly, tied head
included; storage_bits counts the ggml blocks, not the int32 ``ggml_type`` beside each weight."""


@pytest.mark.parametrize("quant_type", ["Q4_K_M", "Q3_K_S", "BF16"])
def test_saved_folder_records_each_tensors_ggml_type(tmp_path, quant_type):
    model = quantkit.quantize(make_tiny_llama(hidden=64, intermediate=256, layers=3), GGUFConfig(quant_type=quant_type))
    quantkit.save(model, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.ggml_type").item() == int(
            {"Q4_K_M": 6, "Q3_K_S": 2, "BF16": 30}[quant_type]
        )
        assert f.get_tensor("model.layers.0.mlp.down_proj.ggml_type").item() == int(
            {"Q4_K_M": 12, "Q3_K_S": 11, "BF16": 30}[quant_type]
        )


def test_saved_type_wins_over_the_config(tmp_path):
    """A layer saved with another type than the config's rules give loads as saved."""
    model = quantkit.quantize(make_tiny_llama(), GGUFConfig(quant_type="Q4_0"))
    assert model.model.layers[1].mlp.up_proj.qtype == "Q4_0"
    model.model.layers[1].mlp.up_proj = GGUFLinear.from_linear(nn.Linear(64, 128, bias=False), "Q8_0")
    quantkit.save(model, tmp_path / "m")
    loaded = quantkit.load(tmp_path / "m", device="cpu")
    assert loaded.model.layers[1].mlp.up_proj.qtype == "Q8_0"
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("quant_type", ["Q4_K_M", "Q2_K", "Q8_0"])
def test_each_weight_holds_exactly_its_storage_bits(tmp_path, quant_type):
    """Every linear's packed ``weight`` is exactly the ggml blocks storage_bits counts (and the
    estimator sums), over 8 layers: every position of the mixes' layer rules."""
    model = make_tiny_llama(hidden=64, intermediate=256, layers=8)
    config = GGUFConfig(quant_type=quant_type)
    predicted = predicted_storage_bits(backend(), config, model)
    assert quantkit.estimate(config=config, model_config=model.config.to_dict()).quantized_bits == sum(
        predicted.values()
    )
    quantkit.quantize(model, config)
    quantkit.save(model, tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        stored = {name: f.get_tensor(name + ".weight").numel() * 8 for name in predicted}
    assert stored == predicted


def test_config_json_records_the_gguf_config(tmp_path):
    config = GGUFConfig(quant_type="Q5_K_M", module_overrides={"*.q_proj": {"quant_type": "Q8_0"}})
    quantkit.save(quantkit.quantize(make_tiny_llama(), config), tmp_path / "m")
    block = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert quantkit.config_from_dict(block) == config


# -- SmolLM2 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from quantkit.calibration import evaluation_tokens
    from quantkit.evaluate import evaluate
    from quantkit.models import load_model

    model, tokenizer = load_model()
    tokens = evaluation_tokens(tokenizer, max_tokens=1024)
    return model, tokens, evaluate(model, tokens, seqlen=512).perplexity


@pytest.mark.slow
def test_smollm2_q8_0_perplexity_within_1_percent_and_reload(smollm2, tmp_path):
    from quantkit.evaluate import evaluate
    from quantkit.models import load_model

    _, tokens, float_ppl = smollm2
    model = quantkit.quantize(load_model()[0], GGUFConfig(quant_type="Q8_0"), device="cpu")
    assert type_counts(model) == {"Q8_0": 211}  # 210 linears and the tied embedding
    ppl = evaluate(model, tokens, seqlen=512).perplexity
    assert abs(ppl - float_ppl) / float_ppl < 0.01, (ppl, float_ppl)
    quantkit.save(model, tmp_path / "q8")
    loaded = quantkit.load(tmp_path / "q8", device="cpu")
    window = tokens[:, :128]
    with torch.no_grad():
        torch.testing.assert_close(loaded(window).logits, model(window).logits, rtol=0, atol=0)
