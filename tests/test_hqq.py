"""HQQ backend: hqq's HQQLinear, saved in quantkit's own safetensors layout."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import quantkit
from quantkit import HQQConfig
from quantkit.builtin_backends.hqq.layers import hqq_quant_config, quantize_linear
from quantkit.builtin_backends.hqq.quantizer import SLAB_ELEMENTS
from quantkit.core.errors import ConfigValueError, ModelFormatError
from quantkit.core.registry import get_registry
from quantkit.testing import assert_storage_bits_match, conformance_tests, predicted_storage_bits

hqq_quantize = pytest.importorskip("hqq.core.quantize")
HQQLinear = hqq_quantize.HQQLinear

CONFIGS = {
    "4bit-g64": HQQConfig(nbits=4, group_size=64),
    "8bit": HQQConfig(nbits=8, group_size=32, optimize=False),
    "3bit": HQQConfig(nbits=3, group_size=64),
    "2bit-axis0": HQQConfig(nbits=2, group_size=32, axis=0),
    "1bit-g16": HQQConfig(nbits=1, group_size=16, optimize=False),
    "4bit-bf16": HQQConfig(nbits=4, group_size=64, compute_dtype="bfloat16"),
    "4bit-fp16-axis0": HQQConfig(nbits=4, group_size=128, axis=0, compute_dtype="float16", optimize=False),
}
TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def backend():
    return get_registry().backends["hqq"]


def logits(model: nn.Module, ids: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def hqq_layers(model: nn.Module) -> dict[str, HQQLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, HQQLinear)}


# ------------------------------------------------------------------ fast: tiny Llama

test_contract = conformance_tests(
    "hqq", list(CONFIGS.values()), checks=("reload_is_exact", "storage_bits_match_saved_bytes")
)
"""The checks of quantkit.testing run here on every config above (tests/test_conformance.py
runs them all on 4-bit groups of 32)."""


@pytest.mark.parametrize("key", CONFIGS)
def test_quantize_replaces_linears(tiny_llama, key):
    config = CONFIGS[key]
    reference = logits(tiny_llama)
    model = quantkit.quantize(tiny_llama, config, device="cpu")
    layers = hqq_layers(model)
    assert len(layers) == 2 * 7 and type(model.lm_head) is nn.Linear
    dtype = getattr(torch, config.compute_dtype)
    assert model.model.embed_tokens.weight.dtype == dtype and model.config.dtype == dtype
    for module in layers.values():
        assert module.meta["nbits"] == config.nbits and module.meta["axis"] == config.axis
        assert module.W_q.device.type == "cpu" and module.meta["scale"].dtype == dtype and not module.training
    before = logits(model)
    error = ((before.float() - reference).abs().mean() / reference.abs().mean()).item()
    assert error < {8: 0.02, 4: 0.3}.get(config.nbits, 2.0), error


def test_saved_layout(tiny_llama, tmp_path):
    """The layout documented in quantkit.builtin_backends.hqq.layout: names, dtypes, shapes, meta."""
    quantkit.save(quantkit.quantize(tiny_llama, HQQConfig(nbits=4, group_size=64), device="cpu"), tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"  # 64 x 128: 128 groups of 64
    assert {k for k in tensors if k.startswith(name + ".")} == {
        f"{name}.{s}" for s in ("W_q", "scale", "zero", "quant_meta")
    }
    assert tensors[f"{name}.W_q"].dtype == torch.uint8 and tensors[f"{name}.W_q"].shape == (64, 64)
    assert tensors[f"{name}.scale"].shape == tensors[f"{name}.zero"].shape == (128, 1)
    assert tensors[f"{name}.quant_meta"].tolist() == [1, 64, 128, 4, 64, 1, 2]
    assert "model.embed_tokens.weight" in tensors and not any(".weight" in k and name in k for k in tensors)
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "hqq" and block["nbits"] == 4


def test_optimizer_lowers_the_error(tiny_llama):
    weights = {n: m.weight.detach().clone() for n, m in tiny_llama.named_modules() if type(m) is nn.Linear}

    def mean_error(optimize: bool) -> float:
        model = quantkit.quantize(
            copy.deepcopy(tiny_llama), HQQConfig(nbits=4, group_size=64, optimize=optimize), device="cpu"
        )
        errors = [
            ((m.dequantize() - weights[n]).abs().mean() / weights[n].abs().mean()).item()
            for n, m in hqq_layers(model).items()
        ]
        return sum(errors) / len(errors)

    assert mean_error(True) < mean_error(False)


def test_module_override_keeps_one_layer_8bit(tiny_llama, tmp_path):
    config = HQQConfig(nbits=4, module_overrides={"model.layers.1.mlp.down_proj": {"nbits": 8}})
    model = quantkit.quantize(tiny_llama, config, device="cpu")
    assert model.model.layers[1].mlp.down_proj.meta["nbits"] == 8
    assert model.model.layers[0].mlp.down_proj.meta["nbits"] == 4
    quantkit.save(model, tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    assert tensors["model.layers.1.mlp.down_proj.W_q"].shape == (128, 64)
    loaded = quantkit.load(tmp_path / "q", device="cpu")
    assert loaded.model.layers[1].mlp.down_proj.meta["nbits"] == 8
    assert torch.equal(logits(loaded), logits(model))


def test_modules_to_not_convert(tiny_llama, tmp_path):
    config = HQQConfig(modules_to_not_convert=["lm_head", "*.mlp.down_proj"])
    model = quantkit.quantize(tiny_llama, config, device="cpu")
    assert sorted(n for n, m in model.named_modules() if type(m) is nn.Linear) == [
        "lm_head",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    quantkit.save(model, tmp_path / "q")
    loaded = quantkit.load(tmp_path / "q", device="cpu")
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (dict(quant_zero=True), "quant_zero"),
        (dict(quant_scale=True), "quant_scale"),
        (dict(group_size=60), "group_size"),
        (dict(module_overrides={"*.mlp.*": {"quant_scale": True}}), "module_overrides['*.mlp.*'].quant_scale"),
        (
            dict(module_overrides={"*.mlp.*": {"compute_dtype": "bfloat16"}}),
            "module_overrides['*.mlp.*'].compute_dtype",
        ),
    ],
)
def test_unsupported_settings_are_refused(tiny_llama, config, field):
    with pytest.raises(ConfigValueError) as info:
        quantkit.quantize(tiny_llama, HQQConfig(**config), device="cpu")
    assert info.value.field == field
    assert not hqq_layers(tiny_llama)


def test_group_size_that_does_not_divide_a_layer(tiny_llama):
    # q_proj, the first linear, has 64 x 64 = 4096 weights: 48 does not divide them
    with pytest.raises(ConfigValueError, match=r"group_size=48 .*model\.layers\.0\.self_attn\.q_proj"):
        quantkit.quantize(tiny_llama, HQQConfig(group_size=48), device="cpu")
    # 1-bit codes are packed 8 groups per byte: q_proj has 4096 / 1024 = 4 groups
    with pytest.raises(ConfigValueError, match="hqq packs 8 1-bit groups per byte"):
        quantkit.quantize(tiny_llama, HQQConfig(nbits=1, group_size=1024), device="cpu")
    assert not hqq_layers(tiny_llama)


def test_file_disagreeing_with_its_config_is_refused(tiny_llama, tmp_path):
    quantkit.save(quantkit.quantize(tiny_llama, HQQConfig(nbits=4, optimize=False), device="cpu"), tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    raw = json.loads(path.read_text())
    raw["quantization_config"]["nbits"] = 2
    path.write_text(json.dumps(raw))
    with pytest.raises(
        ModelFormatError, match=r"q_proj: .*quant_meta \[1, 64, 64, 4, 64, 1, 2\] != \[1, 64, 64, 2, 64, 1, 4\]"
    ):
        quantkit.load(tmp_path / "q", device="cpu")


def test_lora_on_loaded_model(tiny_llama, tmp_path):
    """PEFT wraps the reloaded HQQLinear modules in its HQQ LoRA layers and trains them."""
    peft = pytest.importorskip("peft")
    quantkit.save(quantkit.quantize(tiny_llama, HQQConfig(nbits=4, optimize=False), device="cpu"), tmp_path / "q")
    model = peft.get_peft_model(
        quantkit.load(tmp_path / "q", device="cpu"),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(wrapped).__name__ == "HqqLoraLinear" and isinstance(wrapped.base_layer, HQQLinear)
    model.train()
    model(TOKENS, labels=TOKENS).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(grads) == 2 * 2 * 2 and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "config",
    [
        HQQConfig(nbits=4, group_size=64),
        HQQConfig(nbits=3, group_size=64),
        HQQConfig(nbits=2, group_size=16, axis=0),
        HQQConfig(nbits=8, group_size=128),
        HQQConfig(nbits=4, group_size=64, optimize=False),
    ],
    ids=["4bit-g64", "3bit", "2bit-axis0", "8bit", "no-optimizer"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slab_quantizer_equals_hqqs_own(config, dtype):
    """The optimizer run a slab at a time gives hqq's ``HQQLinear`` codes, scales and zero-points
    byte for byte (a weight of 2 slabs and a half, bias included)."""
    torch.manual_seed(0)
    linear = nn.Linear(1280, SLAB_ELEMENTS * 5 // 2 // 1280, dtype=dtype)
    ours = quantize_linear(linear, config, torch.device("cpu"))
    compute_dtype = getattr(torch, config.compute_dtype)
    reference = HQQLinear(copy.deepcopy(linear), hqq_quant_config(config), compute_dtype=compute_dtype, device="cpu")
    assert torch.equal(ours.W_q, reference.W_q)
    for field in ("scale", "zero"):
        assert torch.equal(ours.meta[field], reference.meta[field])
    assert torch.equal(ours.bias, reference.bias) and ours.meta["shape"] == reference.meta["shape"]


def test_the_cuda_kernel_reads_the_device_of_a_layer_without_buffers(tiny_llama):
    """HQQ's layers hold parameters only: int4-cuda's fit check found no buffer to take the device
    of, and the StopIteration broke every 4-bit HQQ forward on a GPU (seen on an H200)."""
    layer = next(iter(hqq_layers(quantkit.quantize(tiny_llama, CONFIGS["4bit-g64"], device="cpu")).values()))
    assert not list(layer.buffers())
    int4_cuda = next(k for k in get_registry().kernels_for(layer) if k.name == "int4-cuda")
    assert int4_cuda.fits(layer) == ""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("key", ["4bit-g64", "3bit", "4bit-bf16"])
def test_quantize_and_forward_on_cuda(tiny_llama, tmp_path, key):
    model = quantkit.quantize(tiny_llama, CONFIGS[key], device="cuda")
    assert all(m.W_q.device.type == "cuda" for m in hqq_layers(model).values())
    ids = TOKENS.cuda()
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    quantkit.save(model, tmp_path / "q")
    assert torch.equal(logits(quantkit.load(tmp_path / "q", device="cuda"), ids), out)


# ------------------------------------------------------------------ slow: SmolLM2-135M

EVAL_TOKENS = 1024
IDENTITY_TOKENS = 128
SMOL_CONFIGS = {  # in this order: each result is compared with the previous ones
    "hqq-8bit": HQQConfig(nbits=8, group_size=64, optimize=False),  # the optimizer gains nothing at 8 bits
    "hqq-4bit-g64": HQQConfig(nbits=4, group_size=64),
    "hqq-2bit-g64": HQQConfig(nbits=2, group_size=64, optimize=False),
}
"""The optimizer (20 passes over every weight: the bulk of quantizing time on a CPU) runs at
4 bits. At 2 bits groups of 64 wreck this model with or without it (perplexity ~4e5 with
it, ~1e6 without, measured), so the 2-bit test saves the time."""


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
    ppl = measured[config.nbits] = perplexity(model, ids)
    print(
        f"\nSmolLM2-135M {key}: perplexity {ppl:.3f} vs float {base:.3f} ({100 * (ppl / base - 1):+.2f}%) "
        f"on {ids.shape[1]} tokens"
    )
    if config.nbits == 8:
        assert abs(ppl / base - 1) < 0.01
    elif config.nbits == 4:
        assert max(base, measured.get(8, base)) < ppl < 1.4 * base
    else:  # 2 bits with groups of 64 wreck a model this small; it must at least be worse than 4 bits
        assert ppl > max(1.4 * base, measured.get(4, base))

    quantkit.save(model, tmp_path / "q")
    assert_storage_bits_match(tmp_path / "q", predicted)

    loaded = quantkit.load(tmp_path / "q", device="cpu")
    assert hqq_layers(loaded).keys() == hqq_layers(model).keys()
    head = ids[:, :IDENTITY_TOKENS]
    assert torch.equal(logits(loaded, head), logits(model, head))


@pytest.mark.parametrize("skipped", [[], ["*.mlp.down_proj"]])
def test_tied_head_without_lm_head_in_modules_to_not_convert_reloads(tiny_llama, tmp_path, skipped):
    """Issue 13: the tied head is never quantized, so a list without "lm_head" saved fine and then
    failed to load ("lm_head has no HQQ tensor"): loading must skip the tied head too."""
    model = quantkit.quantize(tiny_llama, HQQConfig(nbits=4, modules_to_not_convert=skipped), device="cpu")
    assert type(model.lm_head) is nn.Linear
    quantkit.save(model, tmp_path / "q")
    loaded = quantkit.load(tmp_path / "q", device="cpu")
    assert type(loaded.lm_head) is nn.Linear and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(model))
