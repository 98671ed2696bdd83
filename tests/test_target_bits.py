"""Automatic mixed precision (``quantkit.autobits``, ``quantize --target-bits``)."""

from __future__ import annotations

import copy
import itertools
import json
import random

import pytest
import torch

from quantkit.api import quantize
from quantkit.autobits import choose_mixed_precision, measure_sensitivity
from quantkit.autobits.allocate import allocate
from quantkit.autobits.sensitivity import collect_statistics
from quantkit.builtin_backends.gguf.qlinear import GGUFEmbedding, GGUFLinear
from quantkit.builtin_backends.gptq.qlinear import GPTQLinear
from quantkit.calibration import calibration_tokens, evaluation_tokens
from quantkit.cli import quantize as quantize_command
from quantkit.cli.main import main
from quantkit.core.errors import ConfigValueError
from quantkit.core.resolve import config_from_dict, preset
from quantkit.distributed import Distributed
from quantkit.estimate import estimate
from quantkit.evaluate import evaluate
from quantkit.models import load_model
from quantkit.testing import tiny_llama


def brute_force(costs, losses, budget):
    best = None
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        if sum(c[j] for c, j in zip(costs, pick)) <= budget:
            loss = sum(x[j] for x, j in zip(losses, pick))
            best = loss if best is None else min(best, loss)
    return best


def test_allocation_is_optimal_and_within_budget():
    rng = random.Random(0)
    for _ in range(30):
        costs = [sorted(rng.randint(1, 40) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(2, 5))]
        losses = [[rng.random() for _ in c] for c in costs]
        budget = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
        picked = allocate(costs, losses, budget)
        assert sum(c[j] for c, j in zip(costs, picked)) <= budget
        assert sum(x[j] for x, j in zip(losses, picked)) == pytest.approx(brute_force(costs, losses, budget))


def test_allocation_rounds_costs_up_to_keep_the_budget():
    costs = [[1000, 1537, 2311], [1000, 1999, 3001], [1000, 1201, 2999]]
    losses = [[3.0, 1.0, 0.0], [5.0, 2.0, 0.5], [2.0, 1.5, 0.0]]
    for budget in range(3000, 9000, 331):
        picked = allocate(costs, losses, budget, resolution=8)  # units far coarser than the costs
        assert sum(c[j] for c, j in zip(costs, picked)) <= budget
        assert sum(x[j] for x, j in zip(losses, picked)) >= brute_force(costs, losses, budget) - 1e-12
    with pytest.raises(ConfigValueError, match="budget"):
        allocate(costs, losses, 2999)


def test_statistics_share_inputs_and_predict_the_kl_of_a_small_error():
    model = tiny_llama(0, hidden=64, intermediate=128, outliers=False)
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    stats = collect_statistics(model, names, tokens)
    assert stats[names[0]].hessian is stats[names[1]].hessian  # one input, one sum
    inputs = []
    down = model.get_submodule(names[2])
    handle = down.register_forward_hook(lambda m, a, o: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        reference = [torch.log_softmax(model(input_ids=t[None]).logits[0], -1) for t in tokens]
    handle.remove()
    x = torch.cat(inputs)
    torch.testing.assert_close(stats[names[2]].hessian, x.T @ x / x.shape[0])
    noise = torch.randn(down.weight.shape, generator=torch.Generator().manual_seed(2))
    error = 0.05 * down.weight.detach().abs().mean() * noise
    rows = ((error @ stats[names[2]].hessian) * error).sum(1)
    predicted = float(0.5 * rows @ stats[names[2]].fisher)
    with torch.no_grad():
        down.weight += error
        logprobs = [torch.log_softmax(model(input_ids=t[None]).logits[0], -1) for t in tokens]
    kl = torch.stack([(ref.exp() * (ref - lp)).sum(-1) for ref, lp in zip(reference, logprobs)]).mean()
    assert 0.5 < predicted / float(kl) < 2.0


def test_gguf_mix_fits_the_estimator_round_trips_and_reruns():
    model = tiny_llama(0, hidden=64, intermediate=256, layers=1, outliers=False)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    sensitivity = measure_sensitivity(model, preset("gguf"), tokens)
    low, high = sensitivity.bits_range()
    target = round((low + high) / 2, 2)
    config = choose_mixed_precision(model, "gguf", target, calibration=tokens)
    estimated = estimate(config=config, model_config=model.config.to_dict()).bits_per_param
    assert target - 0.5 < estimated <= target
    assert config_from_dict(json.loads(config.to_json_string())) == config
    choice = sensitivity.allocate(target)
    assert sensitivity.config_for(choice) == config  # what the API returns is the allocation
    assert len({s["quant_type"] for s in choice.values()}) > 1  # a real mix
    quantized = quantize(copy.deepcopy(model), config_from_dict(json.loads(config.to_json_string())))
    for name, setting in choice.items():
        module = quantized.get_submodule(name)
        assert isinstance(module, GGUFLinear) and module.qtype == setting["quant_type"]
    embedding = quantized.get_input_embeddings()
    assert isinstance(embedding, GGUFEmbedding) and embedding.qtype == "Q8_0"  # as the Q4_K_M mix stores it
    uniform = [
        sum(layer.losses[layer.settings.index({"quant_type": t})] for layer in sensitivity.layers)
        for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
        if sensitivity.totals({layer.name: {"quant_type": t} for layer in sensitivity.layers})[0] <= target
    ]
    assert uniform and sensitivity.totals(choice)[1] <= min(uniform)


def test_rtn_mix_sets_bits_and_group_sizes_per_linear():
    model = tiny_llama(0, hidden=64, intermediate=128, layers=1, outliers=False)
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    config = choose_mixed_precision(model, {"quant_method": "rtn", "sym": True}, 3.5, calibration=tokens)
    assert config.sym is True and config.module_overrides
    assert estimate(config=config, model_config=model.config.to_dict()).bits_per_param <= 3.5
    quantized = quantize(copy.deepcopy(model), config)
    bits = {m.bits for m in quantized.modules() if isinstance(m, GPTQLinear)}
    assert len(bits) > 1


def test_bad_method_and_target_name_what_is_allowed():
    model = tiny_llama(0, hidden=64, intermediate=128, layers=1, outliers=False)
    tokens = torch.randint(0, 256, (2, 32))
    with pytest.raises(ConfigValueError, match="method='bitsandbytes'.*gguf, gptq, rtn"):
        choose_mixed_precision(model, "nf4", 4.0, calibration=tokens)
    with pytest.raises(ConfigValueError, match=r"target_bits=1.0 is invalid; allowed: 4\.\d+ to 8\.\d+ stored bits"):
        choose_mixed_precision(model, "gguf", 1.0, calibration=tokens)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with the embedded model's tokenizer."""
    from transformers import AutoTokenizer

    from quantkit.models import default_model_folder

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(0, hidden=64, intermediate=256, layers=1, vocab=49152, outliers=False).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_folder()).save_pretrained(folder)
    return folder


def test_cli_target_bits_writes_a_config_that_reruns(capsys, tmp_path, tiny_model_dir):
    code = main(["quantize", "--model", str(tiny_model_dir), "--method", "nf4", "--target-bits", "4", "--out", "x"])
    assert code == 2 and "gguf, gptq, rtn" in capsys.readouterr().err
    code = main(["quantize", "--model", str(tiny_model_dir), "--method", "gguf", "--target-bits", "3", "--out", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "target_bits=3.0 is invalid; allowed:" in err and "stored bits per parameter" in err
    first, chosen = tmp_path / "first", tmp_path / "chosen.json"
    argv = ["quantize", "--model", str(tiny_model_dir), "--method", "gguf", "--target-bits", "5.2"]
    assert main([*argv, "--config-out", str(chosen), "--out", str(first)]) == 0
    assert str(chosen) in capsys.readouterr().err
    config = config_from_dict(json.loads(chosen.read_text()))
    assert config.module_overrides and estimate(config=config, model_config=tiny_model_dir).bits_per_param <= 5.2
    second = tmp_path / "second"
    assert main(["quantize", "--model", str(tiny_model_dir), "--config", str(chosen), "--out", str(second)]) == 0
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_cli_target_bits_is_refused_under_torchrun(capsys, monkeypatch, tiny_model_dir):
    monkeypatch.setattr(quantize_command, "session", lambda: Distributed(rank=0, world=2))
    code = main(["quantize", "--model", str(tiny_model_dir), "--method", "gguf", "--target-bits", "5", "--out", "x"])
    assert code == 2 and "--target-bits" in (err := capsys.readouterr().err) and "one process" in err


@pytest.fixture(scope="module")
def smollm2_one_layer():
    """SmolLM2-135M cut to its first decoder layer (real weights and widths: 576, 1536, the 49k
    vocabulary), 1 x 256 calibration tokens and 256 evaluation tokens: the benchmark's setting made cheap."""
    model, tokenizer = load_model()
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    calibration = calibration_tokens(tokenizer, nsamples=1, seqlen=256)
    return model, calibration, evaluation_tokens(tokenizer, max_tokens=256)


@pytest.mark.slow
def test_rtn_mix_beats_uniform_rtn_of_no_more_bits_on_smollm2(smollm2_one_layer, tmp_path):
    """The benchmark's claim on a setting that fits a test: RTN on the 7 linears of SmolLM2's first
    layer, the automatic mix against uniform RTN 3-bit g64 and 4-bit g128 of no more bits (3-bit g128
    has more KL than 3-bit g64 on every measurement: never the rival to beat)."""
    model, calibration, evaluation = smollm2_one_layer
    reference = tmp_path / "reference.npy"
    evaluate(model, evaluation, seqlen=256, write_reference=reference)
    sensitivity = measure_sensitivity(model, preset("rtn"), calibration)

    def stored_bits_and_kl(config):
        bits = estimate(config=config, model_config=model.config.to_dict()).bits_per_param
        quantized = quantize(copy.deepcopy(model), config)
        return bits, evaluate(quantized, evaluation, seqlen=256, reference=reference).kl_divergence

    settings = ((3, 64), (4, 128))
    uniform = [stored_bits_and_kl(preset("rtn", {"bits": b, "group_size": g})) for b, g in settings]
    for target in (3.5, uniform[-1][0]):  # 4-bit g128 stores 4.214 bits per parameter
        bits, kl = stored_bits_and_kl(sensitivity.config_for(sensitivity.allocate(target)))
        rivals = [rival_kl for rival_bits, rival_kl in uniform if rival_bits <= bits]
        assert bits <= target and rivals and kl < min(rivals), (target, bits, kl, uniform)
