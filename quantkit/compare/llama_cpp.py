"""llama.cpp's own prefill and decode speed on a GGUF row's ``.gguf``, beside quantkit's.

``llama-cpp-python`` runs in another Python (``--llama-python``: often its own virtual
environment, built for the machine), in a child process with the protocol's threads: the same
prompt token ids, one untimed prefill, then the timed prefill and ``decode_tokens`` greedy tokens
after two untimed ones (a fixed count: EOS never stops it), by wall clock, as
:func:`quantkit.evaluate.decode_speed` times quantkit's.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import QuantkitError

WARMUP = 2

PEAK_RSS = r"""
import platform, resource

def peak_rss():  # bytes; on Linux the exec'd program's own (getrusage's counts the forking parent's too)
    try:
        with open("/proc/self/status") as status:
            return int(next(line.split()[1] for line in status if line.startswith("VmHWM"))) * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
"""
"""Source of ``peak_rss()`` for child scripts."""

SCRIPT = (
    PEAK_RSS
    + r"""
import json, sys, time
import numpy as np
import llama_cpp
path, ids, new, threads, warmup = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
llm = llama_cpp.Llama(
    model_path=path, n_ctx=len(ids) + warmup + new + 8, n_batch=len(ids), n_ubatch=len(ids),
    n_threads=threads, n_threads_batch=threads, verbose=False,
)
n_vocab = llm.n_vocab()

def greedy():
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

llm.eval(ids)  # warm-up
llm.reset()  # the next eval drops the cache from position 0
start = time.perf_counter()
llm.eval(ids)
prefill = len(ids) / (time.perf_counter() - start)
token = greedy()
for step in range(warmup + new):
    if step == warmup:
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        start = time.perf_counter()
    llm.eval([token])  # a fixed number of tokens: no EOS check
    token = greedy()
decode = new / (time.perf_counter() - start)
perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
own = perf.n_eval / perf.t_eval_ms * 1e3 if perf.t_eval_ms else 0.0
print(json.dumps({"prefill": prefill, "decode": decode, "decode_perf_counters": own, "peak_rss": peak_rss()}))
"""
)


def check_llama_python(python: str) -> None:
    """Raise :class:`QuantkitError` unless ``python`` runs and imports ``llama_cpp``."""
    try:
        done = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True)
    except OSError as exc:
        raise QuantkitError(f"--llama-python {python!r} cannot run: {exc}") from exc
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise QuantkitError(f"--llama-python {python!r} cannot import llama_cpp (llama-cpp-python): {tail[0]}")


def llama_cpp_speed(
    python: str, path: Path, prompt: Sequence[int], new_tokens: int, threads: int
) -> tuple[float, float]:
    """llama.cpp's ``(prefill, decode)`` tokens/s on the ``.gguf`` at ``path``, run by ``python``."""
    command = [python, "-c", SCRIPT, str(path), json.dumps(list(prompt)), str(new_tokens), str(threads), str(WARMUP)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise QuantkitError(f"llama.cpp failed on {path.name} (exit {done.returncode}): {done.stderr[-2000:]}")
    try:
        speeds = json.loads(done.stdout.strip().splitlines()[-1])
        return float(speeds["prefill"]), float(speeds["decode"])
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise QuantkitError(f"llama.cpp's child printed no speeds for {path.name}: {done.stdout[-500:]!r}") from exc
