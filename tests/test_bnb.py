"""bitsandbytes backend: quantization through bitsandbytes, transformers' checkpoint layout both ways."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import quantkit
from quantkit import BnbConfig
from quantkit.core.errors import ModelFormatError
from quantkit.core.registry import get_registry
from quantkit.testing import assert_storage_bits_match, conformance_tests, predicted_storage_bits

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

NF4 = BnbConfig()
NF4_DQ = BnbConfig(use_double_quant=True)
FP4_DQ_128 = BnbConfig(quant_type="fp4", use_double_quant=True, blocksize=128)
INT8 = BnbConfig(load_in_4bit=False, load_in_8bit=True)
CONFIGS = {
    "nf4": NF4,
    "nf4-dq": NF4_DQ,
    "fp4-dq-128": FP4_DQ_128,
    "nf4-bf16": BnbConfig(compute_dtype="bfloat16", blocksize=32),
    "fp4-fp16": BnbConfig(quant_type="fp4", compute_dtype="float16"),
    "int8": INT8,
    "int8-no-outliers": BnbConfig(load_in_4bit=False, load_in_8bit=True, llm_int8_threshold=0.0),
}
TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def backend():
    return get_registry().backends["bitsandbytes"]


def logits(model: nn.Module, ids: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def hf_quantized(float_dir, tmp_path, bnb_config) -> tuple[nn.Module, object]:
    """A model quantized and saved by transformers itself; returns it and its folder."""
    model = transformers.AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=bnb_config)
    folder = tmp_path / "hf-bnb"
    model.save_pretrained(folder)
    return model.eval(), folder


# ------------------------------------------------------------------ fast: tiny Llama

CONTRACT = ("reload_is_exact", "storage_bits_match_saved_bytes")
"""The checks of quantkit.testing run here on the configs tests/test_conformance.py leaves out
(it runs every check on nf4, int8 and nf4-dq)."""
test_contract = conformance_tests(
    "bitsandbytes", [CONFIGS[key] for key in ("nf4-bf16", "fp4-fp16", "int8-no-outliers")], checks=CONTRACT
)
test_contract_double_quant = conformance_tests("bitsandbytes", [FP4_DQ_128], checks=CONTRACT, storage_rtol=1e-4)


@pytest.mark.parametrize("key", CONFIGS)
def test_quantize_replaces_linears(tiny_llama, key):
    config = CONFIGS[key]
    reference = logits(tiny_llama)
    model = quantkit.quantize(tiny_llama, config, device="cpu")
    expected = bnb.nn.Linear8bitLt if config.load_in_8bit else bnb.nn.Linear4bit
    layers = [m for m in model.modules() if isinstance(m, expected)]
    assert len(layers) == 2 * 7 and not model.model.layers[0].self_attn.q_proj.training
    assert type(model.lm_head) is nn.Linear  # tied to the embedding: never quantized
    first = model.model.layers[0].mlp.up_proj
    if config.load_in_8bit:
        assert first.weight.dtype == torch.int8 and first.state.threshold == config.llm_int8_threshold
    else:
        state = first.weight.quant_state
        assert (state.quant_type, state.blocksize, state.nested) == (
            config.quant_type,
            config.blocksize,
            config.use_double_quant,
        )
        assert first.compute_dtype == getattr(torch, config.compute_dtype)
    error = (logits(model) - reference).abs().mean() / reference.abs().mean()
    assert error < (0.05 if config.load_in_8bit else 0.3), error


def test_saved_layout_is_transformers(tiny_llama, tmp_path):
    model = quantkit.quantize(tiny_llama, NF4_DQ, device="cpu")
    quantkit.save(model, tmp_path / "q")
    keys = load_file(tmp_path / "q" / "model.safetensors").keys()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert {
        name,
        f"{name}.absmax",
        f"{name}.quant_map",
        f"{name}.nested_absmax",
        f"{name}.nested_quant_map",
        f"{name}.quant_state.bitsandbytes__nf4",
    } <= set(keys)
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    hf = transformers.BitsAndBytesConfig.from_dict(block)
    assert hf.load_in_4bit and hf.bnb_4bit_use_double_quant and hf.bnb_4bit_quant_type == "nf4"
    assert block["llm_int8_skip_modules"] == ["lm_head"]


@pytest.mark.parametrize("key", ["nf4-dq", "fp4-dq-128", "nf4-bf16", "int8"])
def test_quantkit_save_loads_in_transformers(tiny_llama, tmp_path, key):
    model = quantkit.quantize(tiny_llama, CONFIGS[key], device="cpu")
    quantkit.save(model, tmp_path / "q")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    for module in theirs.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # the same CPU kernel as quantkit's modules
    quantkit.set_kernel(model, "bitsandbytes")  # bitsandbytes' own matmul, as transformers' modules run
    assert torch.equal(logits(theirs), logits(model))


@pytest.mark.parametrize(
    "hf_kwargs",
    [
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_compute_dtype": torch.bfloat16},
        {"load_in_8bit": True},
    ],
    ids=["nf4-dq", "fp4-bf16", "int8"],
)
def test_transformers_save_loads_in_quantkit(tiny_llama, tmp_path, hf_kwargs):
    tiny_llama.save_pretrained(tmp_path / "float")
    theirs, folder = hf_quantized(tmp_path / "float", tmp_path, transformers.BitsAndBytesConfig(**hf_kwargs))
    for module in theirs.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    ours = quantkit.load(folder, device="cpu", kernel="bitsandbytes")
    assert ours.quantkit_config.load_in_8bit == hf_kwargs.get("load_in_8bit", False)
    assert torch.equal(logits(ours), logits(theirs))


def test_module_override_keeps_one_layer_8bit(tiny_llama, tmp_path, caplog):
    config = BnbConfig(
        use_double_quant=True,
        module_overrides={"model.layers.1.mlp.down_proj": {"load_in_4bit": False, "load_in_8bit": True}},
    )
    model = quantkit.quantize(tiny_llama, config, device="cpu")
    assert isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    down_proj = "model.layers.1.mlp.down_proj"
    assert backend().storage_bits(config.for_module(down_proj), down_proj, 64, 128) > 64 * 128 * 8
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        quantkit.save(model, tmp_path / "q")
    assert "transformers cannot" in caplog.text
    loaded = quantkit.load(tmp_path / "q", device="cpu")
    assert loaded.quantkit_config == config
    assert isinstance(loaded.model.layers[1].mlp.down_proj, bnb.nn.Linear8bitLt)
    assert torch.equal(logits(loaded), logits(model))


def test_modules_to_not_convert(tiny_llama, tmp_path):
    config = BnbConfig(modules_to_not_convert=["lm_head", "*.mlp.down_proj", "model.layers.0.self_attn"])
    model = quantkit.quantize(tiny_llama, config, device="cpu")
    kept = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
    assert kept == [
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.mlp.down_proj",
    ]
    quantkit.save(model, tmp_path / "q")
    # transformers does not read glob patterns: the block names the kept linears one by one
    assert (
        json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"] == kept
    )
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    for module in theirs.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    assert type(theirs.model.layers[1].mlp.down_proj) is nn.Linear
    assert torch.equal(logits(quantkit.load(tmp_path / "q", device="cpu")), logits(model))
    quantkit.set_kernel(model, "bitsandbytes")  # bitsandbytes' own matmul, as transformers' modules run
    assert torch.equal(logits(theirs), logits(model))


def test_file_disagreeing_with_its_config_is_refused(tiny_llama, tmp_path):
    quantkit.save(quantkit.quantize(tiny_llama, NF4, device="cpu"), tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    raw = json.loads(path.read_text())
    raw["quantization_config"]["quantkit_config"].update(load_in_4bit=False, load_in_8bit=True)
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelFormatError, match="not a bitsandbytes LLM.int8 weight"):
        quantkit.load(tmp_path / "q", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA (or ROCm) GPU")
@pytest.mark.parametrize("key", ["nf4-dq", "fp4-fp16", "int8"])
def test_quantize_and_forward_on_cuda(tiny_llama, tmp_path, key):
    model = quantkit.quantize(tiny_llama, CONFIGS[key], device="cuda")
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    ids = TOKENS.cuda()
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    quantkit.save(model, tmp_path / "q")
    assert torch.equal(logits(quantkit.load(tmp_path / "q", device="cuda"), ids), out)


# ------------------------------------------------------------------ slow: SmolLM2-135M

EVAL_TOKENS = 1024
IDENTITY_TOKENS = 128
SMOL_CONFIGS = {
    "int8-t1.5": BnbConfig(load_in_4bit=False, load_in_8bit=True, llm_int8_threshold=1.5),
    "nf4": NF4,
    "nf4-dq": NF4_DQ,
    "fp4": BnbConfig(quant_type="fp4"),
}
"""int8 first: every 4-bit result is then also compared with it. LLM.int8 quantizes the
activations too; SmolLM2's have outliers between 1.5 and 6 that the default threshold 6.0
leaves to int8 (measured on these 1024 tokens: +2.2% at 6.0, +0.55% at 3.0, +0.02% at 1.5, +2.7% at 0;
on the comparison's 4096 tokens 3.0 still costs +1.26%, 1.5 +0.58%)."""
FOUR_BIT_LIMIT = {"nf4": 1.40, "nf4-dq": 1.40, "fp4": 1.80}
"""Perplexity ratio to float allowed for 4-bit. FP4 is the coarser code (relative weight
error 0.122 vs NF4's 0.092 on a 4096² matrix): +58% measured here, NF4 +26%."""


@pytest.fixture(scope="module")
def smol():
    """The float SmolLM2, its evaluation tokens and float perplexity (loaded once)."""
    from quantkit.calibration import evaluation_tokens
    from quantkit.models import load_model

    model, tokenizer = load_model()
    ids = evaluation_tokens(tokenizer, max_tokens=EVAL_TOKENS)
    return model, ids, perplexity(model, ids), {}


def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


@pytest.mark.slow
@pytest.mark.parametrize("key", SMOL_CONFIGS)
def test_smollm2_perplexity_and_exact_reload(smol, tmp_path, key):
    float_model, ids, base, measured = smol
    config = SMOL_CONFIGS[key]
    model = copy.deepcopy(float_model)
    predicted = predicted_storage_bits(backend(), config, model)
    model = quantkit.quantize(model, config, device="cpu")
    ppl = perplexity(model, ids)
    measured[key] = ppl
    print(
        f"\nSmolLM2-135M {key}: perplexity {ppl:.3f} vs float {base:.3f} ({100 * (ppl / base - 1):+.2f}%) "
        f"on {ids.shape[1]} tokens"
    )
    if config.load_in_8bit:
        assert abs(ppl / base - 1) < 0.01
    else:
        assert base < ppl < FOUR_BIT_LIMIT[key] * base
        if "int8-t1.5" in measured:
            assert ppl > measured["int8-t1.5"]

    quantkit.save(model, tmp_path / "q")
    # exact, but for the double-quant state's JSON, whose float offset varies by a byte or two
    assert_storage_bits_match(tmp_path / "q", predicted, rtol=1e-4 if config.use_double_quant else 0.0)

    loaded = quantkit.load(tmp_path / "q", device="cpu")
    head = ids[:, :IDENTITY_TOKENS]
    assert torch.equal(logits(loaded, head), logits(model, head))


@pytest.mark.parametrize(
    "config",
    [
        BnbConfig(
            modules_to_not_convert=[], module_overrides={"*.mlp.*": {"load_in_4bit": False, "load_in_8bit": True}}
        ),
        BnbConfig(
            modules_to_not_convert=[], module_overrides={"lm_head": {"load_in_4bit": False, "load_in_8bit": True}}
        ),
        BnbConfig(
            load_in_4bit=False,
            load_in_8bit=True,
            modules_to_not_convert=[],
            module_overrides={"lm_head": {"load_in_4bit": True, "load_in_8bit": False}},
        ),
    ],
)
def test_module_overrides_with_a_tied_head_reload(tiny_llama, tmp_path, config):
    """Issue 13: with lm_head not in modules_to_not_convert, loading swapped the tied (never quantized)
    head for an empty bitsandbytes module that tying then filled with the float embedding: an
    ``assert`` at the first forward (4-bit) or an AttributeError on ``SCB`` (8-bit)."""
    model = quantkit.quantize(tiny_llama, config, device="cpu")
    quantkit.save(model, tmp_path / "q")
    loaded = quantkit.load(tmp_path / "q", device="cpu")
    assert type(loaded.lm_head) is nn.Linear and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))
