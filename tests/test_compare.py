"""quantkit compare: methods, protocol, storage measurement, resuming, reports and checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantkit.core.resolve import default_comparison
from quantkit.compare import (
    BASELINE,
    RESULT_KEYS,
    Comparison,
    Method,
    Protocol,
    is_done,
    method_from_name,
    methods_from_file,
    read_result,
    resolve_methods,
    stored_bytes,
    write_json_atomic,
)
from quantkit.builtin_backends.gptq.config import GPTQConfig
from quantkit.builtin_backends.rtn.config import RTNConfig
from quantkit.core.errors import ConfigValueError
from quantkit.report import pareto_front, plot, run_checks, summarize, to_csv, to_markdown

PROTOCOL = Protocol(model="tiny", eval_tokens=256, seqlen=64, stride=64, calibration_samples=4,
                    calibration_seqlen=32, threads=1)


# -- methods and protocol -----------------------------------------------------------------------


@pytest.mark.parametrize("name,bits", [
    ("fp32", 32), ("bf16", 16), ("nf4", 4), ("nf4-dq", 4), ("int8", 8), ("gptq-4bit-g128", 4),
    ("hqq-2bit-g16", 2), ("gguf-q4_k_m", 4), ("gguf-q8_0", 8), ("gguf-q2_k", 2), ("rtn-4bit-g128", 4),
])
def test_nominal_bits(name, bits):
    assert method_from_name(name, PROTOCOL).nominal_bits == bits


def test_default_list_starts_with_the_baseline_and_calibrates_by_the_protocol():
    methods = resolve_methods(None, PROTOCOL)
    assert [m.name for m in methods] == ["fp32", *default_comparison()]
    assert methods[0].name == BASELINE and methods[0].is_float
    gptq = next(m for m in methods if m.name == "gptq-4bit-g128").config
    assert (gptq.nsamples, gptq.seqlen, gptq.dataset) == (4, 32, "pydoc")
    assert {8.0, 4.0, 2.0} <= {m.nominal_bits for m in methods}  # the checks' three groups
    assert any(m.config and m.config.quant_method == "rtn" for m in methods)


def test_baseline_is_added_and_names_are_unique(tmp_path):
    assert [m.name for m in resolve_methods(["nf4"], PROTOCOL)] == ["fp32", "nf4"]
    assert [m.name for m in resolve_methods(["nf4", "fp32", "nf4"], PROTOCOL)] == ["fp32", "nf4"]
    (tmp_path / "m.json").write_text('[{"name": "nf4", "preset": "fp4"}]')
    with pytest.raises(ConfigValueError, match="unique"):
        resolve_methods(["nf4"], PROTOCOL, tmp_path / "m.json")
    assert [m.name for m in resolve_methods(["default", "bf16"], PROTOCOL)] == ["fp32", *default_comparison(), "bf16"]
    every = [m.name for m in resolve_methods(["all"], PROTOCOL)]
    assert every[:3] == ["fp32", "bf16", "fp16"] and {"gguf-q6_k", "hqq-2bit-g16"} <= set(every)
    with pytest.raises(Exception, match="unknown"):
        resolve_methods(["nf5"], PROTOCOL)


def test_config_file_entries(tmp_path):
    path = tmp_path / "methods.yaml"
    path.write_text(
        "- nf4\n"
        "- {name: gptq-3bit, quant_method: gptq, bits: 3, group_size: 64, nsamples: 16}\n"
        "- {name: rtn-g64, preset: rtn-4bit-g128, group_size: 64}\n"
        "- {name: bf16}\n"
    )
    methods = {m.name: m for m in methods_from_file(path, PROTOCOL)}
    assert methods["gptq-3bit"].config == GPTQConfig(bits=3, group_size=64, nsamples=16, seqlen=32, dataset="pydoc")
    assert methods["rtn-g64"].config == RTNConfig(bits=4, group_size=64, sym=True)
    assert methods["bf16"].is_float and methods["bf16"].dtype == "bfloat16"
    assert [m.name for m in resolve_methods(None, PROTOCOL, path)][0] == "fp32"
    path.write_text('{"methods": [{"bits": 4}]}')
    with pytest.raises(ConfigValueError, match="name"):
        methods_from_file(path, PROTOCOL)


def test_method_and_protocol_validation_and_keys():
    with pytest.raises(ConfigValueError):
        Method("bad name/..")
    with pytest.raises(ConfigValueError):
        Protocol(seqlen=64, stride=128)
    with pytest.raises(ConfigValueError):
        Protocol(eval_tokens=0)
    m = method_from_name("nf4", PROTOCOL)
    assert Method.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert m.key() != method_from_name("fp4", PROTOCOL).key()
    assert PROTOCOL.key() != Protocol(model="tiny", eval_tokens=512).key()


# -- measurement helpers ---------------------------------------------------------------------------


def test_stored_bytes_counts_the_tensors_of_quantized_modules_only(tmp_path):
    save_file({
        "model.q_proj.qweight": torch.zeros(8, 4, dtype=torch.int32),   # 128 bytes
        "model.q_proj.scales": torch.zeros(2, 8, dtype=torch.float16),  # 32 bytes
        "model.q_proj_extra.weight": torch.zeros(10, dtype=torch.float32),  # another module: 40 bytes
        "model.embed.weight": torch.zeros(16, 4, dtype=torch.float32),   # 256 bytes
    }, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    measured = stored_bytes(tmp_path, ["model.q_proj"])
    assert measured["quantized_bytes"] == 160
    assert measured["size_bytes"] == sum(p.stat().st_size for p in tmp_path.iterdir())


def test_write_json_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2, "p": Path("x")})
    assert read_result(path) == {"a": 2, "p": "x"}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert read_result(tmp_path / "missing.json") is None


def fake_result(method: Method, protocol: Protocol = PROTOCOL, **values) -> dict:
    return {"method": method.name, "status": "ok", "protocol_key": protocol.key(), "method_key": method.key(),
            "config": method.to_dict()["config"], "nominal_bits": method.nominal_bits, **values}


def test_is_done_needs_the_same_protocol_and_config():
    nf4 = method_from_name("nf4", PROTOCOL)
    result = fake_result(nf4)
    assert is_done(result, nf4, PROTOCOL)
    assert not is_done(result, method_from_name("fp4", PROTOCOL, label="nf4"), PROTOCOL)
    assert not is_done(result, nf4, Protocol(model="tiny", eval_tokens=512))
    assert not is_done({**result, "status": "failed"}, nf4, PROTOCOL)
    assert not is_done(None, nf4, PROTOCOL)


def test_unavailable_backend_is_reported_with_its_reason_without_running(tmp_path, monkeypatch):
    from quantkit.core.capabilities import Availability
    from quantkit.core.registry import get_registry

    backend = get_registry().backends_for_method("hqq")[0]
    monkeypatch.setattr(type(backend), "is_available", lambda self: Availability(False, "no hqq today"))
    methods = resolve_methods(["hqq-4bit-g64"], PROTOCOL)
    write_json_atomic(tmp_path / "results" / "fp32.json", fake_result(methods[0], perplexity=10.0))
    events = []
    comparison = Comparison(methods, PROTOCOL, tmp_path, on_event=events.append)
    results = comparison.run()
    assert [e.stage for e in events] == ["skipped", "unavailable"]  # the baseline was done; nothing ran
    row = results[1]
    assert row["status"] == "unavailable" and row["available"] is False and "no hqq today" in row["reason"]
    assert set(RESULT_KEYS) <= set(row)
    assert comparison.pending() == methods[1:]  # unavailable methods are retried on the next run


def test_comparison_needs_the_baseline_first(tmp_path):
    with pytest.raises(ConfigValueError, match="baseline"):
        Comparison([method_from_name("nf4", PROTOCOL)], PROTOCOL, tmp_path)


# -- report -------------------------------------------------------------------------------------


def rows(ppl: dict[str, float]) -> list[dict]:
    """Synthetic results: method -> perplexity, with matching metadata."""
    out = []
    for name, value in ppl.items():
        m = method_from_name(name, PROTOCOL)
        bits = {32: 32.0, 8: 8.2, 4: 4.5, 2: 2.6}[int(m.nominal_bits)]
        calibrated = m.config is not None and m.config.quant_method in ("gptq", "awq")
        out.append(fake_result(m, perplexity=value, bits_per_param=bits, estimated_bits_per_param=bits,
                               size_bytes=bits * 1e6, requires_calibration=calibrated, kl_divergence=0.0))
    return summarize(out)


def test_checks_pass_on_a_sound_comparison():
    results = rows({"fp32": 10.0, "int8": 10.05, "nf4": 11.0, "gptq-4bit-g128": 10.6, "rtn-4bit-g128": 11.5,
                    "gguf-q2_k": 30.0})
    checks = run_checks(results)
    assert [c.status for c in checks] == ["PASS"] * 4, [c.line() for c in checks]
    assert results[1]["delta_perplexity_pct"] == pytest.approx(0.5)


def test_checks_fail_where_the_results_say_so():
    results = rows({"fp32": 10.0, "int8": 10.2, "nf4": 9.0, "gptq-4bit-g128": 12.0, "rtn-4bit-g128": 11.5,
                    "gguf-q2_k": 30.0})
    results[2]["bits_per_param"] = 4.8  # nf4: 6.7% above its estimate
    status = {c.name.split()[0]: c for c in run_checks(results)}
    assert status["8-bit"].status == "FAIL" and "int8 +2.00% FAILED" in status["8-bit"].detail
    assert status["4-bit"].status == "FAIL" and "nf4" in status["4-bit"].detail
    calibrated = status["calibrated"]
    assert calibrated.status == "FAIL" and "gptq-4bit-g128 12.000 < rtn-4bit-g128" in calibrated.detail
    assert status["measured"].status == "FAIL" and "nf4 4.800 vs 4.500" in status["measured"].detail


def test_calibrated_methods_are_checked_against_rtn_on_the_same_grid():
    """A symmetric GPTQ grid is compared with symmetric RTN, not with the (finer) asymmetric one."""
    results = rows({"fp32": 10.0, "gptq-4bit-g128": 11.0, "rtn-4bit-g128": 11.5})
    asym = {**results[2], "method": "rtn-4bit-g128-asym", "perplexity": 10.8,
            "config": {**results[2]["config"], "sym": False}}
    calibrated = next(c for c in run_checks([*results, asym]) if c.name.startswith("calibrated"))
    assert calibrated.status == "PASS" and "rtn-4bit-g128-asym" not in calibrated.detail
    gptq_asym = {**results[1], "method": "gptq-4bit-g128-asym", "config": {**results[1]["config"], "sym": False}}
    calibrated = next(c for c in run_checks([*results, asym, gptq_asym]) if c.name.startswith("calibrated"))
    assert calibrated.status == "FAIL" and "gptq-4bit-g128-asym 11.000 < rtn-4bit-g128-asym 10.800" in calibrated.detail


def test_checks_skip_without_the_methods_they_compare():
    checks = run_checks(rows({"fp32": 10.0, "nf4": 11.0}))
    assert [c.status for c in checks] == ["SKIP", "SKIP", "SKIP", "PASS"]


def test_pareto_front():
    results = rows({"fp32": 10.0, "int8": 10.05, "nf4": 11.0, "gptq-4bit-g128": 10.6, "gguf-q2_k": 30.0})
    assert pareto_front(results) == ["gguf-q2_k", "gptq-4bit-g128", "int8", "fp32"]
    results[3]["bits_per_param"] = 4.6  # gptq now costs more bits than nf4: both are on the front
    assert pareto_front(results) == ["gguf-q2_k", "nf4", "gptq-4bit-g128", "int8", "fp32"]


def test_reports_list_every_method_including_unavailable_ones(tmp_path):
    results = rows({"fp32": 10.0, "nf4": 11.0})
    results.append({**fake_result(method_from_name("awq-4bit-g128", PROTOCOL)), "status": "unavailable",
                    "reason": "awq: group_size 128 does not divide 576", "perplexity": None})
    csv_text = to_csv(results)
    assert csv_text.splitlines()[0].split(",") == list(RESULT_KEYS)
    assert len(csv_text.splitlines()) == 4
    markdown = to_markdown(results, "the protocol", run_checks(results), wall_seconds=60, command="quantkit compare")
    assert "| awq-4bit-g128 |" in markdown and "does not divide 576" in markdown
    assert "PASS measured bits/param" in markdown and "Wall time of this invocation: 1.0 min" in markdown
    paths = plot(results, tmp_path)
    assert [p.name for p in paths] == ["perplexity_vs_bits.png", "perplexity_vs_size.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


# -- end to end (worker processes) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with the embedded model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quantkit.models import default_model_folder

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_folder()).save_pretrained(folder)
    return folder


def compare_command(model: Path, out: Path, methods: str) -> list[str]:
    return [sys.executable, "-m", "quantkit.cli.main", "compare", "--model", str(model), "--methods", methods,
            "--tokens", "256", "--seqlen", "64", "--decode-tokens", "4", "--threads", "1", "--out", str(out)]


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "QUANTKIT_QUIET": "1"}
    first = subprocess.Popen(compare_command(tiny_model_dir, out, "fp32,bf16"), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    baseline = out / "results" / "fp32.json"
    deadline = time.monotonic() + 300
    while not baseline.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # a crash: no cleanup at all
    first.wait()
    assert read_result(baseline)["status"] == "ok"
    finished = read_result(baseline)["worker_seconds"]
    time.sleep(3)  # the orphaned worker notices its parent is gone and stops
    assert not (out / "results" / "bf16.json").exists()

    second = subprocess.run(compare_command(tiny_model_dir, out, "fp32,bf16"), env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "fp32: skipped" in second.stderr and "bf16: done" in second.stderr  # skipped, then resumed
    assert read_result(baseline)["worker_seconds"] == finished
    bf16 = read_result(out / "results" / "bf16.json")
    assert bf16["status"] == "ok" and bf16["bits_per_param"] == 16.0
    assert bf16["kl_divergence"] is not None and bf16["top1_agreement"] > 0.9
    assert not list(out.glob("reference-*.npy"))  # the complete run removed the baseline's log-probs


@pytest.mark.slow
def test_compare_end_to_end_on_the_embedded_model(tmp_path):
    from quantkit.cli.main import main

    out, json_path = tmp_path / "out", tmp_path / "results.json"
    code = main(["compare", "--methods", "rtn-4bit-g128", "--tokens", "1024", "--seqlen", "256",
                 "--decode-tokens", "8", "--out", str(out), "--json", str(json_path)])
    assert code == 0
    base, rtn = json.loads(json_path.read_text())
    assert set(RESULT_KEYS) <= set(rtn)
    assert base["method"] == "fp32" and 5 < base["perplexity"] < 40
    assert base["bits_per_param"] == 32 and base["size_bytes"] == pytest.approx(base["estimated_size_bytes"], rel=0.01)
    assert rtn["status"] == "ok" and rtn["backend"] == "rtn"
    assert 1 < rtn["delta_perplexity_pct"] < 100  # 4-bit costs some perplexity, not all of it
    assert 0 < rtn["kl_divergence"] < 1 and 0.5 < rtn["top1_agreement"] < 1
    assert rtn["bits_per_param"] == pytest.approx(rtn["estimated_bits_per_param"], rel=0.01)
    assert rtn["size_bytes"] < base["size_bytes"] and rtn["peak_rss_bytes"] > rtn["size_bytes"]
    assert rtn["quantize_seconds"] > 0 and rtn["decode_tokens_per_s"] > 0 and rtn["prefill_tokens_per_s"] > 0
    for name in ("results.csv", "report.md", "perplexity_vs_bits.png", "perplexity_vs_size.png"):
        assert (out / name).is_file()


def test_checks_class_methods_by_their_stored_code_width():
    """A Q2_K mix stored mostly as Q4_0 fallbacks (code_bits 3.75) is judged with the 4-bit methods."""
    results = rows({"fp32": 10.0, "int8": 10.05, "nf4": 13.0, "gguf-q2_k": 12.0, "hqq-2bit-g16": 900.0})
    checks = {c.name.split()[0]: c for c in run_checks(results)}
    assert checks["4-bit"].status == "FAIL" and "nf4 13.000 in [10.050, 12.000] FAILED" in checks["4-bit"].detail
    results[3]["code_bits"] = 3.75
    checks = {c.name.split()[0]: c for c in run_checks(results)}
    assert checks["4-bit"].status == "PASS", checks["4-bit"].detail
    assert "gguf-q2_k 12.000 in [10.050, 900.000] ok" in checks["4-bit"].detail
