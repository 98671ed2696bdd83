"""The layer-by-layer calibration pipeline (quantkit.layerwise), and GPTQ/AWQ vs RTN on SmolLM2."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import make_tiny_llama
from torch import nn

import quantkit
from quantkit import AWQConfig, GPTQConfig, RTNConfig
from quantkit.core.errors import QuantizationError
from quantkit.core.linears import quantizable_linears
from quantkit.layerwise import LayerContext, decoder_stack, quantize_layerwise


def _tokens(nsamples: int = 8, seqlen: int = 64, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))


class _Recorder:
    """A quantize_layer step that quantizes nothing and records what the pipeline hands it."""

    def __init__(self):
        self.inputs: list[torch.Tensor] = []
        self.targets: list[list[str]] = []
        self.names: list[str] = []

    def __call__(self, ctx: LayerContext) -> None:
        self.inputs.append(torch.cat(ctx.chunks))
        self.targets.append(sorted(ctx.targets))
        self.names.append(ctx.name)


@pytest.mark.parametrize("chunk_samples", [3, 8])
def test_layer_inputs_match_the_models_hidden_states(tiny_llama, chunk_samples: int) -> None:
    tokens = _tokens()
    with torch.no_grad():
        expected = tiny_llama(tokens, output_hidden_states=True).hidden_states
    recorder = _Recorder()
    report = quantize_layerwise(
        tiny_llama,
        quantizable_linears(tiny_llama, GPTQConfig()),
        tokens,
        "cpu",
        recorder,
        description="test",
        chunk_samples=chunk_samples,
    )
    assert recorder.names == ["model.layers.0", "model.layers.1"]
    for index, captured in enumerate(recorder.inputs):
        torch.testing.assert_close(captured, expected[index], rtol=1e-5, atol=1e-5)
    assert report.layers == 2 and report.tokens == tokens.numel()
    assert report.peak_rss_bytes > 0 and report.peak_device_bytes is None


def test_targets_are_relative_names_without_skipped_modules(tiny_llama) -> None:
    recorder = _Recorder()
    config = GPTQConfig(modules_to_not_convert=["lm_head", "model.layers.1.mlp"])
    targets = quantizable_linears(tiny_llama, config)
    quantize_layerwise(tiny_llama, targets, _tokens(), "cpu", recorder, description="test")
    all_linears = sorted(
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    )
    assert recorder.targets[0] == all_linears
    assert recorder.targets[1] == [n for n in all_linears if n.startswith("self_attn")]


def test_quantized_layer_feeds_the_next_layer(tiny_llama) -> None:
    """What layer i+1 sees is the output of layer i as the backend left it."""
    seen = []

    def zero_down_proj(ctx: LayerContext) -> None:
        seen.append((ctx.chunks[0].clone(), ctx.kwargs[0]))
        ctx.targets["mlp.down_proj"].linear.weight.zero_()

    targets = quantizable_linears(tiny_llama, GPTQConfig())
    quantize_layerwise(tiny_llama, targets, _tokens(), "cpu", zero_down_proj, description="test")
    (x0, kwargs0), (x1, _) = seen
    with torch.no_grad():
        expected = tiny_llama.model.layers[0](x0, **kwargs0)
        attention_only = (
            x0 + tiny_llama.model.layers[0].self_attn(tiny_llama.model.layers[0].input_layernorm(x0), **kwargs0)[0]
        )
    torch.testing.assert_close(x1, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1, attention_only, rtol=1e-5, atol=1e-5)  # the zeroed MLP adds nothing


def test_observe_stops_after_the_observed_modules(tiny_llama) -> None:
    calls = {"q": 0, "down": 0, "mlp_ran": 0}

    def step(ctx: LayerContext) -> None:
        handle = ctx.module("mlp").register_forward_hook(lambda *a: calls.__setitem__("mlp_ran", calls["mlp_ran"] + 1))

        def on_q(x: torch.Tensor, chunk: int) -> None:
            calls["q"] += 1
            assert x.shape[-1] == 64

        ctx.observe({"self_attn.q_proj": on_q})
        assert calls["mlp_ran"] == 0  # the forward stopped at q_proj
        ctx.observe({"mlp.down_proj": lambda x, c: calls.__setitem__("down", calls["down"] + 1)}, chunks=[0])
        handle.remove()

    targets = quantizable_linears(tiny_llama, GPTQConfig())
    quantize_layerwise(tiny_llama, targets, _tokens(), "cpu", step, description="test", chunk_samples=4)
    assert calls["q"] == 2 * 2 and calls["down"] == 2  # 2 layers x 2 chunks; 2 layers x chunk 0


def test_too_long_seqlen_is_refused(tiny_llama) -> None:
    with pytest.raises(QuantizationError, match="max_position_embeddings=512"):
        quantkit.quantize(tiny_llama, GPTQConfig(), calibration=_tokens(2, 600))


def test_fewer_tokens_than_inputs_warn_and_quantize_on_the_dampened_hessian(tiny_llama, caplog) -> None:
    """8 x 512 tokens for Llama-3.1-8B's 14336-wide down_proj: rank-deficient, which GPTQ's
    dampening handles (as GPTQModel's does); the user is told, not refused."""
    with caplog.at_level("WARNING", logger="quantkit"):
        quantized = quantkit.quantize(tiny_llama, GPTQConfig(), calibration=_tokens(1, 100))
    assert "1 x 100 = 100 tokens, fewer than the 128 inputs" in caplog.text
    assert all(torch.isfinite(p).all() for p in quantized.parameters() if p.is_floating_point())
    with pytest.raises(QuantizationError, match="raise nsamples and seqlen above 0"):
        quantkit.quantize(make_tiny_llama(), GPTQConfig(), calibration=_tokens(1, 0))


def test_token_ids_outside_the_vocabulary_are_refused(tiny_llama) -> None:
    tokens = _tokens()
    tokens[0, 0] = 256
    with pytest.raises(QuantizationError, match="vocabulary has 256 ids"):
        quantkit.quantize(tiny_llama, GPTQConfig(), calibration=tokens)


@pytest.mark.parametrize("config", [GPTQConfig(), AWQConfig(group_size=32)])
def test_unsupported_architecture_is_named(config) -> None:
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(
        BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    )
    with pytest.raises(QuantizationError, match=r"BertForMaskedLM \(model_type 'bert'\).*llama, mistral, qwen2"):
        quantkit.quantize(bert, config, calibration=_tokens(4, 64, vocab=128))


def test_linears_outside_decoder_layers_are_refused() -> None:
    model = make_tiny_llama()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    with pytest.raises(QuantizationError, match="lm_head lie outside"):
        quantkit.quantize(model, GPTQConfig(modules_to_not_convert=[]), calibration=_tokens())


def test_decoder_stack_of_supported_families() -> None:
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    for model in (MistralForCausalLM(MistralConfig(**small)), Qwen2ForCausalLM(Qwen2Config(**small))):
        stack = decoder_stack(model)
        assert stack.layer_name(0) == "model.layers.0" and len(stack.layers) == 1


def test_qwen2_with_biases_quantizes_and_reloads(tmp_path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    ).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    quantized = quantkit.quantize(model, GPTQConfig(group_size=32), calibration=_tokens())
    ids = _tokens(1, 32, seed=1)
    quantkit.save(quantized, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(quantkit.load(tmp_path / "q")(ids).logits, quantized(ids).logits)


# -- model level: SmolLM2-135M on the built-in text ------------------------------------------

NSAMPLES, SEQLEN, EVAL_TOKENS = 16, 512, 2048


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 512) -> float:
    """exp of the mean next-token loss over consecutive windows of ``ids (1, n)``."""
    total, count = 0.0, 0
    for chunk in ids.split(window, dim=1):
        if chunk.shape[1] < 2:
            continue
        loss = model(chunk, labels=chunk).loss.item()
        total, count = total + loss * (chunk.shape[1] - 1), count + chunk.shape[1] - 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def smollm():
    from quantkit.calibration import calibration_tokens, evaluation_tokens
    from quantkit.models import load_model

    model, tokenizer = load_model()
    calibration = calibration_tokens(tokenizer, nsamples=NSAMPLES, seqlen=SEQLEN, seed=0)
    evaluation = evaluation_tokens(tokenizer, max_tokens=EVAL_TOKENS)
    return model, calibration, evaluation, perplexity(model, evaluation)


def _compare(smollm, method_config, rtn_config) -> tuple[float, float, float]:
    model, calibration, evaluation, float_ppl = smollm
    rtn = quantkit.quantize(copy.deepcopy(model), rtn_config)
    rtn_ppl = perplexity(rtn, evaluation)
    del rtn
    method = quantkit.quantize(copy.deepcopy(model), method_config, calibration=calibration)
    method_ppl = perplexity(method, evaluation)
    print(
        f"\nSmolLM2-135M, {EVAL_TOKENS} pydoc eval tokens, calibration {NSAMPLES}x{SEQLEN}: float {float_ppl:.3f}"
        f" | RTN {rtn_ppl:.3f} ({rtn_config.to_diff_dict()}) | {method_config.quant_method.upper()}"
        f" {method_ppl:.3f} ({method_config.to_diff_dict()})"
    )
    return float_ppl, rtn_ppl, method_ppl


@pytest.mark.slow
def test_gptq_4bit_g128_beats_rtn_on_smollm2(smollm) -> None:
    float_ppl, rtn_ppl, gptq_ppl = _compare(
        smollm,
        GPTQConfig(bits=4, group_size=128, nsamples=NSAMPLES, seqlen=SEQLEN),
        RTNConfig(bits=4, group_size=128, sym=True),
    )
    assert float_ppl < gptq_ppl < rtn_ppl


@pytest.mark.slow
def test_awq_4bit_g64_beats_rtn_on_smollm2(smollm) -> None:
    # AWQ's format needs group_size | in_features: 576 % 128 = 64, so g64 is the AWQ setting here.
    float_ppl, rtn_ppl, awq_ppl = _compare(
        smollm,
        AWQConfig(group_size=64, nsamples=NSAMPLES, seqlen=SEQLEN),
        RTNConfig(bits=4, group_size=64, sym=False),
    )
    assert float_ppl < awq_ppl < rtn_ppl


DOWN_PROJ_ONLY = ["lm_head", "*.self_attn.*", "*.gate_proj", "*.up_proj"]
"""On SmolLM2 only mlp.down_proj (1536 inputs) has rows that groups of 128 divide (the rest have 576)."""


@pytest.mark.slow
def test_awq_4bit_g128_beats_rtn_on_the_same_down_projections(smollm) -> None:
    float_ppl, rtn_ppl, awq_ppl = _compare(
        smollm,
        AWQConfig(group_size=128, nsamples=NSAMPLES, seqlen=SEQLEN, modules_to_not_convert=DOWN_PROJ_ONLY),
        RTNConfig(bits=4, group_size=128, sym=False, modules_to_not_convert=DOWN_PROJ_ONLY),
    )
    assert float_ppl < awq_ppl < rtn_ppl
