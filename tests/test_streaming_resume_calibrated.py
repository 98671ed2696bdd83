"""An interrupted calibrated (GPTQ, AWQ) streamed run resumes at its first unfinished decoder layer:
the finished layers are neither read nor quantized again, and the output has the bytes of an
uninterrupted run. Any change (calibration, config) or ``resume=False`` starts over."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_streaming import CALIBRATED, CALIBRATION, SHARD, Interrupted, files_of, saved_folder

import quantkit
from quantkit import layerwise, streaming
from quantkit.core.errors import QuantizationError
from quantkit.core.shard_writer import ShardWriter
from quantkit.core.streamed_checkpoints import StreamedCheckpoint
from quantkit.testing import token_ids

GPTQ = CALIBRATED["gptq"]


def stream(folder: Path, out: Path, config=GPTQ, calibration=CALIBRATION, **options) -> Path:
    return quantkit.quantize_streaming(
        folder, config, out, calibration=calibration, max_shard_bytes=SHARD, device="cpu", **options
    )


def materialised(monkeypatch) -> list[str]:
    """Record the modules read from the float checkpoint."""
    read: list[str] = []
    materialise = StreamedCheckpoint.materialise

    def recorded(self, module, **options):
        read.append(module)
        return materialise(self, module, **options)

    monkeypatch.setattr(StreamedCheckpoint, "materialise", recorded)
    return read


def interrupt_at_load(monkeypatch, index: int) -> None:
    """Stop the run as decoder layer ``index`` is about to be read (the earlier ones finished)."""
    load = streaming._StreamedLayers.load

    def interrupted(self, i, layer):
        if i == index:
            raise Interrupted
        load(self, i, layer)

    monkeypatch.setattr(streaming._StreamedLayers, "load", interrupted)


def interrupt_writing(monkeypatch, prefix: str) -> None:
    """Stop the run as it writes the last tensor of the layer ``prefix`` (shards closed meanwhile)."""
    add = ShardWriter.add

    def interrupted(self, name, tensor, dtype=None):
        if name == f"{prefix}.post_attention_layernorm.weight":
            raise Interrupted
        add(self, name, tensor, dtype)

    monkeypatch.setattr(ShardWriter, "add", interrupted)


def work_files(tmp_path: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in (tmp_path / f".{name}.quantkit-partial").iterdir())


@pytest.mark.parametrize(("where", "spill"), [("between layers", False), ("writing", False), ("writing", True)])
def test_an_interrupted_gptq_run_resumes_at_its_first_unfinished_layer(where, spill, tmp_path, monkeypatch):
    folder = saved_folder(tmp_path, "llama-fp32", layers=3)
    spilled: list[int] = []
    if spill:  # the calibration activations kept on disk (as under a memory budget), saved from there
        monkeypatch.setattr(streaming, "plan_memory", lambda *args, **kwargs: SimpleNamespace(spill=True))
        spec = layerwise.SpilledChunks.spec
        monkeypatch.setattr(layerwise.SpilledChunks, "spec", lambda self, c: spilled.append(c) or spec(self, c))
    reference = stream(folder, tmp_path / "ref")
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        if where == "writing":
            interrupt_writing(patch, "model.layers.2")
        else:
            interrupt_at_load(patch, 2)
        with pytest.raises(Interrupted):
            stream(folder, out)
    assert not out.exists() and bool(spilled) == spill
    journal = json.loads((tmp_path / ".out.quantkit-partial" / streaming.JOURNAL).read_text())
    assert journal["layer"] == 2 and journal["open"]["tensors"]  # a shard was being filled
    files = work_files(tmp_path)
    assert [name for name in files if "activations" in name] == [".activations-2.safetensors"]  # layer 1's gone
    if where == "writing":  # the shard then filled was closed since, but keeps its scratch file for a resume
        assert {journal["open"]["file"], journal["open"]["file"].replace(".part", ".safetensors")} <= set(files)

    read = materialised(monkeypatch)
    stream(folder, out)
    assert read == ["model.layers.2"]  # neither the embedding nor the finished layers
    assert files_of(out) == files_of(reference)
    assert not (tmp_path / ".out.quantkit-partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "out", "ref"]  # no spilled chunks left


def test_an_interrupted_awq_run_resumes(tmp_path, monkeypatch):
    folder = saved_folder(tmp_path, "llama-fp32", layers=2)
    reference = stream(folder, tmp_path / "ref", CALIBRATED["awq"])
    with monkeypatch.context() as patch:
        interrupt_at_load(patch, 1)
        with pytest.raises(Interrupted):
            stream(folder, tmp_path / "out", CALIBRATED["awq"])
    read = materialised(monkeypatch)
    stream(folder, tmp_path / "out", CALIBRATED["awq"])
    assert read == ["model.layers.1"]
    assert files_of(tmp_path / "out") == files_of(reference)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"calibration": token_ids(4, 64, seed=1)}, "another checkpoint, config, calibration or shard size"),
        ({"config": {**GPTQ, "bits": 8}}, "another checkpoint, config, calibration or shard size"),
        ({"resume": False}, "resume=False: starting over"),
    ],
)
def test_a_changed_run_or_resume_false_starts_over(change, message, tmp_path, monkeypatch, caplog):
    folder = saved_folder(tmp_path, "llama-fp32", layers=3)
    with monkeypatch.context() as patch:
        interrupt_at_load(patch, 2)
        with pytest.raises(Interrupted):
            stream(folder, tmp_path / "out")
    read = materialised(monkeypatch)
    with caplog.at_level(logging.INFO, logger="quantkit"):
        stream(folder, tmp_path / "out", **change)
    assert message in caplog.text
    assert read == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2"]


def test_a_failed_run_leaves_the_previous_output_intact(tmp_path, monkeypatch):
    folder = saved_folder(tmp_path, "llama-fp32", layers=3)
    out = stream(folder, tmp_path / "out", {**GPTQ, "bits": 8})
    before = files_of(out)
    with monkeypatch.context() as patch:
        interrupt_writing(patch, "model.layers.2")
        with pytest.raises(Interrupted):
            stream(folder, out)
    assert files_of(out) == before
    stream(folder, out)
    assert files_of(out) == files_of(stream(folder, tmp_path / "ref"))


def test_damaged_saved_activations_start_over(tmp_path, monkeypatch, caplog):
    folder = saved_folder(tmp_path, "llama-fp32", layers=3)
    with monkeypatch.context() as patch:
        interrupt_at_load(patch, 2)
        with pytest.raises(Interrupted):
            stream(folder, tmp_path / "out")
    saved = tmp_path / ".out.quantkit-partial" / ".activations-2.safetensors"
    saved.write_bytes(saved.read_bytes()[:-8])
    read = materialised(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        stream(folder, tmp_path / "out")
    assert "truncated" in caplog.text and "starting over" in caplog.text
    assert read[:2] == ["model.embed_tokens", "model.layers.0"]


def test_saved_activations_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(2, 5, 8, generator=generator).to(torch.bfloat16) for _ in range(3)]
    kwargs = [
        {
            "position_embeddings": (torch.randn(1, 5, 4), torch.randn(1, 5, 4)),
            "position_ids": torch.arange(5)[None],
            "attention_mask": torch.ones(1, 1, 5, 5, dtype=torch.bool),
            "past_key_values": None,
            "use_cache": False,
        }
        for _ in chunks
    ]
    spilled = layerwise.SpilledChunks(torch.device("cpu"), tmp_path)
    for chunk in chunks:
        spilled.append(chunk)
    for saved in (chunks, spilled):
        layerwise.save_activations(tmp_path / "a.safetensors", saved, kwargs)
        loaded: list[torch.Tensor] = []
        again = layerwise.load_activations(tmp_path / "a.safetensors", loaded, torch.device("cpu"))
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(loaded, chunks, strict=True))
        for old, new in zip(kwargs, again, strict=True):
            assert old.keys() == new.keys() and new["use_cache"] is False and new["past_key_values"] is None
            assert torch.equal(old["attention_mask"], new["attention_mask"])
            assert all(map(torch.equal, old["position_embeddings"], new["position_embeddings"]))
    with pytest.raises(QuantizationError, match="argument cache=object cannot be saved"):
        layerwise.save_activations(tmp_path / "b.safetensors", chunks, [{"cache": object()}])
    assert not (tmp_path / "b.safetensors").exists()


def test_unsaveable_layer_arguments_leave_a_run_that_cannot_resume(tmp_path, monkeypatch, caplog):
    folder = saved_folder(tmp_path, "llama-fp32", layers=2)
    reference = stream(folder, tmp_path / "ref")
    capture = layerwise._capture_first_inputs

    def with_an_object(*args):
        return [{**kwargs, "unused": object()} for kwargs in capture(*args)]  # the layers take **kwargs

    monkeypatch.setattr(layerwise, "_capture_first_inputs", with_an_object)
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        out = stream(folder, tmp_path / "out")
    assert "argument unused=object cannot be saved: this run cannot resume if interrupted" in caplog.text
    assert files_of(out) == files_of(reference)


@pytest.mark.parametrize("architecture", ["synthetic", "qwen2-bf16"])
def test_resumed_bytes_for_other_architectures(architecture, tmp_path, monkeypatch):
    """bfloat16 with Llama-3 rope scaling (the synthetic checkpoint), and Qwen2's biased projections."""
    folder = saved_folder(tmp_path, architecture, layers=2)
    reference = stream(folder, tmp_path / "ref")
    with monkeypatch.context() as patch:
        interrupt_at_load(patch, 1)
        with pytest.raises(Interrupted):
            stream(folder, tmp_path / "out")
    read = materialised(monkeypatch)
    stream(folder, tmp_path / "out")
    assert read == ["model.layers.1"]
    assert files_of(tmp_path / "out") == files_of(reference)
