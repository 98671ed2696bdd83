"""CPU speed of every valid kernel of quantized linears against a float32 ``nn.Linear`` and the
``dequantize`` reference, per layer shape and batch.

    python benchmarks/kernel_speed.py                      # SmolLM2 and Llama shapes, batch 1 and 128
    python benchmarks/kernel_speed.py --shapes 4096x4096 --batches 1 --repeats 20
    python benchmarks/kernel_speed.py --shapes 576x1536,1536x576,2048x2048,2048x8192,8192x2048 \
        --batches 1 --out benchmarks/results/kernel_speed_inductor.txt

Layers (seed 0, standard-normal float32 weights): GPTQ-format 4-bit group-64 (round-to-nearest,
what ``RTNConfig(bits=4, group_size=64)`` stores), EETQ int8 per channel, GGUF Q4_0, Q8_0, and
Q4_K, Q6_K and Q2_K (where the rows hold 256-wide super-blocks), HQQ 4-bit group 64 and 2-bit
group 16 (``optimize=False``: the same layout, quantized faster), each run through every
registered kernel that can serve it here (``quantkit.set_kernel``). Inputs are float32, calls run
under ``torch.inference_mode()``; a kernel's one-off preparation is done before timing.

All variants of a shape and batch run in one process, their calls interleaved so that a shared
machine's load hits them alike; each time is the best of ``--repeats`` after warm-up, the ratio
``float32 time / variant time`` (above 1: faster than the float layer). Peak RSS: the process's
resident-set high-water mark over one variant's calls (reset through ``/proc/self/clear_refs``),
every layer of the shape included. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from run_log import RunLog  # this folder's scripts import each other when run
from torch import nn

from quantkit import HQQConfig
from quantkit.builtin_backends.eetq.qlinear import EetqLinear
from quantkit.builtin_backends.gguf.qlinear import GGUFLinear
from quantkit.builtin_backends.gptq.backend import packed_module
from quantkit.builtin_backends.gptq.gptq import rtn_quantize
from quantkit.builtin_backends.hqq.layers import quantize_linear as hqq_linear
from quantkit.core.dispatch import set_kernel
from quantkit.core.kernels import check
from quantkit.core.registry import get_registry

RESULTS = Path(__file__).parent / "results" / "kernel_speed.txt"
SHAPES = "576x576,576x1536,1536x576,2048x2048,4096x4096"
"""``in x out``: SmolLM2-135M's attention, MLP up and MLP down, then two Llama-sized squares."""


def build(in_features: int, out_features: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.normal_()
    gptq = packed_module(linear, rtn_quantize(linear.weight.detach(), bits=4, group_size=64, sym=False))
    cpu = torch.device("cpu")
    layers = {"float32": linear, "gptq-4bit-g64": gptq, "eetq-int8": EetqLinear.from_linear(linear, cpu)}
    for qtype in ("Q4_0", "Q4_K", "Q8_0", "Q6_K", "Q2_K"):
        if in_features % 256 == 0 or not qtype.endswith("_K"):
            layers[f"gguf-{qtype.lower()}"] = GGUFLinear.from_linear(linear, qtype)
    for bits, group_size in ((4, 64), (2, 16)):
        config = HQQConfig(nbits=bits, group_size=group_size, optimize=False)
        layers[f"hqq-{bits}bit-g{group_size}"] = hqq_linear(copy.deepcopy(linear), config, cpu)
    return layers


def variants(layers: dict[str, nn.Module], dtype: torch.dtype) -> dict[str, tuple[nn.Module, str | None]]:
    """``label -> (layer, kernel)`` for the float layer and every kernel valid for each quantized one."""
    found = {"float32 F.linear": (layers["float32"], None)}
    for kind, layer in layers.items():
        if kind == "float32":
            continue
        for kernel in get_registry().kernels_for(layer):
            if check(kernel, layer, "cpu", dtype):
                found[f"{kind} {kernel.name}"] = (layer, kernel.name)
    return found


def peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024


def measure(found: dict[str, tuple[nn.Module, str | None]], x: torch.Tensor, repeats: int) -> dict[str, tuple]:
    """Best seconds per call of each variant on ``x`` (calls interleaved), and its peak RSS."""
    best, peak = dict.fromkeys(found, float("inf")), dict.fromkeys(found, 0)
    with torch.inference_mode():
        for _ in range(repeats + 2):
            for label, (layer, kernel) in found.items():
                if kernel is not None:
                    set_kernel(layer, kernel)
                    layer(x)  # choose and prepare: not timed
                peak_rss_reset()
                start = time.perf_counter()
                layer(x)
                best[label] = min(best[label], time.perf_counter() - start)
                peak[label] = max(peak[label], peak_rss_bytes())
    return {label: (best[label], peak[label]) for label in found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES, help="in x out layer shapes, comma-separated")
    parser.add_argument("--batches", default="1,128", help="batch sizes (rows of the input), comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    log = RunLog("kernel_speed.py")
    emit = log.emit
    emit(f"{'shape in x out':<15} {'batch':>5}  {'variant':<34} {'ms':>9} {'vs fp32':>8} {'peak RSS MiB':>12}")
    for shape in args.shapes.split(","):
        in_features, out_features = (int(n) for n in shape.split("x"))
        layers = build(in_features, out_features)
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(batch))
            results = measure(variants(layers, x.dtype), x, args.repeats)
            floor = results["float32 F.linear"][0]
            for label, (seconds, peak) in results.items():
                emit(
                    f"{shape:<15} {batch:>5}  {label:<34} {seconds * 1e3:>9.3f} {floor / seconds:>7.2f}x "
                    f"{peak / 2**20:>12.0f}"
                )
        del layers
    emit("ms: best of the interleaved repeats; vs fp32: float32 F.linear time / variant time (above 1: faster);")
    emit("int4-cpu and int8-cpu compute in bfloat16 (W4A16 / W8A16), gemv-inductor in float32 on int8 codes")
    emit("(above 4 rows it dequantizes, as the reference does); dequantize: the reference, every call;")
    emit("dequantize-cached: the float32 weight kept after the first call (forced only: 4 bytes a weight more).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log.write(args.out)


if __name__ == "__main__":
    main()
