"""quantkit recommend: the decision tree over declared capabilities and measured results."""

from __future__ import annotations

import json

import pytest

from quantkit import (
    AQLMConfig,
    AWQConfig,
    Backend,
    BnbConfig,
    Capabilities,
    EETQConfig,
    GGUFConfig,
    GPTQConfig,
    Hardware,
    HQQConfig,
    RTNConfig,
)
from quantkit.builtin_backends.eetq.qlinear import EetqLinear
from quantkit.compare import Result, load_results, recommend
from quantkit.core.capabilities import Availability
from quantkit.core.errors import ConfigValueError, ModelFormatError

GPU = frozenset({Hardware.CUDA, Hardware.ROCM})
EVERYWHERE = frozenset(Hardware)


def fake_backend(
    name,
    config_class,
    bits_per_weight,
    *,
    hardware=EVERYWHERE,
    trainable=False,
    calibration=False,
    available=True,
    quality_floor_bits=3.0,
    layer_classes=(),
):
    """A backend that only declares: what the recommender reads."""

    class Fake(Backend):
        capabilities = Capabilities(
            quantize_hardware=hardware,
            inference_hardware=hardware,
            requires_calibration=calibration,
            serializable=True,
            trainable=trainable,
            quality_floor_bits=quality_floor_bits,
        )

        def is_available(self):
            return Availability(available, "" if available else f"{name} is not installed")

        def storage_bits(self, config, module, out_features, in_features):
            per_weight = bits_per_weight(config) if callable(bits_per_weight) else bits_per_weight
            return round(per_weight * out_features * in_features)

        def quantize(self, model, config, *, calibration, device):
            raise AssertionError("the recommender never quantizes")

    Fake.name = name
    Fake.config_class = config_class
    Fake.layer_classes = layer_classes
    return Fake()


def bnb_bits(config):
    if config.load_in_8bit:
        return 8.01
    return 4.127 if config.use_double_quant else 4.5


def gguf_bits(config):
    return {"Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.5, "Q4_K_M": 4.8, "Q4_0": 4.5, "Q3_K_M": 3.9, "Q2_K": 2.6}.get(
        config.quant_type, 16
    )


def every_backend(**overrides):
    backends = {
        "bitsandbytes": fake_backend(
            "bitsandbytes", BnbConfig, bnb_bits, hardware=GPU | {Hardware.CPU}, trainable=True
        ),
        "gptq": fake_backend("gptq", GPTQConfig, 4.16, calibration=True),
        "awq": fake_backend("awq", AWQConfig, 4.16, calibration=True),
        "hqq": fake_backend(
            "hqq", HQQConfig, lambda c: c.nbits + 32 / c.group_size, hardware=GPU | {Hardware.CPU}, trainable=True
        ),
        "gguf": fake_backend("gguf", GGUFConfig, gguf_bits),
        "rtn": fake_backend("rtn", RTNConfig, 4.25),
    }
    backends.update(overrides)
    return list(backends.values())


def test_fine_tuning_needs_a_trainable_backend_and_prefers_the_smallest_4bit_base():
    rec = recommend("cuda", "fine-tuning", backends=every_backend())
    assert rec.method == "nf4-dq"
    assert rec.config == {"quant_method": "bitsandbytes", "use_double_quant": True}
    assert any("trainable: bitsandbytes, hqq" in r for r in rec.reasons)
    assert "gptq-4bit-g128" not in rec.alternatives


def test_fine_tuning_on_mps_has_no_answer_and_says_why():
    rec = recommend("mps", "fine-tuning", backends=every_backend())
    assert rec.method is None
    assert any("trainable: (none)" in r for r in rec.reasons)
    assert rec.reasons[-1] == "no method satisfies these rules"


def test_unavailable_backends_are_named_with_their_reason_and_skipped():
    bnb = fake_backend("bitsandbytes", BnbConfig, bnb_bits, trainable=True, available=False)
    rec = recommend("cpu", "fine-tuning", backends=every_backend(bitsandbytes=bnb))
    assert rec.method == "hqq-4bit-g64"
    assert "unavailable here: bitsandbytes (bitsandbytes is not installed)" in rec.reasons[0]


def test_inference_without_measurements_prefers_calibrated_methods():
    rec = recommend("cpu", "inference", backends=every_backend())
    assert rec.method in ("gptq-4bit-g128", "awq-4bit-g128")
    assert any("calibrated methods (awq, gptq)" in r for r in rec.reasons)
    rec = recommend(
        "cpu",
        "inference",
        backends=every_backend(
            gptq=fake_backend("gptq", GPTQConfig, 4.16, calibration=True, hardware=GPU),
            awq=fake_backend("awq", AWQConfig, 4.16, calibration=True, hardware=GPU),
        ),
    )
    assert rec.method == "nf4-dq"  # no calibrated backend runs on the CPU: the smallest 4-bit format


def test_smallest_keeps_a_floor_of_bits_without_measurements():
    rec = recommend("cpu", "smallest", backends=every_backend())
    assert rec.method == "gguf-q3_k_m"
    assert recommend("cpu", "smallest", backends=every_backend(), min_bits=2).method == "gguf-q2_k"


def test_smallest_goes_down_to_a_backends_declared_quality_floor():
    aqlm = fake_backend("aqlm", AQLMConfig, lambda c: c.num_codebooks * c.nbits_per_codebook / 8, calibration=True)
    assert recommend("cpu", "smallest", backends=every_backend(aqlm=aqlm)).method == "gguf-q3_k_m"
    aqlm = fake_backend(
        "aqlm", AQLMConfig, lambda c: c.num_codebooks * c.nbits_per_codebook / 8, calibration=True, quality_floor_bits=2
    )
    rec = recommend("cpu", "smallest", backends=every_backend(aqlm=aqlm))
    assert rec.method.startswith("aqlm-") and rec.config["quant_method"] == "aqlm"
    assert any("lower: aqlm 2" in reason for reason in rec.reasons)
    assert recommend("cpu", "smallest", backends=every_backend(aqlm=aqlm), min_bits=3).method == "gguf-q3_k_m"


def result(method, config, ppl, bits, decode, *, kl=None, device="cpu", nominal=4.0, dtype="float32"):
    return Result(
        method,
        status="ok",
        config=config,
        perplexity=ppl,
        bits_per_param=bits,
        decode_tokens_per_s=decode,
        kl_divergence=kl,
        nominal_bits=nominal,
        dtype=dtype,
        protocol={"device": device},
    )


RESULTS = [
    result("fp32", None, 10.0, 32.0, 40.0, kl=0.0, nominal=32.0),
    result(
        "int8",
        {"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True},
        10.03,
        8.2,
        8.0,
        kl=0.001,
        nominal=8.0,
    ),
    result("nf4", {"quant_method": "bitsandbytes", "quant_type": "nf4"}, 10.9, 4.55, 12.0, kl=0.06),
    result("gptq-4bit-g128", {"quant_method": "gptq", "bits": 4, "group_size": 128}, 10.5, 4.16, 20.0, kl=0.04),
    result("rtn-4bit-g128", {"quant_method": "rtn", "bits": 4, "group_size": 128}, 12.9, 4.38, 25.0, kl=0.2),
    result("gguf-q2_k", {"quant_method": "gguf", "quant_type": "Q2_K"}, 40.0, 2.9, 30.0, kl=1.5, nominal=2.0),
    Result(
        "awq-4bit-g128",
        status="unavailable",
        reason="awq: group_size 128 does not divide 576",
        config={"quant_method": "awq"},
    ),
]


def test_inference_with_measurements_picks_the_lowest_kl_4bit_method():
    rec = recommend("cpu", "inference", results=RESULTS, backends=every_backend())
    assert rec.method == "gptq-4bit-g128" and rec.alternatives == ["nf4", "rtn-4bit-g128"]
    assert any("not measured: awq-4bit-g128" in r for r in rec.reasons)
    assert any("lowest KL divergence" in r for r in rec.reasons)


def test_smallest_with_measurements_respects_the_quality_guard():
    rec = recommend("cpu", "smallest", results=RESULTS, backends=every_backend())
    assert rec.method == "gptq-4bit-g128"  # gguf-q2_k is smaller but 300% worse
    assert any("dropped gguf-q2_k, rtn-4bit-g128" in r for r in rec.reasons)
    loose = recommend("cpu", "smallest", results=RESULTS, backends=every_backend(), max_ppl_increase=500)
    assert loose.method == "gguf-q2_k"


def test_fastest_with_measurements_may_be_the_float_model():
    rec = recommend("cpu", "fastest", results=RESULTS, backends=every_backend())
    assert rec.method == "fp32"
    assert rec.alternatives == ["gptq-4bit-g128", "nf4", "int8"]


def test_fastest_ignores_speeds_measured_on_other_hardware():
    rec = recommend("cuda", "fastest", results=RESULTS, backends=every_backend())
    assert any("measured on cpu, not cuda" in r for r in rec.reasons)
    assert rec.method == "gptq-4bit-g128"  # fewest stored bits at >= 4 bits among the measured


def test_goal_and_hardware_are_validated_and_results_files_read(tmp_path):
    with pytest.raises(ConfigValueError, match="goal"):
        recommend("cpu", "cheapest", backends=every_backend())
    with pytest.raises(ValueError):
        recommend("tpu", "inference", backends=every_backend())
    path = tmp_path / "results.json"
    path.write_text(json.dumps([r.to_dict() for r in RESULTS]))
    assert load_results(path) == RESULTS
    path.write_text('{"not": "a list"}')
    with pytest.raises(ModelFormatError):
        load_results(path)


def test_cli_prints_one_line_per_rule(capsys):
    from quantkit.cli.main import main

    assert main(["recommend", "--hardware", "cpu", "--goal", "fine-tuning", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["goal"] == "fine-tuning" and data["method"] and len(data["reasons"]) >= 3


def test_accurate_prefers_an_8bit_method_with_a_fused_kernel_on_the_hardware():
    eetq = fake_backend("eetq", EETQConfig, 8.02, layer_classes=(EetqLinear,))
    for hardware, kernel in (("cuda", "eetq"), ("cpu", "int8-cpu")):
        rec = recommend(hardware, "accurate", backends=every_backend(eetq=eetq))
        assert rec.method == "eetq-int8"
        assert any(f"eetq ({kernel})" in reason for reason in rec.reasons), rec.reasons
    # without declared layers nothing is known of its kernels: the fewest stored bits wins
    plain = fake_backend("eetq", EETQConfig, 8.02)
    assert recommend("cuda", "accurate", backends=every_backend(eetq=plain)).method == "int8"
