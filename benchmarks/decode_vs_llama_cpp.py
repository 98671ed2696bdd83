"""Batch-1 greedy decode on the CPU: quantkit's GGUF model against llama.cpp on the same ``.gguf``
files, and against the bf16 float model.

    python benchmarks/decode_vs_llama_cpp.py --llama-python /work/llamacpp-venv/bin/python
    python benchmarks/decode_vs_llama_cpp.py --llama-python ... --types Q4_0 --new-tokens 64 --rounds 3

A synthetic bf16 checkpoint of ``--preset``'s exact shapes (``synthetic_checkpoint.py``, random
weights, hub layout; reused when ``--work`` has it) is streamed into one ``.gguf`` per ``--types``
entry (``quantkit.quantize_streaming``), with the embedded SmolLM2's tokenizer (llama.cpp needs
one; the ids it lacks are written as unused ``[PAD<id>]`` tokens). Each variant runs in its own
child process with ``--threads`` threads, the variants one after the other, ``--rounds`` times
alternately:

* quantkit: ``quantkit.load(gguf)`` on the CPU with its selected kernels (listed per ggml type);
* llama.cpp: the same file through ``llama-cpp-python`` run by ``--llama-python`` (``n_threads``
  and ``n_threads_batch`` = ``--threads``); without it these rows are left out;
* bf16: the float checkpoint in transformers, ``dtype=torch.bfloat16``.

All see the same ``PROMPT_TOKENS`` random prompt token ids. Prefill: one forward of the prompt
filling the cache, the last position's logits only (as llama.cpp), timed after an untimed one.
Decode: ``--new-tokens`` greedy tokens (argmax of the logits, EOS never stops it: random weights
make the text meaningless, the speed is what counts) after the prompt and ``WARMUP`` untimed
steps, by wall clock (``quantkit.evaluate.decode_speed`` for the torch models; the same loop over
``Llama.eval`` for llama.cpp, whose own perf counters are printed beside it). Each variant keeps
its best round; peak RSS is the child's own high-water mark (``VmHWM``). GB/s: the weights' bytes (the file; the
bf16 checkpoint) times tokens/s, as every token reads every weight once (the tied embedding read
as the output head). Each quantkit run then times its quantized linears per (ggml type, kernel)
over ``PROFILE_STEPS`` decode steps (forward hooks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from run_log import RunLog  # this folder's scripts import each other when run
from transformers import AutoTokenizer

from quantkit import GGUFConfig, quantize_streaming
from quantkit.compare.llama_cpp import PEAK_RSS
from quantkit.compare.llama_cpp import SCRIPT as LLAMA_CPP
from quantkit.core.safetensors_files import stored_bytes
from quantkit.models import default_model_folder

RESULTS = Path(__file__).parent / "results" / "decode_vs_llama_cpp.txt"
PROMPT_TOKENS = 128
WARMUP = 2
PROFILE_STEPS = 4

# Each child reads: path, prompt ids (JSON), new tokens, threads, warm-up steps[, profile steps].
TORCH = (
    PEAK_RSS
    + r"""
import json, sys, time
import torch
from quantkit.evaluate import decode_speed
path, ids, new, threads, warmup = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
torch.set_num_threads(threads)
prompt = torch.tensor([ids])

def speeds(model):
    with torch.inference_mode():
        model(input_ids=prompt, use_cache=True, logits_to_keep=1)  # warm-up: repacks, allocations
        start = time.perf_counter()
        model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        prefill = prompt.shape[1] / (time.perf_counter() - start)
        return {"prefill": prefill, "decode": decode_speed(model, prompt, new, warmup)}

"""
)

QUANTKIT = (
    TORCH
    + r"""
from collections import defaultdict
import quantkit
steps = int(sys.argv[6])
model = quantkit.load(path, "cpu")
run = speeds(model)
kernels = quantkit.chosen_kernels(model)
modules = dict(model.named_modules())
spent, groups, began = defaultdict(float), defaultdict(lambda: [0, 0]), {}

def group(name):
    return f"{getattr(modules[name], 'qtype', type(modules[name]).__name__)} {kernels[name]}"

def hooks(name):
    def before(module, args):
        began[name] = time.perf_counter()
    def after(module, args, out):
        spent[group(name)] += time.perf_counter() - began[name]
    return before, after

for name in kernels:
    groups[group(name)][0] += 1
    groups[group(name)][1] += modules[name].in_features * modules[name].out_features
    before, after = hooks(name)
    modules[name].register_forward_pre_hook(before)
    modules[name].register_forward_hook(after)
with torch.inference_mode():
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    spent.clear()
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    step = (time.perf_counter() - start) / steps
profile = {g: [n, w, spent[g] / steps] for g, (n, w) in groups.items()}
print(json.dumps({**run, "peak_rss": peak_rss(), "profile": profile, "step": step}))
"""
)

BF16 = (
    TORCH
    + r"""
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
print(json.dumps({**speeds(model), "peak_rss": peak_rss()}))
"""
)


def child(command: list[str], threads: int) -> dict:
    """Run ``command`` with ``threads`` threads; its last stdout line, a JSON dict."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "QUANTKIT_QUIET": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{command[:3]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def vocab_size(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def prompt_ids(folder: Path, seed: int = 0) -> list[int]:
    """``PROMPT_TOKENS`` random token ids of the checkpoint's vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size(folder), (PROMPT_TOKENS,), generator=generator).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-python", help="a Python that has llama-cpp-python (llama.cpp rows left out without)")
    parser.add_argument("--preset", default="Llama-3.2-1B")
    parser.add_argument("--types", default="Q4_0,Q4_K_M", help="comma-separated GGUF types or mixes")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantkit-scale"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    log = RunLog("decode_vs_llama_cpp.py")
    began = time.perf_counter()
    source = args.work / args.preset
    if not source.is_dir():
        script = str(Path(__file__).with_name("synthetic_checkpoint.py"))
        subprocess.run([sys.executable, script, args.preset, str(source)], check=True)
    weights = {"bf16": stored_bytes(source, ())["size_bytes"]}
    log.emit(f"{args.preset}: bf16 checkpoint {source} ({weights['bf16'] / 1e9:.2f} GB)")
    files, tokenizer = {}, AutoTokenizer.from_pretrained(default_model_folder())
    if len(tokenizer) > vocab_size(source):  # a test preset: quantkit still runs its file, llama.cpp cannot
        log.emit(f"vocabulary smaller than the tokenizer's {len(tokenizer)}: no tokenizer, no llama.cpp rows")
        tokenizer, args.llama_python = None, None
    for qtype in args.types.split(","):
        files[qtype] = args.work / f"{args.preset}-decode-{qtype}.gguf"
        if not files[qtype].is_file():
            start = time.perf_counter()
            quantize_streaming(source, GGUFConfig(quant_type=qtype), files[qtype], tokenizer=tokenizer)
            log.emit(f"wrote {files[qtype]} in {time.perf_counter() - start:.0f} s")
        weights[qtype] = files[qtype].stat().st_size
    ids, threads = json.dumps(prompt_ids(source)), args.threads
    commands: dict[str, list[str]] = {}
    for qtype, path in files.items():
        commands[f"quantkit {qtype}"] = [sys.executable, "-c", QUANTKIT, str(path)]
        if args.llama_python:
            commands[f"llama.cpp {qtype}"] = [args.llama_python, "-c", LLAMA_CPP, str(path)]
    commands["bf16 (transformers)"] = [sys.executable, "-c", BF16, str(source)]
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for round_ in range(args.rounds):
        for name, command in commands.items():
            run = child([*command, ids, str(args.new_tokens), str(threads), str(WARMUP), str(PROFILE_STEPS)], threads)
            runs[name].append(run)
            speeds = f"prefill {run['prefill']:7.1f} tok/s, decode {run['decode']:6.2f} tok/s"
            log.emit(f"round {round_ + 1} {name:20s}: {speeds}")
    best = {name: max(rs, key=lambda r: r["decode"]) for name, rs in runs.items()}
    prefill = {name: max(r["prefill"] for r in rs) for name, rs in runs.items()}
    bf16 = best["bf16 (transformers)"]["decode"]
    log.emit(
        f"{'variant':<20} {'decode/s':>9} {'GB/s':>6} {'prefill/s':>10} {'peak RSS':>9} {'weights':>8}"
        f" {'vs bf16':>8} {'vs llama.cpp':>13}"
    )
    for name, run in best.items():
        size = weights[name.split()[1] if name.split()[0] != "bf16" else "bf16"]
        twin = best.get(name.replace("quantkit", "llama.cpp")) if name.startswith("quantkit") else None
        versus = f"{run['decode'] / twin['decode']:12.2f}x" if twin else ""
        log.emit(
            f"{name:<20} {run['decode']:>9.2f} {size * run['decode'] / 1e9:>6.1f} {prefill[name]:>10.1f}"
            f" {run['peak_rss'] / 2**30:>7.2f}Gi {size / 1e9:>6.2f}GB {run['decode'] / bf16:>7.2f}x {versus}"
        )
    for name, run in best.items():
        if "decode_perf_counters" in run:
            log.emit(f"{name}: llama.cpp's own perf counters: decode {run['decode_perf_counters']:.2f} tok/s")
    for name, run in best.items():
        if "profile" in run:
            log.emit(f"{name}: quantized linears per ggml type and kernel ({PROFILE_STEPS} decode steps, hooked):")
            for group, (count, params, seconds) in sorted(run["profile"].items(), key=lambda g: -g[1][2]):
                log.emit(
                    f"  {group:<28} {count:>4} linears {params / 1e6:>8.1f} M weights {seconds * 1e3:>8.1f} ms/token "
                    f"({seconds / run['step']:.0%} of a {run['step'] * 1e3:.0f} ms step)"
                )
    log.emit(
        f"batch 1, {PROMPT_TOKENS}-token random prompt, {args.new_tokens} greedy tokens after {WARMUP} untimed; "
        f"{threads} threads; best of {args.rounds} alternating rounds; whole run {time.perf_counter() - began:.0f} s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log.write(args.out)


if __name__ == "__main__":
    main()
