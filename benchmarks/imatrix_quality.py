"""What an importance matrix buys GGUF K-quant mixes on SmolLM2-135M, and quantkit's against llama.cpp's.

    python benchmarks/imatrix_quality.py
    python benchmarks/imatrix_quality.py --llama-python /work/llamacpp-venv/bin/python --mixes Q4_K_M \
        --imatrix imatrix.gguf --ggml-lib .../llama_cpp/lib/libggml-base.so

``quantkit compare``'s protocol (pydoc text; calibration and evaluation splits disjoint; 4096
evaluation tokens in windows of 512; KL divergence and top-1 agreement against the float
model; 2 threads). quantkit collects one importance matrix from the protocol's calibration
windows (16 x 512 tokens, seed 0) on the float model and saves it as a llama.cpp GGUF imatrix;
each mix is quantized without and with it. With ``--llama-python`` (a Python that has
``llama-cpp-python``), llama.cpp's own ``llama_model_quantize`` quantizes quantkit's F16
``.gguf`` export of the same model to Q4_K_M without and with the same matrix (passed as
``llama_model_quantize_params.imatrix``, the means ``in_sum2 / counts`` llama-quantize passes), and
quantkit loads those files and evaluates them the same way.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from run_log import RunLog  # this folder's scripts import each other when run

import quantkit
from quantkit.builtin_backends.gguf.backend import GGUFBackend
from quantkit.builtin_backends.gguf.config import GGUFConfig
from quantkit.builtin_backends.gguf.convert import type_counts
from quantkit.builtin_backends.gguf.header import read_header
from quantkit.builtin_backends.gguf.imatrix import collect_imatrix
from quantkit.builtin_backends.gguf.imatrix_files import load_imatrix
from quantkit.builtin_backends.gguf.quants import dequantize, quantize, type_size
from quantkit.calibration import calibration_tokens, evaluation_tokens
from quantkit.compare.protocol import Protocol
from quantkit.evaluate import evaluate
from quantkit.models import load_model

RESULTS = Path(__file__).parent / "results" / "imatrix_quality.txt"

LLAMA_QUANTIZE = r"""
import ctypes, sys
import numpy as np
import llama_cpp

source, target, ftype, matrix_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
params.nthread = 2
keep = []
if matrix_path != "-":
    arrays = np.load(matrix_path)
    entries = (llama_cpp.llama_model_imatrix_data * (len(arrays.files) + 1))()
    for i, name in enumerate(sorted(arrays.files)):
        values = np.ascontiguousarray(arrays[name], dtype=np.float32)
        keep.append(values)
        entries[i].name = name.encode()
        entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = values.size
    entries[len(arrays.files)].name = None  # the list ends with a null name
    params.imatrix = entries
status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
print("llama.cpp", llama_cpp.__version__, "status", status)
sys.exit(status)
"""
LLAMA_FTYPES = {"Q4_K_M": 15}
"""``llama_ftype`` numbers (llama.h: LLAMA_FTYPE_MOSTLY_Q4_K_M = 15)."""


def score(model, eval_ids, protocol: Protocol, reference: Path) -> dict:
    result = evaluate(model, eval_ids, seqlen=protocol.seqlen, stride=protocol.stride, reference=reference)
    return {"ppl": result.perplexity, "kl": result.kl_divergence, "top1": result.top1_agreement}


def row(log: RunLog, label: str, scores: dict, float_ppl: float, extra: str = "") -> None:
    delta = 100 * (scores["ppl"] / float_ppl - 1)
    kl, top1 = scores["kl"], 100 * scores["top1"]
    log.emit(f"| {label} | {scores['ppl']:.3f} | {delta:+.2f}% | {kl:.4f} | {top1:.1f}% | {extra} |")


def same_blocks(ours: Path, theirs: Path) -> str:
    """Share of identical ggml blocks per type between two .gguf files, over tensors of the same type."""
    a, b = read_header(ours), read_header(theirs)
    same: dict[str, list[int]] = {}
    for name, info in a.tensors.items():
        other = b.tensors.get(name)
        if other is None or other.qtype != info.qtype or info.qtype in ("F32", "F16"):
            continue
        size = type_size(info.qtype)
        x = a.tensor_bytes(info).reshape(-1, size)
        y = b.tensor_bytes(other).reshape(-1, size)
        counts = same.setdefault(info.qtype, [0, 0])
        counts[0] += int((x == y).all(1).sum())
        counts[1] += x.shape[0]
    return ", ".join(f"{t} {100 * s / n:.1f}% of {n}" for t, (s, n) in sorted(same.items()))


GGML_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
"""ggml's ``enum ggml_type`` numbers."""


def ggml_agreement(library: Path, weight: torch.Tensor, values: torch.Tensor, log: RunLog) -> None:
    """quantkit's quantizers against ggml's ``ggml_quantize_chunk`` on ``weight`` with and without
    the importance-matrix ``values``: identical blocks, and quantkit's error over ggml's."""
    chunk = ctypes.CDLL(str(library)).ggml_quantize_chunk
    chunk.restype = ctypes.c_size_t
    chunk.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    rows, cols = weight.shape
    log.emit("")
    log.emit(f"quantkit vs ggml_quantize_chunk on blk.0.ffn_down ({rows} x {cols}): identical blocks, and")
    log.emit("quantkit's error sum(imatrix * (w - q)^2) (without one: sum (w - q)^2) over ggml's")
    for name, number in GGML_TYPES.items():
        cells = []
        for imatrix in (None, values):
            theirs = np.zeros(quantize(weight[:1], name).numel() * rows, dtype=np.uint8)
            pointer = None if imatrix is None else imatrix.numpy().ctypes.data
            chunk(number, weight.numpy().ctypes.data, theirs.ctypes.data, 0, rows, cols, pointer)
            ours = quantize(weight, name, imatrix).reshape(-1)
            size = type_size(name)
            same = (ours.numpy().reshape(-1, size) == theirs.reshape(-1, size)).all(1).mean()
            scale = torch.ones(cols) if imatrix is None else imatrix
            ours_error, theirs_error = (
                float((scale * (dequantize(b, name, weight.shape) - weight).square()).sum())
                for b in (ours, torch.from_numpy(theirs))
            )
            label = "without" if imatrix is None else "with imatrix"
            ratio = f"x{ours_error / theirs_error:.5f}" if theirs_error else f"{ours_error:.3g} vs 0"
            cells.append(f"{label}: {100 * same:.1f}% identical, error {ratio}")
        log.emit(f"  {name}: " + "; ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixes", default="Q2_K,Q3_K_M,Q4_K_M")
    parser.add_argument("--nsamples", type=int, default=Protocol.calibration_samples)
    parser.add_argument("--imatrix", type=Path, help="use this imatrix file instead of collecting one")
    parser.add_argument("--llama-python", help="a Python with llama-cpp-python, for llama.cpp's own quantizer")
    parser.add_argument("--ggml-lib", type=Path, help="libggml-base.so, to compare quantizers with ggml_quantize_chunk")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    protocol = Protocol()
    torch.set_num_threads(protocol.threads)
    log = RunLog("imatrix_quality.py")
    log.emit(f"protocol: {protocol.describe()}")

    model, tokenizer = load_model()
    calibration = calibration_tokens(
        tokenizer, protocol.dataset, nsamples=args.nsamples, seqlen=protocol.calibration_seqlen, seed=protocol.seed
    )
    eval_ids = evaluation_tokens(tokenizer, protocol.dataset, max_tokens=protocol.eval_tokens)
    work = Path(tempfile.mkdtemp(prefix="imatrix-quality-"))
    reference = work / "reference.npy"
    float_ppl = evaluate(
        model, eval_ids, seqlen=protocol.seqlen, stride=protocol.stride, write_reference=reference
    ).perplexity
    log.emit(f"float32 perplexity: {float_ppl:.3f}")

    if args.imatrix:
        imatrix_file, matrix = args.imatrix, load_imatrix(args.imatrix)
        log.emit(f"importance matrix: {len(matrix.names())} entries read from {imatrix_file} ({matrix.datasets})")
    else:
        start = time.perf_counter()
        targets = GGUFBackend().targets(model, GGUFConfig())
        matrix = collect_imatrix(model, calibration, targets, dataset=f"{protocol.dataset} (calibration split)")
        imatrix_file = matrix.save(work / "imatrix.gguf")
        log.emit(
            f"importance matrix: {len(matrix.names())} entries from {calibration.shape[0]} x {calibration.shape[1]} "
            f"tokens in {time.perf_counter() - start:.1f} s (quantkit, layer by layer on the float model), "
            f"saved as {imatrix_file}"
        )

    log.emit("")
    log.emit("| model | perplexity | Δppl | KL | top-1 | notes |")
    log.emit("|---|---|---|---|---|---|")
    log.emit(f"| float32 | {float_ppl:.3f} | - | - | - | |")
    results: dict[str, dict] = {}
    for mix in args.mixes.split(","):
        for label, source in (("", None), (" + imatrix", str(imatrix_file))):
            config = GGUFConfig(quant_type=mix, imatrix=source)
            start = time.perf_counter()
            quantized = quantkit.quantize(copy.deepcopy(model), config)
            seconds = time.perf_counter() - start
            results[mix + label] = scores = score(quantized, eval_ids, protocol, reference)
            row(log, f"quantkit {mix}{label}", scores, float_ppl, f"quantize {seconds:.1f} s; {type_counts(quantized)}")
            if mix == "Q4_K_M" and source is not None and args.llama_python:
                quantkit.save(quantized, work / "quantkit-q4_k_m-imatrix.gguf", tokenizer=tokenizer)
            del quantized

    if args.llama_python:
        f16 = quantkit.quantize(copy.deepcopy(model), GGUFConfig(quant_type="F16"))
        quantkit.save(f16, work / "f16.gguf", tokenizer=tokenizer)
        del f16
        np.savez(work / "imatrix.npz", **{name: matrix.values(name).numpy() for name in matrix.names()})
        script = work / "llama_quantize.py"
        script.write_text(LLAMA_QUANTIZE)
        for label, values in (("", "-"), (" + imatrix", str(work / "imatrix.npz"))):
            out = work / f"llama-q4_k_m{label.replace(' + ', '-')}.gguf"
            start = time.perf_counter()
            done = subprocess.run(
                [args.llama_python, str(script), str(work / "f16.gguf"), str(out), str(LLAMA_FTYPES["Q4_K_M"]), values],
                capture_output=True,
                text=True,
            )
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                log.emit(f"| llama.cpp Q4_K_M{label} | failed: {done.stdout[-300:]} {done.stderr[-500:]} |")
                continue
            loaded = quantkit.load(out)
            results["llama.cpp Q4_K_M" + label] = scores = score(loaded, eval_ids, protocol, reference)
            version = done.stdout.strip().splitlines()[-1]
            row(log, f"llama.cpp Q4_K_M{label}", scores, float_ppl, f"quantize {seconds:.1f} s; {version}")
            del loaded
        ours = results.get("Q4_K_M + imatrix")
        theirs = results.get("llama.cpp Q4_K_M + imatrix")
        if ours and theirs:
            log.emit("")
            log.emit(
                f"Q4_K_M with the same matrix: quantkit perplexity {ours['ppl']:.3f} / llama.cpp "
                f"{theirs['ppl']:.3f} = {ours['ppl'] / theirs['ppl']:.4f}"
            )
            mine, other = work / "quantkit-q4_k_m-imatrix.gguf", work / "llama-q4_k_m-imatrix.gguf"
            log.emit(f"identical ggml blocks, quantkit vs llama.cpp (Q4_K_M + imatrix): {same_blocks(mine, other)}")

    if args.ggml_lib:
        weight = model.get_submodule("model.layers.0.mlp.down_proj").weight.detach().float().contiguous()
        ggml_agreement(args.ggml_lib, weight, matrix.values("blk.0.ffn_down.weight").contiguous(), log)
    log.emit("")
    log.emit("json: " + json.dumps(results))
    log.write(args.out)


if __name__ == "__main__":
    main()
