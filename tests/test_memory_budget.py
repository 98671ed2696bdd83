"""A memory budget: parsing it, failing early under it, spilling calibration activations to disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_llama

import quantkit
from quantkit import layerwise
from quantkit.builtin_backends.gguf.backend import CHUNK_WORKING_BYTES
from quantkit.core.errors import MemoryBudgetError
from quantkit.core.hardware import Hardware
from quantkit.core.registry import get_registry
from quantkit.core.shard_writer import COPY_BYTES
from quantkit.estimate import PROCESS_BYTES, REFERENCE_RATES, WRITES_PER_OUTPUT_BYTE, estimate_quantization
from quantkit.memory_budget import parse_bytes, plan_memory

TOKENS = torch.randint(0, 256, (17, 512), generator=torch.Generator().manual_seed(0))
"""Two chunks of GPTQ's 16 samples of 512 tokens (and 9 of AWQ's 2): spilling has chunks to keep on disk."""


@pytest.mark.parametrize(
    ("text", "size"),
    [("4GB", 4 * 10**9), ("3GiB", 3 * 2**30), ("2.5G", int(2.5 * 2**30)), ("512 MiB", 512 * 2**20), (1000, 1000)],
)
def test_sizes_parse_with_their_units(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("bad", ["lots", "3 GiBs", "-1GB", "0", "", True, 0.5])
def test_a_bad_size_names_the_field_and_the_allowed_forms(bad):
    with pytest.raises(quantkit.ConfigValueError, match=r"max_memory.*allowed: a positive size in bytes.*3GiB"):
        parse_bytes(bad)


def test_a_run_over_budget_fails_early_naming_the_smallest_budget(monkeypatch):
    model, config = make_tiny_llama(), quantkit.GPTQConfig(group_size=32)
    spilled = estimate_quantization(model, config, nsamples=17, seqlen=512, spill=True, rates=REFERENCE_RATES)
    from quantkit.builtin_backends.gptq import backend as gptq

    monkeypatch.setattr(gptq, "quantize_layerwise", pytest.fail)  # nothing heavy runs
    with pytest.raises(MemoryBudgetError) as info:
        quantkit.quantize(model, config, calibration=TOKENS, device="cpu", max_memory=PROCESS_BYTES)
    message = str(info.value)
    assert info.value.predicted == spilled.peak_bytes and info.value.budget == PROCESS_BYTES
    assert "smallest budget that would work is" in message and "process 0.31 GiB" in message
    assert not hasattr(model, layerwise.SPILL_ATTR) and not hasattr(model, "quantkit_config")


def test_an_in_memory_run_over_budget_that_streaming_fits_suggests_it():
    from quantkit.estimate import stored_model
    from quantkit.models import default_model_folder

    model = stored_model(default_model_folder()).float()  # SmolLM2-135M's shapes, on the meta device
    with pytest.raises(MemoryBudgetError, match=r"quantize --stream, quantkit.quantize_streaming\) fits 0.38"):
        plan_memory(model, quantkit.RTNConfig(), "0.6GiB", None, streaming=False)


def test_a_streamed_run_over_budget_fails_before_writing(tmp_path):
    source, out = tmp_path / "float", tmp_path / "out"
    _tiny_checkpoint(source)
    with pytest.raises(MemoryBudgetError, match="streamed run's predicted peak .* smallest budget that would work"):
        quantkit.quantize_streaming(source, "rtn-4bit-g128", out, max_memory="100MiB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float"]


def _tiny_checkpoint(folder) -> None:
    model = make_tiny_llama().to(torch.bfloat16)
    model.save_pretrained(folder)


@pytest.mark.parametrize("config", [quantkit.GPTQConfig(group_size=32), quantkit.AWQConfig(group_size=32)])
def test_spilled_activations_give_the_same_bytes_and_leave_no_files(config, tmp_path, monkeypatch):
    kept = quantkit.quantize(make_tiny_llama(), config, calibration=TOKENS, device="cpu").state_dict()
    reads = []
    read = layerwise.SpilledChunks.__getitem__
    monkeypatch.setattr(layerwise.SpilledChunks, "__getitem__", lambda self, c: reads.append(c) or read(self, c))
    model = make_tiny_llama()
    setattr(model, layerwise.SPILL_ATTR, tmp_path)
    spilled = quantkit.quantize(model, config, calibration=TOKENS, device="cpu").state_dict()
    assert reads and max(reads) >= 1  # every chunk came from disk
    assert kept.keys() == spilled.keys() and all(torch.equal(kept[k], spilled[k]) for k in kept)
    assert list(tmp_path.iterdir()) == []


def test_spill_files_are_removed_when_the_run_fails(tmp_path, monkeypatch):
    from quantkit.builtin_backends.gptq import backend as gptq

    def fail(self, ctx):
        assert any(tmp_path.iterdir())  # the chunks are on disk while the layer runs
        raise RuntimeError("solve failed")

    monkeypatch.setattr(gptq._GPTQLayerQuantizer, "__call__", fail)
    model = make_tiny_llama()
    setattr(model, layerwise.SPILL_ATTR, tmp_path)
    with pytest.raises(RuntimeError, match="solve failed"):
        quantkit.quantize(model, quantkit.GPTQConfig(group_size=32), calibration=TOKENS, device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_a_budget_between_the_spilled_and_the_kept_peak_spills(monkeypatch):
    model, config = make_tiny_llama(), quantkit.GPTQConfig(group_size=32)
    shape = {"nsamples": 17, "seqlen": 512, "rates": REFERENCE_RATES}
    kept = estimate_quantization(model, config, **shape)
    spilled = estimate_quantization(model, config, spill=True, **shape)
    assert spilled.spill and spilled.peak_bytes < kept.peak_bytes
    assert kept.memory["hidden states"] - spilled.memory["hidden states"] == 1 * 512 * 64 * 4  # 17 -> 16 samples
    plan = plan_memory(model, config, spilled.peak_bytes, TOKENS, streaming=False)
    assert plan.spill and plan.estimate.peak_bytes == spilled.peak_bytes
    assert not plan_memory(model, config, kept.peak_bytes, TOKENS, streaming=False).spill
    seen = []
    monkeypatch.setattr(layerwise, "_hidden_states", _recording(layerwise._hidden_states, seen))
    quantkit.quantize(model, config, calibration=TOKENS, device="cpu", max_memory=spilled.peak_bytes)
    assert seen == [True] and not hasattr(model, layerwise.SPILL_ATTR)


def _recording(hidden_states, seen):
    def record(device, spill):
        seen.append(spill is not None)
        return hidden_states(device, spill)

    return record


def test_the_streamed_peak_counts_one_layer_in_its_stored_dtype(tmp_path):
    _tiny_checkpoint(tmp_path)
    config = quantkit.GPTQConfig(group_size=32)
    streamed = estimate_quantization(tmp_path, config, nsamples=17, seqlen=512, streaming=True, spill=False)
    loaded = estimate_quantization(make_tiny_llama(), config, nsamples=17, seqlen=512)
    assert streamed.streaming and "decoder layer" in streamed.memory and "model" not in streamed.memory
    model = make_tiny_llama()
    layer_bytes = sum(p.numel() for p in model.model.layers[0].parameters()) * 2  # bfloat16 as stored
    assert streamed.memory["decoder layer"] == layer_bytes
    assert streamed.memory["hidden states"] == 17 * 512 * 64 * 2
    assert loaded.memory["hidden states"] == 17 * 512 * 64 * 4  # loaded for quantize: float32


def test_estimate_command_shows_the_streamed_peak_and_what_lowers_it(capsys):
    from quantkit.cli.main import main

    argv = ["estimate", "--method", "gptq-4bit-g128"]  # SmolLM2-135M's checkpoint (bfloat16)
    assert main([*argv, "--set", "nsamples=32", "--set", "seqlen=512", "--time", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert "--stream" in row["lower_peak_gib"] and "--set nsamples=16" in row["lower_peak_gib"]
    assert any(flag.startswith("--max-memory") for flag in row["lower_peak_gib"])
    assert main([*argv, "--set", "nsamples=32", "--set", "seqlen=512", "--time", "--stream", "--json"]) == 0
    (streamed,) = json.loads(capsys.readouterr().out)
    assert streamed["peak_gib"] < row["peak_gib"] and "--stream" not in streamed["lower_peak_gib"]


def test_quantize_command_refuses_a_bad_budget(tmp_path, capsys):
    from quantkit.cli.main import main

    assert main(["quantize", "--method", "rtn", "--out", str(tmp_path / "q"), "--max-memory", "lots"]) == 2
    assert "--max-memory='lots' is invalid" in capsys.readouterr().err


def test_a_streamed_run_spills_under_its_budget_with_the_same_output(tmp_path, monkeypatch):
    source = tmp_path / "float"
    _tiny_checkpoint(source)
    config = quantkit.GPTQConfig(group_size=32)
    shape = {"nsamples": 17, "seqlen": 512, "rates": REFERENCE_RATES, "streaming": True}
    spilled = estimate_quantization(source, config, spill=True, **shape)
    assert spilled.peak_bytes < estimate_quantization(source, config, **shape).peak_bytes
    kept = quantkit.quantize_streaming(source, config, tmp_path / "kept", calibration=TOKENS)
    seen = []
    monkeypatch.setattr(layerwise, "_hidden_states", _recording(layerwise._hidden_states, seen))
    budget = spilled.peak_bytes
    out = quantkit.quantize_streaming(source, config, tmp_path / "out", calibration=TOKENS, max_memory=budget)
    assert seen == [True]
    assert (out / "model.safetensors").read_bytes() == (kept / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "kept", "out"]  # no spill folder left


PEAK_SAMPLER = r"""
import threading

def anonymous():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))

class PeakSampler:  # the peak anonymous memory above its level at entry, sampled every millisecond

    def __enter__(self):
        self.base, self.peak, self._stop = anonymous(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, anonymous() - self.base)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
"""
"""Prepended to the measuring scripts below, each run in a fresh process."""


MEASURE_WORKING = (
    PEAK_SAMPLER
    + r"""
import json, sys, torch
from torch import nn
from quantkit import as_config
from quantkit.core.hardware import Hardware
from quantkit.core.registry import get_registry

peaks = {}
for name in sys.argv[1:]:
    linear = nn.Linear(1024, 2048, bias=False, dtype=torch.bfloat16)  # hqq lets the weight of the one it quantizes go
    config = as_config(name)
    backend = get_registry().backend_for(config, Hardware.CPU)
    with torch.no_grad():  # libraries loaded on first use are not working memory
        backend.quantize_linear("warm.up", nn.Linear(128, 128, dtype=torch.bfloat16), config, torch.device("cpu"))
    with PeakSampler() as sampled, torch.no_grad():
        module = backend.quantize_linear("model.layers.0.mlp.up_proj", linear, config, torch.device("cpu"))
    declared = backend.working_bytes(config, 2048, 1024) + backend.storage_bits(config, "", 2048, 1024) // 8
    peaks[name] = (sampled.peak, declared)  # declared here: working memory may depend on this process's threads
    del module
print(json.dumps(peaks))
"""
)


def test_declared_working_memory_matches_the_measured_peak_of_quantizing_one_linear():
    """Each backend's working_bytes plus its quantized copy against the anonymous memory quantizing a
    2048 x 1024 bfloat16 linear takes, in a fresh process whose allocator maps (and returns) every
    block over 64 KiB, so that no memory freed earlier hides or inflates the figure."""
    configs = ["rtn-4bit-g128", "nf4", "hqq-4bit-g64", "eetq-int8"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_WAIT_POLICY": "PASSIVE", "QUANTKIT_QUIET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_WORKING, *configs], env=env, capture_output=True, text=True, check=True
    )
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    for name in configs:
        peak, declared = measured[name]
        assert 0.75 <= peak / declared <= 1.15, (name, peak, declared)


MEASURE_GPTQ = (
    PEAK_SAMPLER
    + r"""
import json, torch
from quantkit.builtin_backends.gptq.gptq import gptq_quantize
from quantkit.estimate import _gptq_working
from quantkit.layerwise import HessianAccumulator

out, n, seqlen = 1024, 2048, 512
weight = torch.randn(out, n, dtype=torch.bfloat16)
x = torch.randn(1, seqlen, n, dtype=torch.bfloat16) * torch.rand(n, dtype=torch.bfloat16)
with PeakSampler() as sampled:
    accumulator = HessianAccumulator(n)
    accumulator.add_batch(x)
    H = accumulator.H
    del accumulator
    result = gptq_quantize(weight, H, overwrite_hessian=True)
print(json.dumps([sampled.peak, _gptq_working({"mlp.down_proj": (out, n)}, 2, seqlen)]))
"""
)


def test_gptq_holds_what_the_estimator_counts():
    """A 1024 x 2048 bfloat16 down_proj's Hessian accumulated and solved in a fresh process (the
    allocator returning every block over 64 KiB): its float64 sum in blocks freed as H forms, the
    inverse factor in place. The peak is the estimator's GPTQ working memory, which before these
    were in place was exceeded about twice over (a copy of H, its permutation, damped, flipped and
    factored copies, an identity)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "QUANTKIT_QUIET": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE_GPTQ], env=env, capture_output=True, text=True, check=True)
    peak, declared = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.75 <= peak / declared <= 1.15, (peak, declared)


MEASURE_AWQ = (
    PEAK_SAMPLER
    + r"""
import json, torch
from torch import nn
from quantkit.builtin_backends.awq.awq import group_gram_sum, search_clip_gram, search_scales
from quantkit.builtin_backends.awq.qlinear import AWQLinear
from quantkit.estimate import _awq_working

torch.manual_seed(0)
hidden, mlp, kept = 1024, 4096, 256
linears = {name: nn.Linear(*shape, bias=False, dtype=torch.bfloat16) for name, shape in
           {"gate": (hidden, mlp), "up": (hidden, mlp), "down": (mlp, hidden)}.items()}
x, y = torch.randn(kept, hidden, dtype=torch.bfloat16), torch.randn(kept, mlp, dtype=torch.bfloat16)
gram = group_gram_sum(y, 128, torch.device("cpu")) / kept
def forward():
    return linears["down"](nn.functional.silu(linears["gate"](x)) * linears["up"](x))
with PeakSampler() as sampled, torch.no_grad():
    mean_abs = x.float().abs().mean(0, keepdim=True)
    search_scales(mean_abs, [linears["gate"], linears["up"]], group_size=128, forward_fn=forward)
    search_clip_gram(linears["down"].weight, gram)
    packed = [AWQLinear.quantize(linear, 4, 128, True) for linear in linears.values()]
targets = {"mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden), "mlp.down_proj": (hidden, mlp)}
inputs = kept * 2 * (hidden + mlp)  # the kept search inputs, made before the base
packed_bytes = sum(t.numel() * t.element_size() for m in packed for t in m.buffers())
print(json.dumps([sampled.peak - packed_bytes, _awq_working(targets, 2, kept) - inputs]))
"""
)


def test_awq_holds_what_the_estimator_counts():
    """An MLP (1024 -> 4096, bfloat16) through AWQ's steps in a fresh process (the allocator
    returning every block over 64 KiB): gate/up's scale search over 256 kept tokens, down_proj's
    clip search, then every linear quantized and packed. Each works through the weights in row
    blocks, so the peak besides the packed copies is the estimator's AWQ working memory; before,
    float copies of whole weights and their int64 codes took several times as much."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "QUANTKIT_QUIET": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE_AWQ], env=env, capture_output=True, text=True, check=True)
    peak, declared = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.75 <= peak / declared <= 1.15, (peak, declared)


def test_the_streamed_peak_of_a_calibration_free_method_counts_the_largest_quantized_weight(tmp_path):
    _tiny_checkpoint(tmp_path)  # linears of 128 x 64 at most, a 256 x 64 embedding
    config = quantkit.RTNConfig(group_size=32)
    rtn = estimate_quantization(tmp_path, config, streaming=True, rates=REFERENCE_RATES)
    quantized = get_registry().backend_for(config, Hardware.CPU).storage_bits(config, "", 64, 128) // 8  # down_proj
    quantizing = 2 * 4 * 128 * 64 + quantized  # RTN's float32 weight and codes, then its packed copy
    output = rtn.parts["write output"].write_bytes // WRITES_PER_OUTPUT_BYTE
    assert quantizing < output < COPY_BYTES  # the whole output is one shard, under the writer's buffer
    assert rtn.memory == {"process": PROCESS_BYTES, "shard writer copy": output}  # closing it: a step of its own
    gguf = estimate_quantization(tmp_path, quantkit.as_config("gguf-q4_k_m"), streaming=True, rates=REFERENCE_RATES)
    assert gguf.memory["quantizing one weight"] == CHUNK_WORKING_BYTES  # the embedding, its largest weight, too
