"""quantkit's GGUF quantizer against llama.cpp's own, side by side on the same F16 weights.

    python benchmarks/gguf_quantize_speed.py --llama-python /work/llamacpp-venv/bin/python
    python benchmarks/gguf_quantize_speed.py --llama-python ... --preset Llama-3.1-8B --work /data/q

A synthetic float16 checkpoint of ``--preset``'s exact shapes (``synthetic_checkpoint.py``, hub
layout) is the input of both: quantkit streams it into a ``--mix`` ``.gguf``
(``quantkit.quantize_streaming``, one module in memory at a time), and llama.cpp's
``llama_model_quantize`` (from ``llama-cpp-python``, run by ``--llama-python``) quantizes the F16
``.gguf`` quantkit writes of the same checkpoint, as ``llama-quantize`` would. Both run in child
processes with ``--threads`` threads, one after the other, ``--rounds`` times alternately; each
time is the quantizing call alone (reading the input and writing the output included, imports
not), with the child's peak RSS. The two outputs are compared block by block (identical ggml
blocks per type). The machine may be shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from imatrix_quality import same_blocks  # this folder's scripts import each other when run
from run_log import RunLog

from quantkit.builtin_backends.gguf.mixes import FILE_TYPES
from quantkit.core.safetensors_files import stored_bytes

RESULTS = Path(__file__).parent / "results" / "gguf_quantize_speed.txt"

OURS = r"""
import json, resource, sys, time
import quantkit
from transformers import LlamaForCausalLM  # imported before the clock starts, as llama.cpp's library is loaded
source, target, method = sys.argv[1:4]
start = time.perf_counter()
quantkit.quantize_streaming(source, {"quant_method": "gguf", "quant_type": method}, target)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

THEIRS = r"""
import ctypes, json, resource, sys, time
import llama_cpp
source, target, ftype, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = ftype, threads
start = time.perf_counter()
status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
seconds = time.perf_counter() - start
if status:
    sys.exit(f"llama_model_quantize failed: {status}")
print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child(command: list[str], threads: int) -> dict:
    """Run ``command`` with ``threads`` threads; its last stdout line, a JSON dict."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "QUANTKIT_QUIET": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{command[:3]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-python", required=True, help="a Python that has llama-cpp-python")
    parser.add_argument("--preset", default="Llama-3.2-1B")
    parser.add_argument("--mix", default="Q4_K_M", choices=sorted(FILE_TYPES), help="a GGUF mix or type")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantkit-gguf-speed"))
    args = parser.parse_args()
    log = RunLog("gguf_quantize_speed.py")
    source = args.work / f"{args.preset}-f16"
    f16 = args.work / f"{args.preset}-f16.gguf"
    here = Path(__file__).parent
    if not source.is_dir():
        script = str(here / "synthetic_checkpoint.py")
        subprocess.run([sys.executable, script, args.preset, str(source), "--dtype", "float16"], check=True)
    if not f16.is_file():
        child([sys.executable, "-c", OURS, str(source), str(f16), "F16"], args.threads)
    params = stored_bytes(source, ())["size_bytes"] / 2 / 1e9
    log.emit(f"{args.preset}: {params:.3f} B parameters (float16 checkpoint {source}); mix {args.mix}")
    ours, theirs = args.work / f"quantkit-{args.mix}.gguf", args.work / f"llama.cpp-{args.mix}.gguf"
    runs: dict[str, list[dict]] = {"quantkit": [], "llama.cpp": []}
    for round_ in range(args.rounds):
        for name in ("llama.cpp", "quantkit"):
            if name == "quantkit":
                run = child([sys.executable, "-c", OURS, str(source), str(ours), args.mix], args.threads)
            else:
                command = [args.llama_python, "-c", THEIRS, str(f16), str(theirs)]
                run = child([*command, str(FILE_TYPES[args.mix].value), str(args.threads)], args.threads)
            runs[name].append(run)
            log.emit(
                f"round {round_ + 1} {name:9s}: {run['seconds']:7.1f} s ({run['seconds'] / params:5.1f} s per B "
                f"parameters), peak RSS {run['peak_rss'] / 2**30:.2f} GiB"
            )
    best = {name: min(r["seconds"] for r in rs) for name, rs in runs.items()}
    log.emit(
        f"best of {args.rounds}: quantkit {best['quantkit']:.1f} s, llama.cpp {best['llama.cpp']:.1f} s: "
        f"quantkit takes {best['quantkit'] / best['llama.cpp']:.2f}x llama.cpp's time"
    )
    log.emit(f"file sizes: quantkit {ours.stat().st_size} bytes, llama.cpp {theirs.stat().st_size} bytes")
    log.emit(f"identical ggml blocks: {same_blocks(ours, theirs)}")
    log.write(RESULTS)


if __name__ == "__main__":
    main()
