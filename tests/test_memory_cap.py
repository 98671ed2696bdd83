"""A checkpoint larger than a memory cap quantizes inside it.

The cap is a cgroup v1 memory limit around the process: it counts anonymous memory and the page
cache of the shards it writes and maps, which the kernel reclaims under the limit, as a user's
smaller machine would (a resident-set figure would count mapped shard pages instead). The
checkpoint has Llama-3.2-1B's shapes, with 2 of its 16 decoder layers; the 8B runs are in
``benchmarks/scale.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.testing.synthetic_checkpoints import write_synthetic_checkpoint

CGROUPS = Path("/sys/fs/cgroup/memory")
CAP = 700 * 2**20
"""The memory limit: less than the checkpoint's 768 MB of bfloat16 weights (imports take ~150-330 MB, the
largest module's quantization ~400 MB more)."""


@pytest.fixture
def memory_group():
    if os.geteuid() != 0 or not (CGROUPS / "cgroup.procs").is_file():
        pytest.skip("needs root and the cgroup v1 memory controller")
    group = CGROUPS / f"quantkit-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(CAP))
        yield group
    finally:
        group.rmdir()


def test_a_checkpoint_larger_than_the_memory_cap_quantizes_inside_it(memory_group, tmp_path):
    source, out = tmp_path / "float", tmp_path / "out"
    write_synthetic_checkpoint(source, "Llama-3.2-1B", layers=2, max_shard_bytes=300 * 10**6)
    for shard in source.glob("*.safetensors"):  # out of the page cache: the capped run reads it from disk
        with shard.open("rb") as file:
            os.fsync(file.fileno())
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    script = f"import quantkit; quantkit.quantize_streaming({str(source)!r}, 'rtn-4bit-g128', {str(out)!r})"
    enter = f'echo $$ > {memory_group}/cgroup.procs && exec "$0" -c "$1"'
    env = {**os.environ, "QUANTKIT_QUIET": "1", "OMP_NUM_THREADS": "2"}
    run = subprocess.run(["sh", "-c", enter, sys.executable, script], capture_output=True, text=True, env=env)
    assert run.returncode == 0, f"exit {run.returncode} (137: killed at the cap)\n{run.stderr[-3000:]}"
    weights = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    peak = int((memory_group / "memory.max_usage_in_bytes").read_text())
    assert weights > CAP >= peak
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["quantization_config"]["quant_method"] == "rtn"
    assert sum(p.stat().st_size for p in out.glob("*.safetensors")) < weights
