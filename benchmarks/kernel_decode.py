"""SmolLM2-135M greedy decode and prefill speed on the CPU: float32 against 4-bit GPTQ, RTN, GGUF
Q4_0 and HQQ and 8-bit EETQ and GGUF Q8_0, each through the kernel selected for its layers and
through the ``dequantize`` reference.

    python benchmarks/kernel_decode.py
    python benchmarks/kernel_decode.py --new-tokens 32 --repeats 1 --methods rtn,gguf

The embedded SmolLM2-135M-Instruct (``quantkit.models.load_model``), batch 1: a 128-token prompt of
the built-in text, then ``--new-tokens`` greedy tokens with a KV cache
(``quantkit.evaluate.decode_speed``: prefill and two warm-up steps untimed), and the prefill speed
of one 512-token forward pass without a cache. GPTQ uses act-order
(``desc_act``: its layers run the kernel on inputs gathered in group order) calibrated on 16 x 128
tokens (the calibration changes the weights, not the speed); RTN is ``RTNConfig(bits=4,
group_size=64)``; GGUF is ``GGUFConfig(quant_type="Q4_0")`` (its tied embedding and output head
too: the head runs ``int4-cpu`` as well); HQQ is 4-bit group 64 with ``optimize=False`` (the same
layout and speed as the optimized weights, quantized in seconds); EETQ is int8 per channel
(``int8-cpu``); GGUF Q8_0 (head included) runs ``int4x2-cpu``. Not run by default: the GGUF mixes
Q4_K_M, Q6_K and Q2_K (their 16-input-scale tensors run ``gemv-inductor``), HQQ 2-bit g16
(``gemv-inductor``), bitsandbytes NF4 and FP4 (``bnb-cpu``) and LLM.int8 (``gemv-inductor``).
g64 divides every SmolLM2 linear (576 and 1536), so every one can take ``int4-cpu``. The float32
output head (49152 x 576, 28 M weights, tied to the embedding) of the GPTQ, RTN and HQQ models is
timed alone too: its share of a decode step is what those methods leave in float32. Variants
alternate for ``--repeats`` rounds; each keeps its best tokens/s. Peak RSS: the process's
high-water mark once everything ran.
"""

from __future__ import annotations

import argparse
import copy
import resource
import time
from collections import Counter
from pathlib import Path

import torch
from run_log import RunLog  # this folder's scripts import each other when run
from torch.nn import functional as F

from quantkit import (
    BnbConfig,
    EETQConfig,
    GGUFConfig,
    GPTQConfig,
    HQQConfig,
    RTNConfig,
    chosen_kernels,
    quantize,
    set_kernel,
)
from quantkit.calibration import evaluation_tokens
from quantkit.evaluate import decode_speed
from quantkit.models import load_model

RESULTS = Path(__file__).parent / "results" / "kernel_decode.txt"
PROMPT_TOKENS = 128
PREFILL_TOKENS = 512
CONFIGS = {
    "gptq": (
        "gptq 4-bit g64 act-order",
        GPTQConfig(bits=4, group_size=64, desc_act=True, nsamples=16, seqlen=128, mse=0.0),
    ),
    "rtn": ("rtn 4-bit g64", RTNConfig(bits=4, group_size=64)),
    "gguf": ("gguf q4_0", GGUFConfig(quant_type="Q4_0")),
    "gguf8": ("gguf q8_0", GGUFConfig(quant_type="Q8_0")),
    "hqq": ("hqq 4-bit g64", HQQConfig(nbits=4, group_size=64, optimize=False)),
    "eetq": ("eetq int8", EETQConfig()),
    "q4_k_m": ("gguf q4_k_m", GGUFConfig(quant_type="Q4_K_M")),
    "q6_k": ("gguf q6_k", GGUFConfig(quant_type="Q6_K")),
    "q2_k": ("gguf q2_k", GGUFConfig(quant_type="Q2_K")),
    "hqq2": ("hqq 2-bit g16", HQQConfig(nbits=2, group_size=16, optimize=False)),
    "nf4": ("bnb nf4", BnbConfig(quant_type="nf4")),
    "fp4": ("bnb fp4", BnbConfig(quant_type="fp4")),
    "int8": ("bnb llm.int8", BnbConfig(load_in_4bit=False, load_in_8bit=True)),
}
DEFAULT_METHODS = ("gptq", "rtn", "gguf", "gguf8", "hqq", "eetq")


def prefill_speed(model: torch.nn.Module, window: torch.Tensor) -> float:
    """Tokens/s of one forward pass over ``window`` ``(1, n)`` without a cache: a prompt's prefill."""
    start = time.perf_counter()
    model(input_ids=window, use_cache=False)
    return window.shape[1] / (time.perf_counter() - start)


def head_milliseconds(model: torch.nn.Module, repeats: int = 50) -> float:
    """Best time of the float32 output head on one token's hidden state."""
    weight, x = model.lm_head.weight.detach(), torch.randn(1, 1, model.config.hidden_size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        F.linear(x, weight)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    log = RunLog("kernel_decode.py")
    emit = log.emit
    model, tokenizer = load_model()
    model.eval()
    prompt = evaluation_tokens(tokenizer, "pydoc", max_tokens=PROMPT_TOKENS)
    window = evaluation_tokens(tokenizer, "pydoc", max_tokens=PREFILL_TOKENS)
    start = time.perf_counter()
    models = {"float32": (model, None)}
    for method in args.methods.split(","):
        label, config = CONFIGS[method]
        quantized = quantize(copy.deepcopy(model), config, device="cpu", tokenizer=tokenizer)
        models[f"{label}, selected kernel"] = (quantized, None)
        models[f"{label}, dequantize"] = (quantized, "dequantize")
    emit(f"quantized in {time.perf_counter() - start:.0f} s")
    best, prefill = dict.fromkeys(models, 0.0), dict.fromkeys(models, 0.0)
    kernels: dict[str, str] = {}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for label, (variant, kernel) in models.items():
                if label != "float32":
                    set_kernel(variant, kernel)
                best[label] = max(best[label], decode_speed(variant, prompt, args.new_tokens))
                prefill[label] = max(prefill[label], prefill_speed(variant, window))
                if label != "float32":
                    counts = Counter(chosen_kernels(variant).values())
                    kernels[label] = ", ".join(f"{n} x{c}" for n, c in sorted(counts.items()))
        head = head_milliseconds(model)
    emit(f"{'variant':<45} {'decode/s':>9} {'vs fp32':>8} {'prefill/s':>10} {'vs fp32':>8}  kernels of the linears")
    for label, speed in best.items():
        fill, ratio = prefill[label], prefill[label] / prefill["float32"]
        emit(
            f"{label:<45} {speed:>9.1f} {speed / best['float32']:>7.2f}x {fill:>10.0f} {ratio:>7.2f}x"
            f"  {kernels.get(label, 'nn.Linear')}"
        )
    emit(f"float32 output head alone: {head:.2f} ms a token (best of 50 calls), in each step of 1000 / tokens/s ms")
    emit(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB (every model of the run)")
    emit(
        f"decode: batch 1, {PROMPT_TOKENS}-token prompt, {args.new_tokens} new greedy tokens; prefill: one "
        f"{PREFILL_TOKENS}-token forward without a cache; best of {args.repeats} rounds"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log.write(args.out)


if __name__ == "__main__":
    main()
