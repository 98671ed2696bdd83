"""``quantkit compare --llama-python``: GGUF rows also report llama.cpp's own speed on their ``.gguf``.

A shell script stands in for a Python with llama-cpp-python (it checks the file it is given is a
GGUF and prints fixed speeds); ``QUANTKIT_LLAMA_PYTHON`` names a real one for the last test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import make_tiny_llama

from quantkit import GGUFConfig, RTNConfig
from quantkit.compare import Protocol, worker
from quantkit.compare.llama_cpp import check_llama_python, llama_cpp_speed
from quantkit.compare.methods import Method
from quantkit.compare.results import Result, columns_of
from quantkit.core.errors import QuantkitError

PROTOCOL = Protocol(
    model="tiny", eval_tokens=128, seqlen=32, stride=32, calibration_samples=4, calibration_seqlen=32, threads=1
)
FAKE = """#!/bin/sh
if [ "$2" = "import llama_cpp" ]; then exit 0; fi
head -c 4 "$3" | grep -q GGUF || { echo "not a GGUF: $3" >&2; exit 1; }
printf '%s\\n' "$4" > "$(dirname "$0")/prompt.json"
echo "$5 $6 $OMP_NUM_THREADS" > "$(dirname "$0")/args"
echo '{"prefill": 123.0, "decode": 45.5}'
"""


@pytest.fixture
def fake_llama_python(tmp_path) -> Path:
    path = tmp_path / "fake" / "python"
    path.parent.mkdir()
    path.write_text(FAKE)
    path.chmod(0o755)
    return path


@pytest.fixture
def tiny_job(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from quantkit.models import default_model_folder

    tokenizer = AutoTokenizer.from_pretrained(default_model_folder())
    monkeypatch.setattr(worker, "load_model", lambda name: (make_tiny_llama(vocab=49152), tokenizer))
    protocol = Protocol(**{**PROTOCOL.to_dict(), "decode_tokens": 2, "prompt_tokens": 8})
    return {
        "protocol": protocol.to_dict(),
        "reference": str(tmp_path / "reference.npy"),
        "write_reference": True,
        "models": None,
        "scratch": str(tmp_path),
    }


def test_a_gguf_row_reports_llama_cpps_speed_on_its_written_file(tiny_job, fake_llama_python, tmp_path):
    job = {**tiny_job, "llama_python": str(fake_llama_python)}
    result = worker.measure({**job, "method": Method("gguf-q4_0", GGUFConfig(quant_type="Q4_0")).to_dict()}, print)
    assert (result.llama_cpp_prefill_tokens_per_s, result.llama_cpp_decode_tokens_per_s) == (123.0, 45.5)
    assert len(json.loads((fake_llama_python.parent / "prompt.json").read_text())) == 8  # the protocol's prompt
    assert (fake_llama_python.parent / "args").read_text().split() == ["2", "1", "1"]  # decode tokens, threads
    assert not list(tmp_path.glob(".save-*"))  # the .gguf is removed
    assert Result.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    labels = [c.label for c in columns_of([result], "markdown")]
    assert "llama.cpp prefill tok/s" in labels and "llama.cpp decode tok/s" in labels


def test_other_rows_and_runs_without_llama_python_leave_the_columns_out(tiny_job, fake_llama_python):
    rtn = Method("rtn", RTNConfig(bits=4, group_size=32)).to_dict()
    with_llama = worker.measure({**tiny_job, "llama_python": str(fake_llama_python), "method": rtn}, print)
    gguf = Method("gguf-q4_0", GGUFConfig(quant_type="Q4_0")).to_dict()
    without = worker.measure({**tiny_job, "method": gguf}, print)
    for result in (with_llama, without):
        assert result.llama_cpp_decode_tokens_per_s is None
        assert "llama_cpp_decode_tokens_per_s" not in result.to_dict()
        assert "llama.cpp decode tok/s" not in [c.label for c in columns_of([result], "markdown")]


def test_a_python_without_llama_cpp_is_refused_before_anything_runs(tmp_path, fake_llama_python):
    check_llama_python(str(fake_llama_python))
    without = tmp_path / "python"
    without.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'llama_cpp'\" >&2\nexit 1\n")
    without.chmod(0o755)
    with pytest.raises(QuantkitError, match="cannot import llama_cpp .*No module named"):
        check_llama_python(str(without))
    with pytest.raises(QuantkitError, match="cannot run"):
        check_llama_python(str(tmp_path / "no-such-python"))


def test_a_failing_llama_cpp_child_raises_with_its_stderr(fake_llama_python, tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"nope")
    with pytest.raises(QuantkitError, match="not a GGUF"):
        llama_cpp_speed(str(fake_llama_python), not_gguf, [1, 2, 3], 2, 1)


@pytest.mark.skipif(not os.environ.get("QUANTKIT_LLAMA_PYTHON"), reason="QUANTKIT_LLAMA_PYTHON names no real llama.cpp")
def test_real_llama_cpp_runs_quantkits_gguf(tiny_job):
    job = {**tiny_job, "llama_python": os.environ["QUANTKIT_LLAMA_PYTHON"]}
    result = worker.measure({**job, "method": Method("gguf-q4_0", GGUFConfig(quant_type="Q4_0")).to_dict()}, print)
    assert result.llama_cpp_prefill_tokens_per_s > 0 and result.llama_cpp_decode_tokens_per_s > 0
