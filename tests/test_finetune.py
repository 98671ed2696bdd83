"""LoRA / QLoRA fine-tuning (quantkit.finetune): settings, preparation, adapters, training."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from conftest import make_tiny_llama

import quantkit
from quantkit import finetune as ft
from quantkit.core.backend import Backend
from quantkit.core.capabilities import ALL_HARDWARE, Capabilities
from quantkit.core.errors import ConfigTypeError, ModelFormatError, NotTrainableError, QuantkitError, UnknownFieldError
from quantkit.core.hardware import bf16_native
from quantkit.core.serialization import BACKEND_ATTR

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tokens(n: int = 4, seqlen: int = 16, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def _base_state(model) -> dict[str, torch.Tensor]:
    """Every base tensor (quantized buffers included) under its name without PEFT's wrapping."""
    state = model.state_dict()
    return {
        k.replace(".base_layer", ""): v.detach().clone()
        for k, v in state.items()
        if ".lora_" not in k and isinstance(v, torch.Tensor)
    }


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


# -- LoRA settings ------------------------------------------------------------------


def test_lora_true_is_txtais_short_form() -> None:
    config = ft.lora_config(True)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (16, 8, 0.05, "none")
    assert config.target_modules == "all-linear" and config.task_type == "CAUSAL_LM"


def test_lora_dict_overrides_fields() -> None:
    config = ft.lora_config({"r": 4, "lora_dropout": 0.0})
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)


def test_lora_settings_are_checked() -> None:
    with pytest.raises(UnknownFieldError, match="did you mean 'lora_alpha'"):
        ft.lora_config({"lora_alhpa": 4})
    with pytest.raises(ConfigTypeError):
        ft.lora_config("yes")


def test_all_linear_targets_every_linear_but_the_head(tiny_llama) -> None:
    targets = ft.lora_targets(tiny_llama)
    assert sorted(targets) == sorted(
        f"model.layers.{i}.{p}.{n}"
        for i in range(2)
        for p, n in ([("self_attn", n) for n in LINEARS[:4]] + [("mlp", n) for n in LINEARS[4:]])
    )


# -- preparation and the adapters ----------------------------------------------------


def test_attach_lora_freezes_the_base_and_casts_half_precision_to_float32() -> None:
    model = make_tiny_llama().to(torch.bfloat16)
    peft_model = ft.attach_lora(model, {"r": 4})
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * len(LINEARS)
    assert {p.dtype for p in peft_model.parameters()} == {torch.float32}
    embeddings = peft_model.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert embeddings.requires_grad  # gradients reach adapters through frozen layers


def test_gradients_reach_only_the_adapters(tiny_llama) -> None:
    peft_model = ft.attach_lora(tiny_llama, {"lora_dropout": 0.0})
    tokens = _tokens()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # lora_B starts at zero: lora_A's gradient appears from the second step on
        optimizer.zero_grad()
        peft_model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    lora = {n for n, _ in peft_model.named_parameters() if ".lora_" in n}
    assert with_grad == lora
    assert all(peft_model.get_parameter(n).grad.abs().sum() > 0 for n in lora)


def test_adapter_saves_as_safetensors_and_reloads_to_the_same_outputs(tmp_path, tiny_llama) -> None:
    base = copy.deepcopy(tiny_llama)
    result = ft.finetune(tiny_llama, _StubTokenizer(), _tokens(), steps=3, lr=1e-2, seqlen=16)
    path = ft.save_adapter(result.model, tmp_path / "adapter")
    assert {p.name for p in path.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 16
    reloaded = ft.load_adapter(base, path)
    tokens = _tokens(seed=1)
    torch.testing.assert_close(_logits(reloaded, tokens), _logits(result.model, tokens), rtol=0, atol=0)
    with pytest.raises(ModelFormatError, match="adapter_model.safetensors"):
        ft.load_adapter(make_tiny_llama(), tmp_path)


def test_merge_into_a_float_base_matches_the_adapted_model(tiny_llama) -> None:
    result = ft.finetune(tiny_llama, _StubTokenizer(), _tokens(), steps=3, lr=1e-2, seqlen=16)
    tokens = _tokens(seed=1)
    adapted = _logits(result.model, tokens)
    merged = ft.merge_adapter(result.model)
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, tokens), adapted, rtol=1e-4, atol=1e-4)


def test_finetune_lowers_the_loss_and_reports_its_cost(tiny_llama) -> None:
    tokens = _tokens(2)
    result = ft.finetune(
        tiny_llama, _StubTokenizer(), tokens, steps=20, lr=1e-2, batch_size=2, lora={"lora_dropout": 0.0}
    )
    assert len(result.losses) == 20 and result.losses[-1] < result.losses[0] - 0.5
    assert result.seconds > 0 and result.peak_rss_bytes > 50 * 2**20


def test_finetune_rejects_bad_sizes(tiny_llama) -> None:
    with pytest.raises(QuantkitError, match="steps=0"):
        ft.finetune(tiny_llama, _StubTokenizer(), _tokens(), steps=0)


# -- the trainability contract --------------------------------------------------------


class FrozenBackend(Backend):
    """A backend whose modules cannot train (a custom kernel without a backward, say)."""

    name = "frozen"
    config_class = quantkit.RTNConfig
    capabilities = Capabilities(
        quantize_hardware=ALL_HARDWARE,
        inference_hardware=ALL_HARDWARE,
        requires_calibration=False,
        serializable=False,
        trainable=False,
    )

    def quantize(self, model, config, *, calibration, device):
        raise AssertionError("not used: the test marks an RTN model as this backend's")

    def storage_bits(self, config, name, out_features, in_features):
        return 4 * out_features * in_features


def test_not_trainable_backends_are_refused_naming_the_trainable_ones(tiny_llama) -> None:
    quantkit.api.get_registry().register_backend(FrozenBackend())
    model = quantkit.quantize(tiny_llama, quantkit.RTNConfig(group_size=64), device="cpu")
    setattr(model, BACKEND_ATTR, "frozen")
    trainable = ", ".join(ft.trainable_backends())
    assert "frozen" not in trainable and "bitsandbytes" in trainable
    with pytest.raises(NotTrainableError, match=f"'frozen' declares trainable=False.*{trainable}"):
        ft.attach_lora(model)
    with pytest.raises(NotTrainableError):
        ft.finetune(model, _StubTokenizer(), _tokens(), steps=1)


def test_trainable_backends_are_the_declared_ones() -> None:
    declared = sorted(b.name for b in quantkit.backends() if b.capabilities.trainable)
    assert ft.trainable_backends() == declared and {"bitsandbytes", "hqq"} <= set(declared)


# -- QLoRA: compute dtype, tokenizer ---------------------------------------------------


def test_qlora_short_form_computes_in_bfloat16_only_where_native(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="quantkit"):
        config = ft.qlora_config(True, "cpu")
    assert (config.quant_type, config.use_double_quant, config.load_in_4bit) == ("nf4", True, True)
    expected = "bfloat16" if bf16_native("cpu") else "float32"
    assert config.compute_dtype == expected and f"compute dtype: {expected}" in caplog.text
    explicit = quantkit.BnbConfig(compute_dtype="bfloat16")
    assert ft.qlora_config(explicit, "cpu") is explicit


def test_finetune_quantize_true_is_qlora(tiny_llama) -> None:
    result = ft.finetune(tiny_llama, _StubTokenizer(), _tokens(), steps=1, quantize=True, device="cpu", seqlen=16)
    base = result.model.get_base_model()
    assert base.quantkit_backend == "bitsandbytes" and base.quantkit_config == ft.qlora_config(True, "cpu")
    import bitsandbytes as bnb

    assert isinstance(result.model.base_model.model.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    assert len(result.losses) == 1 and torch.isfinite(torch.tensor(result.losses)).all()


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    from quantkit.models import default_model_folder

    return AutoTokenizer.from_pretrained(default_model_folder())


def test_tokenizer_without_pad_token_pads_with_eos_on_the_left(smollm_tokenizer) -> None:
    tokenizer = copy.deepcopy(smollm_tokenizer)
    tokenizer.pad_token = None
    tokenizer.padding_side = "right"
    ft.prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"
    batch = tokenizer(["a", "a longer prompt here"], padding=True)["input_ids"]
    assert batch[0][0] == tokenizer.pad_token_id and batch[0][-1] != tokenizer.pad_token_id


def test_batched_generation_matches_one_prompt_at_a_time(smollm_tokenizer) -> None:
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(smollm_tokenizer),
            max_position_embeddings=256,
        )
    ).eval()
    tokenizer = copy.deepcopy(smollm_tokenizer)
    prompts = ["def", "The quick brown fox jumps over"]
    batched = ft.generate(model, tokenizer, prompts, max_new_tokens=5)
    single = [ft.generate(model, tokenizer, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single


class _StubTokenizer:
    """Enough of a tokenizer for runs on token ids: pad and EOS tokens."""

    pad_token = eos_token = "</s>"
    padding_side = "right"


# -- SmolLM2: QLoRA on bitsandbytes NF4, LoRA on HQQ 4-bit ------------------------------

STEPS, BATCH, SEQLEN = 16, 2, 48


@pytest.fixture(scope="module")
def smollm():
    from quantkit.models import load_model

    return load_model()


def _eval_loss(model, tokens: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens, labels=tokens).loss.item()


TRAINABLE_CONFIGS = {
    "bitsandbytes": ft.qlora_config(True, "cpu"),
    "hqq": quantkit.HQQConfig(nbits=4, group_size=64, optimize=False),
    "gptq": quantkit.GPTQConfig(bits=4, group_size=64, nsamples=12, seqlen=128),
    # SmolLM2's 576 inputs rule out AWQ groups of 128
    "awq": quantkit.AWQConfig(bits=4, group_size=64, nsamples=12, seqlen=128),
    "gguf": quantkit.GGUFConfig(quant_type="Q4_K_M"),
    "rtn": quantkit.RTNConfig(bits=4, group_size=64),
    "eetq": "eetq-int8",
    # one greedy code assignment after a short k-means, o_proj only (CI time): LoRA has work to do
    "aqlm": {
        "quant_method": "aqlm",
        "modules_to_not_convert": ["lm_head", "*.mlp.*", "*.q_proj", "*.k_proj", "*.v_proj"],
        "num_codebooks": 2,
        "nbits_per_codebook": 8,
        "beam_size": 1,
        "rounds": 1,
        "codebook_steps": 0,
        "kmeans_iters": 2,
        "kmeans_points_per_centroid": 8,
        "nsamples": 12,
        "seqlen": 128,
    },
}
"""One 4-bit config per backend; the test below runs for every backend declaring ``trainable=True``."""


def test_every_trainable_backend_has_a_smollm2_finetune_test() -> None:
    builtin = set(quantkit.api.get_registry().builtin_backends())  # a third-party plugin brings its own tests
    assert set(ft.trainable_backends()) & builtin <= set(TRAINABLE_CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(TRAINABLE_CONFIGS))
def test_lora_on_a_quantized_smollm2_trains_the_adapter_only(smollm, backend, tmp_path) -> None:
    from quantkit.calibration import calibration_tokens

    if backend not in ft.trainable_backends():
        pytest.skip(f"{backend} is not available or declares trainable=False")
    float_model, tokenizer = smollm
    config = TRAINABLE_CONFIGS[backend]
    model = quantkit.quantize(copy.deepcopy(float_model), config, device="cpu", tokenizer=tokenizer)
    assert getattr(model, BACKEND_ATTR) == backend
    pristine = copy.deepcopy(model)
    before = _base_state(model)
    tokens = calibration_tokens(tokenizer, nsamples=STEPS * BATCH, seqlen=SEQLEN)
    probe = tokens[:4]  # the first two training batches
    peft_model = ft.attach_lora(model)
    initial = _lora_state(peft_model)
    start_loss = _eval_loss(peft_model, probe)

    result = ft.finetune(peft_model, tokenizer, tokens, steps=STEPS, lr=2e-3, batch_size=BATCH)
    assert _eval_loss(result.model, probe) < start_loss - 0.5  # measured: 4.1 -> 2.8 on both backends
    losses = torch.tensor(result.losses)
    assert len(losses) == STEPS and torch.isfinite(losses).all()
    assert losses[-4:].mean() < losses[:4].mean()  # each step's loss is on a batch not trained on yet

    # every adapter matrix trained; nothing else did, or even received a gradient
    trained = _lora_state(result.model)
    assert trained.keys() == initial.keys() and all(not torch.equal(trained[k], initial[k]) for k in initial)
    result.model.train()
    result.model(input_ids=probe[:2], labels=probe[:2]).loss.backward()
    with_grad = {n for n, p in result.model.named_parameters() if p.grad is not None}
    assert with_grad == set(initial)
    # the quantized base is bit-identical
    after = _base_state(result.model.get_base_model())
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]

    # the adapter reloads onto the untouched quantized base with the same outputs
    path = ft.save_adapter(result.model, tmp_path / "adapter")
    reloaded = ft.load_adapter(pristine, path)
    torch.testing.assert_close(_logits(reloaded, probe), _logits(result.model, probe), rtol=0, atol=0)
