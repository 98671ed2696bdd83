"""The memory estimator: exact layouts and the seed table."""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama

import quantkit
from quantkit.cli.main import main
from quantkit.core.errors import ModelFormatError
from quantkit.core.registry import get_registry
from quantkit.estimate import REFERENCE_RATES, estimate, estimate_quantization, parse_params, stored_model

ESTIMATE_MODULE = importlib.import_module("quantkit.estimate")  # the package exports a function of that name


@pytest.mark.parametrize(
    ("config", "bits"),
    [
        (quantkit.BnbConfig(quant_type="nf4"), 4.5),
        (quantkit.BnbConfig(quant_type="nf4", use_double_quant=True), 4 + 8 / 64 + 32 / (64 * 256)),
        (quantkit.GPTQConfig(bits=4, group_size=128), 4 + (16 + 4) / 128 + 32 / 4096),
        (quantkit.AWQConfig(bits=4, group_size=128), 4 + (16 + 4) / 128),
        (quantkit.BnbConfig(load_in_4bit=False, load_in_8bit=True), 8 + 32 / 4096),
    ],
)
def test_bits_per_param_from_layouts(config, bits):
    assert estimate("7B", config).bits_per_param == pytest.approx(bits, abs=2e-3)


@pytest.mark.parametrize(("size", "fp16_gb"), [("7B", 14.0), ("13B", 26.0), ("70B", 140.0)])
def test_seed_table(size, fp16_gb):
    assert estimate(size, None, dtype="float32").total_bytes / 1e9 == pytest.approx(2 * fp16_gb)
    assert estimate(size, None, dtype="float16").total_bytes / 1e9 == pytest.approx(fp16_gb)
    nf4 = estimate(size, quantkit.BnbConfig()).total_bytes / 1e9
    assert nf4 == pytest.approx(fp16_gb / 4 * 4.5 / 4, rel=1e-3)  # not the rounded fp16/4


def test_parse_params():
    assert parse_params("7B") == 7_000_000_000
    assert parse_params("135m") == 135_000_000
    assert parse_params("1.5e9") == 1_500_000_000
    with pytest.raises(quantkit.ConfigValueError, match="params"):
        parse_params("seven")


def test_model_config_counts_real_shapes(tiny_llama):
    raw = tiny_llama.config.to_dict()
    float_estimate = estimate(config=None, model_config=raw, dtype="float32")
    assert float_estimate.params == sum(p.numel() for p in tiny_llama.parameters())
    assert float_estimate.total_bytes == float_estimate.params * 4
    rtn = estimate(config=quantkit.RTNConfig(bits=4, group_size=32), model_config=raw)
    linears = sum(
        m.weight.numel()
        for n, m in tiny_llama.named_modules()
        if isinstance(m, __import__("torch").nn.Linear) and n != "lm_head"
    )
    assert rtn.quantized_params == linears


@pytest.mark.parametrize(
    ("config", "bits"),
    [
        (quantkit.BnbConfig(), 4.0),
        (quantkit.BnbConfig(load_in_4bit=False, load_in_8bit=True), 8.0),
        (quantkit.GPTQConfig(bits=3), 3.0),
        (quantkit.AWQConfig(), 4.0),
        (quantkit.HQQConfig(nbits=2), 2.0),
        (quantkit.RTNConfig(bits=8), 8.0),
        (quantkit.GGUFConfig(quant_type="Q5_K_M"), 5.0),
        (quantkit.GGUFConfig(quant_type="BF16"), 16.0),
    ],
)
def test_code_bits_is_the_width_a_method_is_named_for(config, bits):
    assert config.code_bits == bits


def test_aqlm_code_bits_count_the_codebooks_a_layer_learns():
    """1x16's 2**16 x 8 float16 codebook outweighs the codes of a small layer: on SmolLM2 it is not a
    2-bit method, and the comparison's checks do not class it with them; on a 7B MLP it is ~2 bits."""
    aqlm = get_registry().backends["aqlm"]
    two_by_eight, one_by_sixteen = quantkit.as_config("aqlm-2x8"), quantkit.as_config("aqlm-1x16")
    assert aqlm.code_bits(two_by_eight, "", 1536, 576) == pytest.approx(2 + 2 * 256 * 8 * 16 / (1536 * 576))
    assert aqlm.code_bits(one_by_sixteen, "", 1536, 576) == pytest.approx(2 + 2**16 * 8 * 16 / (1536 * 576))
    assert round(aqlm.code_bits(one_by_sixteen, "", 14336, 4096)) == 2


def test_code_bits_follow_ggufs_row_fallbacks(tiny_llama):
    gguf = get_registry().backends_for_method("gguf")[0]
    q2k = quantkit.GGUFConfig(quant_type="Q2_K")
    assert gguf.code_bits(q2k, "", 64, 512) == 2.0  # 256-weight super-blocks divide the row
    assert gguf.code_bits(q2k, "", 64, 576) == 4.0  # SmolLM2's rows: llama.cpp stores Q4_0
    raw = {**tiny_llama.config.to_dict(), "hidden_size": 576, "intermediate_size": 1536}
    mixed = estimate(config=q2k, model_config=raw)
    assert 2.0 < mixed.code_bits < 4.0
    assert estimate(config=quantkit.BnbConfig(), model_config=raw).code_bits == 4.0


@pytest.mark.parametrize(
    "config",
    [
        quantkit.GGUFConfig(quant_type="Q8_0"),
        quantkit.GGUFConfig(quant_type="Q4_K_M"),
        quantkit.BnbConfig(),
        quantkit.GGUFConfig(quant_type="Q8_0", modules_to_not_convert=["lm_head", "model.embed_tokens"]),
    ],
    ids=["q8_0", "q4_k_m", "nf4", "q8_0-float-embedding"],
)
def test_total_size_is_what_the_saved_tensors_hold(tiny_llama, tmp_path, config):
    """Everything counts: GGUF also packs the token embedding (tied to the head), others keep it in float."""
    from safetensors import safe_open

    predicted = estimate(config=config, model_config=tiny_llama.config.to_dict(), dtype="float32").total_bytes
    quantkit.save(quantkit.quantize(tiny_llama, config, device="cpu"), tmp_path / "q")
    saved = 0
    for file in (tmp_path / "q").glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            saved += sum(f.get_tensor(k).nbytes for k in f.keys())  # noqa: SIM118 (not a dict)
    assert predicted == pytest.approx(saved, rel=0.01)


# -- time and peak memory of quantizing ---------------------------------------------------

SMOLLM2 = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
"""SmolLM2-135M's shapes (config.json), enough for every estimate without its weights."""


@pytest.mark.parametrize(
    ("config", "tflop"),
    [(quantkit.GPTQConfig(bits=4, group_size=128), 52.2), (quantkit.AWQConfig(group_size=64), 35.1)],
    ids=["gptq", "awq"],
)
def test_counted_flops_match_the_calibration_benchmark(config, tflop):
    """benchmarks/results/calibration_speed.txt counts 52.2 and 35.1 TFLOP for 128 x 512 tokens."""
    prediction = estimate_quantization(SMOLLM2, config, rates=REFERENCE_RATES)
    assert prediction.calibration == (128, 512)
    assert prediction.flops / 1e12 == pytest.approx(tflop, rel=0.01)


@pytest.mark.parametrize(
    ("config", "nsamples", "seconds", "rel"),
    [
        (quantkit.GPTQConfig(bits=4, group_size=128, mse=0.0), 16, 103.4, 0.1),
        (quantkit.GPTQConfig(bits=4, group_size=128, mse=0.0), 128, 634.5, 0.1),
        (quantkit.AWQConfig(group_size=64), 16, 110.6, 0.25),
        (quantkit.AWQConfig(group_size=64), 128, 377.4, 0.25),
    ],
)
def test_reference_rates_reproduce_the_measured_times(config, nsamples, seconds, rel):
    """The quiet 2-core CPU's times (README comparison at 16 samples, calibration benchmark at 128; GPTQ then
    searched no ranges)."""
    prediction = estimate_quantization(SMOLLM2, config, nsamples=nsamples, rates=REFERENCE_RATES)
    assert prediction.seconds == pytest.approx(seconds, rel=rel)


def test_peak_memory_counts_the_model_and_the_calibration_activations():
    small, large = (
        estimate_quantization(SMOLLM2, quantkit.GPTQConfig(), nsamples=n, rates=REFERENCE_RATES) for n in (16, 128)
    )
    model_bytes = 134_515_008 * 4
    assert 2 * model_bytes < small.peak_bytes < 2 * model_bytes + 2**30  # the weights GPTQ writes: twice
    assert large.peak_bytes - small.peak_bytes == 112 * 512 * 576 * 4  # hidden states of 112 more samples


def test_calibration_free_methods_are_priced_per_weight():
    rtn = estimate_quantization(SMOLLM2, quantkit.RTNConfig(), rates=REFERENCE_RATES)
    hqq = estimate_quantization(SMOLLM2, quantkit.HQQConfig(), rates=REFERENCE_RATES)
    assert rtn.calibration is None and rtn.flops == 0
    assert 0.6 < rtn.seconds < 2 and 5 < hqq.seconds < 16  # quantize() measured quiet: 0.94 s and 8.0 s


def test_quantize_announces_its_prediction(tiny_llama, caplog, capsys, monkeypatch):
    with caplog.at_level(logging.INFO, logger="quantkit"):
        quantkit.quantize(tiny_llama, quantkit.RTNConfig(group_size=32), device="cpu")
    assert any("rtn: predicted" in r.getMessage() for r in caplog.records)
    assert any("rtn: quantized in" in r.getMessage() for r in caplog.records)
    assert "quantkit:" not in capsys.readouterr().err  # short, and logging shows it


def test_a_long_quantization_prints_its_prediction_without_logging(monkeypatch, capsys):
    """Where logging is off (a plain Python session), a long job still says what it will take."""
    from conftest import make_tiny_llama

    monkeypatch.setattr(quantkit.api, "ANNOUNCE_SECONDS", 0.0)
    monkeypatch.delenv("QUANTKIT_QUIET")
    monkeypatch.setattr(logging.getLogger("quantkit"), "level", logging.WARNING)
    quantkit.quantize(make_tiny_llama(), quantkit.RTNConfig(group_size=32), device="cpu")
    err = capsys.readouterr().err
    assert "quantkit: rtn: predicted" in err and "peak memory" in err and "quantkit: rtn: quantized in" in err


def test_quantizing_a_quantized_model_says_what_to_do(tiny_llama):
    model = quantkit.quantize(tiny_llama, quantkit.RTNConfig(group_size=32), device="cpu")
    with pytest.raises(quantkit.QuantizationError, match="already quantized .rtn.; quantize the float model"):
        quantkit.quantize(model, "nf4")


@pytest.mark.parametrize(
    ("name", "message"),
    [("./no-such-folder", "does not exist"), ("no-such-org/no-such-model", "could not load .* from the model hub")],
)
def test_a_model_that_cannot_be_loaded_says_what_a_model_is(name, message):
    from quantkit.models import load_model

    with pytest.raises(quantkit.ModelFormatError, match=message) as info:
        load_model(name)
    assert "leave it out for the embedded SmolLM2-135M" in str(info.value)


def test_estimate_command_predicts_time_and_memory(tmp_path, capsys):
    from quantkit.cli.main import main

    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    argv = ["estimate", "--model-config", str(tmp_path), "--method", "gptq-4bit-g128", "--set", "nsamples=8"]
    assert main([*argv, "--time", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["seconds"] > 0 and row["peak_gib"] > 0.5
    assert main(["estimate", "--params", "7B", "--time"]) == 2
    assert "--model-config" in capsys.readouterr().err


def test_quantize_command_prints_the_prediction(tiny_llama, tmp_path, monkeypatch, caplog):
    from quantkit.cli import quantize as quantize_command
    from quantkit.cli.main import main

    monkeypatch.setattr(quantize_command, "load_model", lambda name: (tiny_llama, None))
    assert main(["quantize", "--method", "rtn", "--set", "group_size=32", "--out", str(tmp_path / "q")]) == 0
    assert any("rtn: predicted" in r.getMessage() for r in caplog.records)  # shown without --verbose
    assert logging.getLogger("quantkit").level == logging.NOTSET  # and the level is restored


def test_other_calibrated_methods_are_priced_by_the_work_their_backend_declares():
    from quantkit.builtin_backends.aqlm.aq import aq_flops, aq_scores, score_elements

    config = quantkit.AQLMConfig(nsamples=16)
    prediction = estimate_quantization(SMOLLM2, config, rates=REFERENCE_RATES)
    tokens = 16 * config.seqlen
    per_shape = {  # SmolLM2's quantized linears per layer: q, o (576 x 576), k, v (192 x 576), gate, up, down
        (576, 576): 2,
        (192, 576): 2,
        (1536, 576): 2,
        (576, 1536): 1,
    }
    flops = 30 * sum(n * sum(aq_flops(config, o, i, tokens).values()) for (o, i), n in per_shape.items())
    scores = {shape: aq_scores(config, *shape) for shape in per_shape}
    scoring = 30 * sum(n * (scores[s]["kmeans"] * 16 + scores[s]["beam_search"] * 16) for s, n in per_shape.items())
    elements = 30 * sum(n * score_elements() * sum(scores[s].values()) for s, n in per_shape.items())
    # codeword scoring (2 * 8 FLOPs a distance for 2x8's groups) is priced at its kernel's rate, the rest as matmuls
    assert prediction.parts["calibration"].flops == pytest.approx(flops - scoring)
    assert prediction.parts["calibration"].elements == pytest.approx(elements) and elements > 0


def test_a_hub_id_is_read_from_its_config_and_safetensors_headers(tmp_path, monkeypatch, capsys):
    """Only config.json and the headers' parameter counts are fetched (faked here: no hub offline)."""
    (tmp_path / "config.json").write_text(json.dumps({**SMOLLM2, "torch_dtype": "float32"}))
    fetched = []

    def download(repo, filename):
        fetched.append((repo, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(ESTIMATE_MODULE, "hf_hub_download", download)
    monkeypatch.setattr(
        ESTIMATE_MODULE,
        "get_safetensors_metadata",
        lambda repo: SimpleNamespace(parameter_count={"BF16": 134_515_008, "I64": 1}),
    )
    rtn = quantkit.RTNConfig(bits=4, group_size=64)
    local = estimate(None, rtn, model_config=tmp_path)
    assert local.quantized_bits / local.quantized_params < 5
    assert estimate(None, rtn, model_config="HuggingFaceTB/SmolLM2-135M") == local
    assert fetched[0] == ("HuggingFaceTB/SmolLM2-135M", "config.json")
    assert next(stored_model("HuggingFaceTB/SmolLM2-135M").parameters()).dtype == torch.bfloat16  # headers, not config
    rows = []
    for source in (str(tmp_path), "HuggingFaceTB/SmolLM2-135M"):
        assert main(["estimate", "--model-config", source, "--method", "rtn-4bit-g64", "--json"]) == 0
        rows.append(json.loads(capsys.readouterr().out))
    assert rows[0] == rows[1]

    def offline(repo, filename):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(ESTIMATE_MODULE, "hf_hub_download", offline)
    with pytest.raises(ModelFormatError, match=r"config.json of hub model 'org/absent' \(offline.*couldn't connect"):
        estimate(None, model_config="org/absent")
    with pytest.raises(ModelFormatError, match="neither a config.json, a model folder nor a hub id"):
        estimate(None, model_config=str(tmp_path / "missing" / "config.json"))


def test_a_streamed_run_reads_the_checkpoint_and_writes_the_output_once(tmp_path):
    model = make_tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    config = quantkit.RTNConfig(group_size=32)
    prediction = estimate_quantization(tmp_path, config, streaming=True, rates=REFERENCE_RATES)
    stored = sum(p.numel() * 2 for p in model.parameters())
    assert prediction.parts["read checkpoint"].read_bytes == stored
    written = quantkit.quantize_streaming(tmp_path, config, tmp_path / "out")
    on_disk = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    writes = ESTIMATE_MODULE.WRITES_PER_OUTPUT_BYTE
    # the files also hold their safetensors headers (~6 KB on this tiny model), which are not counted
    assert prediction.parts["write output"].write_bytes == pytest.approx(writes * on_disk, rel=0.1), written
    seconds = prediction.parts["read checkpoint"].seconds(REFERENCE_RATES)
    assert seconds == pytest.approx(stored / REFERENCE_RATES.read_bytes)
    assert "read checkpoint" not in estimate_quantization(tmp_path, config, rates=REFERENCE_RATES).parts
    # the run builds the architecture from config.json as the estimate did: the estimate's own time is counted
    built = prediction.parts["build the architecture"]
    assert built.wall > 0 and built.seconds(REFERENCE_RATES) == built.wall


def test_weights_past_the_caches_are_priced_at_their_own_rate():
    """hqq iterates over nine float32 copies of a weight: ~6x slower per weight once they leave the caches."""
    cached, uncached = ESTIMATE_MODULE.WEIGHT_ELEMENTS["hqq"]
    for hidden, per_weight in ((256, cached), (2048, uncached)):  # 1 MiB and 16-64 MiB float32 weights
        raw = {
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": 4 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64,
            "vocab_size": 256,
        }
        prediction = estimate_quantization(raw, quantkit.HQQConfig(), rates=REFERENCE_RATES)
        assert prediction.parts["quantize"].weight_elements == per_weight * 2 * 16 * hidden**2


def test_measured_disk_rates_are_positive(tmp_path):
    read, write = ESTIMATE_MODULE.measure_disk(tmp_path, size=4 << 20)
    assert read > 0 and write > 0 and list(tmp_path.iterdir()) == []


def test_the_disk_is_probed_only_for_a_streamed_run(monkeypatch):
    """An in-memory quantize reads and writes no checkpoint: its rates keep the reference disk."""
    probes = []
    monkeypatch.setattr(ESTIMATE_MODULE, "measure_disk", lambda: probes.append(1) or (2e9, 3e9))
    measure = ESTIMATE_MODULE.measure_rates.__wrapped__  # past the per-process cache
    in_memory = measure("cpu")
    assert probes == [] and (in_memory.read_bytes, in_memory.write_bytes) == (
        REFERENCE_RATES.read_bytes,
        REFERENCE_RATES.write_bytes,
    )
    streamed = measure("cpu", disk=True)
    assert probes == [1] and (streamed.read_bytes, streamed.write_bytes) == (2e9, 3e9)


def test_measured_rates_time_the_quantizer_itself(monkeypatch):
    """Rates measured on a device price a calibration-free method's weights at that method's own
    speed, timed on a weight of the shape holding most of the model's (here gate and up's, 256 x 64);
    reference rates and calibrated methods are not probed."""
    probes = []
    real = ESTIMATE_MODULE.measure_quantizer

    def measure_quantizer(backend, name, config, shape, dtype, device):
        probes.append((name, shape, dtype, device))
        return real(backend, name, config, shape, dtype, device)

    monkeypatch.setattr(ESTIMATE_MODULE, "measure_quantizer", measure_quantizer)
    model = make_tiny_llama(hidden=64, intermediate=256)
    config = quantkit.HQQConfig()
    measured = replace(REFERENCE_RATES, device="cpu")
    assert estimate_quantization(model, config, rates=REFERENCE_RATES).rates.weight_elements is None
    prediction = estimate_quantization(model, config, rates=measured)
    assert probes == [("model.layers.0.mlp.gate_proj", (256, 64), torch.float32, "cpu")]
    assert prediction.rates.weight_elements > 0
    quantize = prediction.parts["quantize"]
    assert quantize.seconds(prediction.rates) == pytest.approx(
        quantize.weight_elements / prediction.rates.weight_elements + quantize.ops * measured.op_seconds
    )
    estimate_quantization(model, quantkit.GPTQConfig(), nsamples=8, seqlen=64, rates=measured)
    # AQLM quantizes layer by layer from calibration inputs: it has no linear-at-a-time quantizer to time
    estimate_quantization(model, quantkit.AQLMConfig(), nsamples=8, seqlen=64, rates=measured)
    assert len(probes) == 1
