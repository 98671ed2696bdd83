"""quantkit compare: methods, protocol, the result record and its views, storage measurement,
resuming, repeated evaluation of methods that are not deterministic, reports and checks."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_llama
from rich.cells import cell_len
from rich.console import Console
from safetensors.torch import save_file

import quantkit
from quantkit.builtin_backends.gptq.config import GPTQConfig
from quantkit.builtin_backends.rtn.config import RTNConfig
from quantkit.compare import (
    BASELINE,
    Comparison,
    Group,
    Method,
    Protocol,
    Result,
    column,
    complete,
    is_done,
    load_results,
    method_from_name,
    methods_from_file,
    pareto_front,
    read_result,
    resolve_methods,
    run_checks,
    terminal_table,
    to_csv,
    to_markdown,
    worker,
    write_json_atomic,
)
from quantkit.compare.plots import plot
from quantkit.core.dispatch import chosen_kernels, set_kernel
from quantkit.core.errors import ConfigValueError, ModelFormatError
from quantkit.core.resolve import default_comparison
from quantkit.core.safetensors_files import stored_bytes

PROTOCOL = Protocol(
    model="tiny", eval_tokens=256, seqlen=64, stride=64, calibration_samples=4, calibration_seqlen=32, threads=1
)
COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
RESULT_KEYS = (
    "method",
    "config",
    "available",
    "status",
    "reason",
    "backend",
    "nominal_bits",
    "code_bits",
    "requires_calibration",
    "bits_per_param",
    "estimated_bits_per_param",
    "size_bytes",
    "estimated_size_bytes",
    "quantized_params",
    "quantized_bytes",
    "quantize_seconds",
    "peak_rss_bytes",
    "rss_before_quantize_bytes",
    "perplexity",
    "delta_perplexity",
    "delta_perplexity_pct",
    "kl_divergence",
    "top1_agreement",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "eval_seconds",
    "worker_seconds",
    "quantize_cpu_seconds",
    "cpu_seconds",
)
"""The CSV columns (and first JSON keys) of every result, as quantkit has always written them."""


# -- methods and protocol -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,bits",
    [
        ("fp32", 32),
        ("bf16", 16),
        ("nf4", 4),
        ("nf4-dq", 4),
        ("int8", 8),
        ("gptq-4bit-g128", 4),
        ("hqq-2bit-g16", 2),
        ("gguf-q4_k_m", 4),
        ("gguf-q8_0", 8),
        ("gguf-q2_k", 2),
        ("rtn-4bit-g128", 4),
    ],
)
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
    save_file(
        {
            "model.q_proj.qweight": torch.zeros(8, 4, dtype=torch.int32),  # 128 bytes
            "model.q_proj.scales": torch.zeros(2, 8, dtype=torch.float16),  # 32 bytes
            "model.q_proj_extra.weight": torch.zeros(10, dtype=torch.float32),  # another module: 40 bytes
            "model.embed.weight": torch.zeros(16, 4, dtype=torch.float32),  # 256 bytes
        },
        tmp_path / "model.safetensors",
    )
    (tmp_path / "config.json").write_text("{}")
    measured = stored_bytes(tmp_path, ["model.q_proj"])
    assert measured["quantized_bytes"] == 160
    assert measured["size_bytes"] == sum(p.stat().st_size for p in tmp_path.iterdir())


def test_write_json_atomic_replaces_whole_files(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"method": "a", "reason": 1})
    write_json_atomic(path, {"method": "b", "reason": Path("x")})
    assert read_result(path) == Result("b", reason="x")
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert read_result(tmp_path / "missing.json") is None
    write_json_atomic(path, {"method": "b", "not_a_field": 1})
    assert read_result(path) is None  # unreadable: the method is measured again


def fake_result(method: Method, protocol: Protocol = PROTOCOL, **values) -> Result:
    return Result.of(method, protocol, "ok", **values)


def test_is_done_needs_the_same_protocol_and_config():
    nf4 = method_from_name("nf4", PROTOCOL)
    result = fake_result(nf4)
    assert is_done(result, nf4, PROTOCOL)
    assert not is_done(result, method_from_name("fp4", PROTOCOL, label="nf4"), PROTOCOL)
    assert not is_done(result, nf4, Protocol(model="tiny", eval_tokens=512))
    assert not is_done(dataclasses.replace(result, status="failed"), nf4, PROTOCOL)
    assert not is_done(None, nf4, PROTOCOL)


def test_unavailable_backend_is_reported_with_its_reason_without_running(tmp_path, monkeypatch):
    from quantkit.core.capabilities import Availability
    from quantkit.core.registry import get_registry

    backend = get_registry().backends_for_method("hqq")[0]
    monkeypatch.setattr(type(backend), "is_available", lambda self: Availability(False, "no hqq today"))
    methods = resolve_methods(["hqq-4bit-g64"], PROTOCOL)
    write_json_atomic(tmp_path / "results" / "fp32.json", fake_result(methods[0], perplexity=10.0).to_dict())
    events = []
    comparison = Comparison(methods, PROTOCOL, tmp_path, on_event=events.append)
    results = comparison.run()
    assert [e.stage for e in events] == ["skipped", "unavailable"]  # the baseline was done; nothing ran
    row = results[1]
    assert row.status == "unavailable" and row.available is False and "no hqq today" in row.reason
    assert set(RESULT_KEYS) <= set(row.to_dict())
    assert comparison.pending() == methods[1:]  # unavailable methods are retried on the next run


def test_comparison_needs_the_baseline_first(tmp_path):
    with pytest.raises(ConfigValueError, match="baseline"):
        Comparison([method_from_name("nf4", PROTOCOL)], PROTOCOL, tmp_path)


# -- report -------------------------------------------------------------------------------------


def rows(ppl: dict[str, float]) -> list[Result]:
    """Synthetic results: method -> perplexity, with matching metadata, completed against the baseline."""
    out = []
    for name, value in ppl.items():
        m = method_from_name(name, PROTOCOL)
        bits = {32: 32.0, 8: 8.2, 4: 4.5, 2: 2.6}[int(m.nominal_bits)]
        calibrated = m.config is not None and m.config.quant_method in ("gptq", "awq")
        out.append(
            fake_result(
                m,
                perplexity=value,
                bits_per_param=bits,
                estimated_bits_per_param=bits,
                size_bytes=bits * 1e6,
                requires_calibration=calibrated,
                kl_divergence=0.0,
            )
        )
    return complete(out)


def test_checks_pass_on_a_sound_comparison():
    results = rows(
        {"fp32": 10.0, "int8": 10.05, "nf4": 11.0, "gptq-4bit-g128": 10.6, "rtn-4bit-g128": 11.5, "gguf-q2_k": 30.0}
    )
    checks = run_checks(results)
    assert [c.status for c in checks] == ["PASS"] * 4, [c.line() for c in checks]
    assert results[1].delta_perplexity_pct == pytest.approx(0.5)


def test_checks_fail_where_the_results_say_so():
    results = rows(
        {"fp32": 10.0, "int8": 10.2, "nf4": 9.0, "gptq-4bit-g128": 12.0, "rtn-4bit-g128": 11.5, "gguf-q2_k": 30.0}
    )
    results[2] = dataclasses.replace(results[2], bits_per_param=4.8)  # nf4: 6.7% above its estimate
    status = {c.name.split()[0]: c for c in run_checks(results)}
    assert status["8-bit"].status == "FAIL" and "int8 +2.00% FAILED" in status["8-bit"].detail
    assert status["4-bit"].status == "FAIL" and "nf4" in status["4-bit"].detail
    calibrated = status["calibrated"]
    assert calibrated.status == "FAIL" and "gptq-4bit-g128 12.000 < rtn-4bit-g128" in calibrated.detail
    assert status["measured"].status == "FAIL" and "nf4 4.800 vs 4.500" in status["measured"].detail


def test_calibrated_methods_are_checked_against_rtn_on_the_same_grid():
    """A symmetric GPTQ grid is compared with symmetric RTN, not with the (finer) asymmetric one."""
    results = rows({"fp32": 10.0, "gptq-4bit-g128": 11.0, "rtn-4bit-g128": 11.5})
    asym = dataclasses.replace(
        results[2], method="rtn-4bit-g128-asym", perplexity=10.8, config={**results[2].config, "sym": False}
    )
    calibrated = next(c for c in run_checks([*results, asym]) if c.name.startswith("calibrated"))
    assert calibrated.status == "PASS" and "rtn-4bit-g128-asym" not in calibrated.detail
    gptq_asym = dataclasses.replace(
        results[1], method="gptq-4bit-g128-asym", config={**results[1].config, "sym": False}
    )
    calibrated = next(c for c in run_checks([*results, asym, gptq_asym]) if c.name.startswith("calibrated"))
    assert calibrated.status == "FAIL" and "gptq-4bit-g128-asym 11.000 < rtn-4bit-g128-asym 10.800" in calibrated.detail


def test_checks_skip_without_the_methods_they_compare():
    checks = run_checks(rows({"fp32": 10.0, "nf4": 11.0}))
    assert [c.status for c in checks] == ["SKIP", "SKIP", "SKIP", "PASS"]


def test_pareto_front():
    results = rows({"fp32": 10.0, "int8": 10.05, "nf4": 11.0, "gptq-4bit-g128": 10.6, "gguf-q2_k": 30.0})
    assert pareto_front(results) == ["gguf-q2_k", "gptq-4bit-g128", "int8", "fp32"]
    results[3] = dataclasses.replace(results[3], bits_per_param=4.6)  # gptq costs more bits than nf4: both on the front
    assert pareto_front(results) == ["gguf-q2_k", "nf4", "gptq-4bit-g128", "int8", "fp32"]


def test_reports_list_every_method_including_unavailable_ones(tmp_path):
    results = rows({"fp32": 10.0, "nf4": 11.0})
    results.append(
        Result.of(
            method_from_name("awq-4bit-g128", PROTOCOL),
            PROTOCOL,
            "unavailable",
            "awq: group_size 128 does not divide 576",
        )
    )
    csv_text = to_csv(results)
    assert csv_text.splitlines()[0].split(",") == list(RESULT_KEYS)
    assert len(csv_text.splitlines()) == 4
    markdown = to_markdown(results, "the protocol", run_checks(results), wall_seconds=60, command="quantkit compare")
    assert "| awq-4bit-g128 |" in markdown and "does not divide 576" in markdown
    assert "PASS measured bits/param" in markdown and "Wall time of this invocation: 1.0 min" in markdown
    paths = plot(results, tmp_path)
    assert [p.name for p in paths] == ["perplexity_vs_bits.png", "perplexity_vs_size.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


# -- the record and its views ---------------------------------------------------------------------


@pytest.mark.parametrize("folder", [COMMITTED, COMMITTED / "g128_down_proj"], ids=["default", "g128"])
def test_committed_results_load_and_render_as_committed(folder):
    """Old results load; the JSON keeps every key, value and their order; the CSV and the report's
    table, Pareto front and checks come out as committed."""
    raw = json.loads((folder / "results.json").read_text())
    results = load_results(folder / "results.json")
    assert [list(r.to_dict().items()) for r in results] == [list(row.items()) for row in raw]
    assert complete(results) == results  # the deltas written are the record's own
    assert to_csv(results) == (folder / "results.csv").read_text()
    kept = ("|", "- ", "Pareto front")
    ours = [line for line in to_markdown(results, "-", run_checks(results)).splitlines() if line.startswith(kept)]
    assert ours == [line for line in (folder / "report.md").read_text().splitlines() if line.startswith(kept)]


def test_results_files_name_what_they_cannot_read(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('[{"method": "nf4", "perplexity_p99": 1.0}]')
    with pytest.raises(ModelFormatError, match="perplexity_p99"):
        load_results(path)


@dataclass(frozen=True)
class WithEnergy(Result):
    """One more metric: its field and column are the whole declaration."""

    energy_joules: float | None = column(
        label="energy J", fmt="{:.1f}", group=Group.COST, short="J", terminal=2, markdown=True, csv=True
    )


def test_a_metric_declared_on_the_record_reaches_every_view():
    results = [
        WithEnergy(**dataclasses.asdict(r), energy_joules=joules)
        for r, joules in zip(rows({"fp32": 10.0, "nf4": 11.0}), (12.5, 3.5))
    ]
    data = results[1].to_dict()
    assert data["energy_joules"] == 3.5 and WithEnergy.from_dict(json.loads(json.dumps(data))) == results[1]
    header, _, nf4 = to_csv(results).splitlines()
    assert header.split(",") == [*RESULT_KEYS, "energy_joules"] and nf4.endswith(",3.5")
    markdown = to_markdown(results, "-", run_checks(results))
    assert "| quantize s | peak RSS MB | energy J | status |" in markdown and " | 3.5 | ok |" in markdown
    console = Console(width=200, file=io.StringIO(), color_system=None)
    console.print(terminal_table(results, width=200))
    text = console.file.getvalue()
    assert text.splitlines()[1].split()[-1] == "J" and "J = energy J" in text and "12.5" in text


def test_the_terminal_table_fits_80_columns_and_names_what_it_leaves_out():
    results = load_results(COMMITTED / "results.json")  # 22 methods, one failed with a long reason
    for width in (80, 100, 200):
        console = Console(width=width, file=io.StringIO(), color_system=None)
        console.print(terminal_table(results, width=width, title="quantkit compare (0.2 min)"))
        lines = console.file.getvalue().splitlines()
        assert max(map(cell_len, lines)) <= width
        for r in results:  # one line per method, its perplexity in it
            assert any(
                line.startswith(f"{r.method} ") and (r.perplexity is None or f"{r.perplexity:.5g}" in line)
                for line in lines
            ), (width, r.method)
        text = "\n".join(lines)
        assert "bits = bits/param" in text and "awq-4bit-g128: failed: ShapeLimitError" in text
        assert ("left out at this width: quantize s, peak RSS MB" in text) == (width == 80)


# -- methods that are not deterministic ------------------------------------------------------------


def test_backends_declare_what_reproduces_and_only_the_others_are_evaluated_repeatedly():
    pytest.importorskip("bitsandbytes")
    assert method_from_name("int8", PROTOCOL).evaluations == PROTOCOL.repeats == 3  # LLM.int8 on the CPU
    assert method_from_name("nf4", PROTOCOL).evaluations is None
    assert method_from_name("fp32", PROTOCOL).evaluations is None
    assert method_from_name("int8", dataclasses.replace(PROTOCOL, repeats=5)).evaluations == 5
    committed = {r.method: r for r in load_results(COMMITTED / "results.json")}
    default = Protocol()  # what the committed results were measured under
    assert default.key() == dataclasses.replace(default, repeats=5).key() == committed["nf4"].protocol_key
    assert method_from_name("nf4", default).key() == committed["nf4"].method_key  # resumes as before
    assert method_from_name("int8", default).key() == committed["int8"].method_key  # measured with its repeats


def test_a_method_that_is_not_deterministic_is_evaluated_repeatedly_and_keeps_its_spread(tmp_path, monkeypatch):
    """Noise on the logits stands in for LLM.int8's CPU matmul: the model is loaded and prepared
    once, evaluated three times; the result is the median evaluation, the spread next to it."""
    from transformers import AutoTokenizer

    from quantkit.compare.report import reproducibility
    from quantkit.models import default_model_folder

    tokenizer = AutoTokenizer.from_pretrained(default_model_folder())
    loads = []

    def noisy_model(name):
        loads.append(name)
        model = make_tiny_llama(vocab=49152)
        model.lm_head.register_forward_hook(lambda module, args, out: out + 0.5 * torch.randn_like(out))
        return model, tokenizer

    monkeypatch.setattr(worker, "load_model", noisy_model)
    protocol = dataclasses.replace(PROTOCOL, eval_tokens=128, seqlen=32, stride=32, decode_tokens=2, prompt_tokens=8)
    job = {
        "protocol": protocol.to_dict(),
        "reference": str(tmp_path / "reference.npy"),
        "write_reference": False,
        "models": None,
        "scratch": str(tmp_path),
    }
    events = []

    def report(stage, done=0, total=0, **_):
        events.append((stage, done, total))

    once = worker.measure({**job, "method": Method("fp32").to_dict()}, report)
    assert once.evaluations is None and not {"evaluations", "perplexity_min", "perplexity_max"} & set(once.to_dict())
    events.clear()
    noisy = Method("noisy", evaluations=3)
    repeated = worker.measure({**job, "method": noisy.to_dict()}, report)
    assert len(loads) == 2  # one load (and preparation) per method, not per evaluation
    assert repeated.evaluations == 3 and repeated.method_key == noisy.key()
    assert repeated.perplexity_min < repeated.perplexity < repeated.perplexity_max
    assert [e for e in events if e[0] == "evaluate"][-1] == ("evaluate", 12, 12)  # 3 passes of 4 windows
    assert {"evaluations", "perplexity_min", "perplexity_max"} <= set(repeated.to_dict())
    assert Result.from_dict(json.loads(json.dumps(repeated.to_dict()))) == repeated
    text = reproducibility([once, repeated])
    low, high = repeated.perplexity_min, repeated.perplexity_max
    spread = f"noisy (None) perplexity {low:.5g} to {high:.5g} over 3 evaluations"
    assert spread in text and "Every other method gives the same perplexity" in text


# -- end to end (worker processes) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama saved with the embedded model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from quantkit.models import default_model_folder

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(default_model_folder()).save_pretrained(folder)
    return folder


def compare_command(model: Path, out: Path, methods: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "quantkit.cli.main",
        "compare",
        "--model",
        str(model),
        "--methods",
        methods,
        "--tokens",
        "256",
        "--seqlen",
        "64",
        "--decode-tokens",
        "4",
        "--threads",
        "1",
        "--out",
        str(out),
    ]


@pytest.mark.slow
def test_a_killed_run_resumes_where_it_stopped(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "QUANTKIT_QUIET": "1"}
    first = subprocess.Popen(
        compare_command(tiny_model_dir, out, "fp32,bf16"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    baseline = out / "results" / "fp32.json"
    deadline = time.monotonic() + 300
    while not baseline.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)  # a crash: no cleanup at all
    first.wait()
    assert read_result(baseline).status == "ok"
    finished = read_result(baseline).worker_seconds
    time.sleep(3)  # the orphaned worker notices its parent is gone and stops
    assert not (out / "results" / "bf16.json").exists()

    second = subprocess.run(
        compare_command(tiny_model_dir, out, "fp32,bf16"), env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr
    assert "fp32: skipped" in second.stderr and "bf16: done" in second.stderr  # skipped, then resumed
    assert read_result(baseline).worker_seconds == finished
    bf16 = read_result(out / "results" / "bf16.json")
    assert bf16.status == "ok" and bf16.bits_per_param == 16.0
    assert bf16.kl_divergence is not None and bf16.top1_agreement > 0.9
    assert not list(out.glob("reference-*.npy"))  # the complete run removed the baseline's log-probs


@pytest.mark.slow
def test_compare_end_to_end_on_the_embedded_model(tmp_path):
    from quantkit.cli.main import main

    out, json_path = tmp_path / "out", tmp_path / "results.json"
    code = main(
        [
            "compare",
            "--methods",
            "rtn-4bit-g128",
            "--tokens",
            "1024",
            "--seqlen",
            "256",
            "--decode-tokens",
            "8",
            "--out",
            str(out),
            "--json",
            str(json_path),
        ]
    )
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
    assert rtn["kernels"] == "int4-cpu x210" and "kernels" not in base  # g128's ragged last group padded
    for name in ("results.csv", "report.md", "perplexity_vs_bits.png", "perplexity_vs_size.png"):
        assert (out / name).is_file()


def test_checks_class_methods_by_their_stored_code_width():
    """A Q2_K mix stored mostly as Q4_0 fallbacks (code_bits 3.75) is judged with the 4-bit methods."""
    results = rows({"fp32": 10.0, "int8": 10.05, "nf4": 13.0, "gguf-q2_k": 12.0, "hqq-2bit-g16": 900.0})
    checks = {c.name.split()[0]: c for c in run_checks(results)}
    assert checks["4-bit"].status == "FAIL" and "nf4 13.000 in [10.050, 12.000] FAILED" in checks["4-bit"].detail
    results[3] = dataclasses.replace(results[3], code_bits=3.75)
    checks = {c.name.split()[0]: c for c in run_checks(results)}
    assert checks["4-bit"].status == "PASS", checks["4-bit"].detail
    assert "gguf-q2_k 12.000 in [10.050, 900.000] ok" in checks["4-bit"].detail


def test_the_kernels_column_names_what_the_quantized_linears_ran(tiny_llama):
    model = quantkit.quantize(tiny_llama, RTNConfig(bits=4, group_size=32), device="cpu")
    ids, rtn = torch.randint(0, 256, (1, 6)), SimpleNamespace(name="rtn")
    with torch.no_grad():
        model(ids)
        layers = len(chosen_kernels(model))
        assert worker.kernel_summary(model, rtn) == f"int4-cpu x{layers}"
        set_kernel(model, "dequantize")
        model(ids)
    assert worker.kernel_summary(model, rtn) == f"dequantize x{layers}"
    assert worker.kernel_summary(make_tiny_llama(), None) is None
    nf4 = quantkit.quantize(make_tiny_llama(), "nf4", device="cpu")
    assert worker.kernel_summary(nf4, SimpleNamespace(name="bnb")) == "bnb's own layers"
