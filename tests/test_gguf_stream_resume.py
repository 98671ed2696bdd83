"""Resuming an interrupted ``quantize_streaming(folder, gguf, "x.gguf")``: the work file and its journal."""

import json
import os

import pytest
import torch
from test_gguf_export import tiny_tokenizer
from test_gguf_streaming import _checkpoint
from transformers import AutoModelForCausalLM

import quantkit
from quantkit import streaming
from quantkit.builtin_backends.gguf import stream_export
from quantkit.builtin_backends.gguf.imatrix import collect_imatrix
from quantkit.testing import token_ids

CONFIG = {"quant_method": "gguf", "quant_type": "Q4_K_M"}
QUANTIZE, QUANTIZED = stream_export._quantize, streaming._quantized
STOP = 5
"""Modules quantized (one tensor each) before an interrupted run stops."""


class Interrupted(Exception):
    """Stands for a run killed in the middle."""


def counting(monkeypatch, fail_after: int | None = None) -> list[str]:
    """The modules the .gguf writer quantizes (stopping the run after ``fail_after`` of them)."""
    calls: list[str] = []

    def counted(model, name, steps):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupted
        calls.append(name)
        return QUANTIZE(model, name, steps)

    monkeypatch.setattr(stream_export, "_quantize", counted)
    return calls


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny tied Llama in bfloat16, with a tokenizer the .gguf embeds."""
    folder = _checkpoint(tmp_path_factory.mktemp("checkpoint") / "float", torch.bfloat16, True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def save_imatrix(folder, path, seed: int) -> str:
    """An importance matrix of the checkpoint at ``path``, from calibration tokens of ``seed``,
    its modification time moved on (a rewrite within the clock's resolution would look unchanged)."""
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    collect_imatrix(model, token_ids(2, 16, seed=seed)).save(path)
    os.utime(path, ns=(seed * 10**9, seed * 10**9))
    return str(path)


def test_an_interrupted_gguf_resumes_with_the_bytes_of_a_whole_run(folder, tmp_path, monkeypatch):
    whole = counting(monkeypatch)
    reference = quantkit.quantize_streaming(folder, CONFIG, tmp_path / "ref.gguf")
    out, partial = tmp_path / "out.gguf", tmp_path / ".out.gguf.quantkit-partial"
    out.write_bytes(b"previous")
    counting(monkeypatch, fail_after=STOP)
    with pytest.raises(Interrupted):
        quantkit.quantize_streaming(folder, CONFIG, out)
    assert out.read_bytes() == b"previous"  # the previous output stays until the new one is complete
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.gguf.quantkit-partial", "out.gguf", "ref.gguf"]
    written = json.loads((partial / streaming.JOURNAL).read_text())["written"]
    assert written == {"tensors": STOP, "offset": (partial / "out.gguf").stat().st_size}
    with open(partial / "out.gguf", "ab") as work:
        work.write(b"half a tensor")  # what a run killed mid-write leaves after the recorded offset

    resumed = counting(monkeypatch)
    assert quantkit.quantize_streaming(folder, CONFIG, out) == out
    assert resumed == whole[STOP:]  # only the modules not yet on disk
    assert out.read_bytes() == reference.read_bytes()
    assert not partial.exists()


@pytest.mark.parametrize("change", ["config", "imatrix", "resume=False", "tokenizer", "shorter file"])
def test_a_changed_run_or_work_file_starts_over(folder, tmp_path, monkeypatch, caplog, change):
    out, partial = tmp_path / "out.gguf", tmp_path / ".out.gguf.quantkit-partial"
    first = final = CONFIG
    if change == "config":
        first = {**CONFIG, "quant_type": "Q8_0"}
    if change == "imatrix":
        first = final = {**CONFIG, "imatrix": save_imatrix(folder, tmp_path / "imatrix.gguf", seed=1)}
    counting(monkeypatch, fail_after=STOP)
    with pytest.raises(Interrupted):
        quantkit.quantize_streaming(folder, first, out)
    kwargs = {"resume": change != "resume=False"}
    if change == "imatrix":
        save_imatrix(folder, tmp_path / "imatrix.gguf", seed=2)
    if change == "tokenizer":
        kwargs["tokenizer"] = tiny_tokenizer(vocab_size=380)  # another header
    if change == "shorter file":
        os.truncate(partial / "out.gguf", (partial / "out.gguf").stat().st_size - 10)

    again = counting(monkeypatch)
    with caplog.at_level("INFO", logger="quantkit"):
        quantkit.quantize_streaming(folder, final, out, **kwargs)
    whole = counting(monkeypatch)
    reference = quantkit.quantize_streaming(folder, final, tmp_path / "ref.gguf", tokenizer=kwargs.get("tokenizer"))
    assert again == whole
    assert out.read_bytes() == reference.read_bytes()
    assert "starting over" in caplog.text


def test_a_folder_run_fingerprints_its_importance_matrix(folder, tmp_path, monkeypatch):
    """A streamed folder (safetensors) run of GGUF with an importance-matrix file resumes only
    while that file is unchanged."""
    config = {**CONFIG, "imatrix": save_imatrix(folder, tmp_path / "imatrix.gguf", seed=1)}
    calls: list[str] = []

    def counted(target, tensors, steps, fail_after=None):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupted
        calls.append(target.name)
        return QUANTIZED(target, tensors, steps)

    def run(fail_after: int | None = None) -> list[str]:
        calls.clear()
        monkeypatch.setattr(streaming, "_quantized", lambda *args: counted(*args, fail_after=fail_after))
        quantkit.quantize_streaming(folder, config, tmp_path / "out", max_shard_bytes=100_000)
        return list(calls)

    whole = len(run())
    for change in (False, True):
        with pytest.raises(Interrupted):
            run(fail_after=whole - 3)
        if change:
            save_imatrix(folder, tmp_path / "imatrix.gguf", seed=2)
        assert (len(run()) == whole) is change
    reference = quantkit.quantize_streaming(folder, config, tmp_path / "ref", max_shard_bytes=100_000)
    assert files_of(tmp_path / "out") == files_of(reference)


def files_of(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
