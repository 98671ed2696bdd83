"""Speed and accuracy of weight quantizers on one matrix, one table row per quantizer.

    python benchmarks/quantize_speed.py                          # 4096 x 4096, every GGUF type
    python benchmarks/quantize_speed.py --size 1024 --types Q4_K,Q8_0 --threads 1
    python benchmarks/quantize_speed.py --ggml-lib .../llama_cpp/lib/libggml-base.so

The input is a standard-normal float32 matrix (seed 0). Each row gives the best-of-3
quantization time, the relative error ||W - deq(q(W))||_F / ||W||_F and the storage cost in
bits per weight (bytes of everything the quantizer returns). GGUF types are also timed with a
reference: with ``--ggml-lib`` (llama.cpp's ``libggml-base``, e.g. from ``llama-cpp-python``)
ggml's own ``ggml_quantize_chunk`` on one thread, with the share of identical blocks; else
gguf-py's numpy quantizer where it has one (legacy types: the same bytes). K-quants show the
error of llama.cpp's reference quantizer. Other backends are added as more ``Row`` entries next to
``gguf_rows``. The machine may be shared: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from quantkit.builtin_backends.gguf import quants

# llama.cpp's quantize_row_qX_K_ref on a 4096 x 4096 standard-normal matrix.
LLAMA_CPP_RELATIVE_ERROR = {"Q6_K": 0.0177, "Q5_K": 0.0361, "Q4_K": 0.0714, "Q3_K": 0.151, "Q2_K": 0.297}


class Row(NamedTuple):
    """One quantizer under test: ``quantize(W)`` returns any tensors, ``dequantize`` rebuilds W."""

    name: str
    quantize: Callable[[torch.Tensor], Any]
    dequantize: Callable[[Any], torch.Tensor]
    reference: Callable[[np.ndarray], Any] | None = None  # another implementation, timed alongside
    reference_error: float | None = None  # published error of the method's reference implementation


def gguf_rows(types: list[str], shape: tuple[int, int], ggml: Path | None) -> list[Row]:
    """Rows for GGUF tensor types, with ggml's quantizer from library ``ggml`` as the reference, or
    gguf-py's for the types it implements."""
    rows = []
    for qtype in types:
        reference = None
        if ggml is not None and qtype != "F32":
            reference = partial(ggml_quantize, ctypes.CDLL(str(ggml)), GGMLQuantizationType[qtype].value)
        elif qtype not in LLAMA_CPP_RELATIVE_ERROR and qtype != "F32" and _in_gguf_py(qtype):
            reference = partial(gguf_quants.quantize, qtype=GGMLQuantizationType[qtype])
        rows.append(
            Row(
                name=f"gguf {qtype}",
                quantize=partial(quants.quantize, qtype=qtype),
                dequantize=partial(quants.dequantize, qtype=qtype, shape=shape),
                reference=reference,
                reference_error=LLAMA_CPP_RELATIVE_ERROR.get(qtype),
            )
        )
    return rows


def _in_gguf_py(qtype: str) -> bool:
    """Whether gguf-py has a quantizer for ``qtype`` (the IQ types have none)."""
    try:
        gguf_quants.quantize(np.zeros((1, quants.block_size(qtype)), np.float32), GGMLQuantizationType[qtype])
    except NotImplementedError:
        return False
    return True


def ggml_quantize(library: ctypes.CDLL, ggml_type: int, array: np.ndarray) -> np.ndarray:
    """``array`` (rows, cols) quantized by ggml's ``ggml_quantize_chunk`` (one thread)."""
    chunk = library.ggml_quantize_chunk
    chunk.restype = ctypes.c_size_t
    chunk.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    row_size = library.ggml_row_size
    row_size.restype, row_size.argtypes = ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]
    rows, cols = array.shape
    out = np.empty((rows, row_size(ggml_type, cols)), dtype=np.uint8)
    chunk(ggml_type, array.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    return out


def best_of(repeats: int, fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Shortest wall time of ``repeats`` calls of ``fn(*args)``, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def storage_bits(result: Any) -> int:
    """Bits held by the tensors (or arrays) in a quantizer's result, searched through containers."""
    if isinstance(result, (torch.Tensor, np.ndarray)):
        return result.nbytes * 8
    if isinstance(result, dict):
        return sum(storage_bits(value) for value in result.values())
    if isinstance(result, (list, tuple)):
        return sum(storage_bits(value) for value in result)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="the matrix is size x size (default 4096)")
    parser.add_argument("--types", default=",".join(quants.QUANT_TYPES), help="comma-separated GGUF types")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per quantizer; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--ggml-lib", type=Path, help="llama.cpp's libggml-base: ggml's quantizers as the reference")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    print(f"load average: {load_average()}")

    weight = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    array = weight.numpy()
    rows = gguf_rows([t.strip() for t in args.types.split(",") if t.strip()], tuple(weight.shape), args.ggml_lib)

    widths = [12, 7, 8, 10, 8, 8, 10, 8]
    header = ["quantizer", "bits/w", "seconds", "rel. error", "ref. s", "speedup", "ref. error", "same"]
    print(table_line(header, widths))
    for row in rows:
        seconds, data = best_of(args.repeats, row.quantize, weight)
        error = ((row.dequantize(data) - weight).norm() / weight.norm()).item()
        cells = [row.name, f"{storage_bits(data) / weight.numel():.3f}", f"{seconds:.3f}", f"{error:.4f}", "", ""]
        if row.reference is not None:
            with np.errstate(all="ignore"):
                reference_seconds, theirs = best_of(args.repeats, row.reference, array)
            cells[4:6] = [f"{reference_seconds:.3f}", f"{reference_seconds / seconds:.1f}x"]
        cells.append("" if row.reference_error is None else f"{row.reference_error:.4f}")
        if args.ggml_lib is not None and row.reference is not None:
            size = quants.type_size(row.name.split()[-1])
            same = (data.numpy().reshape(-1, size) == np.asarray(theirs).reshape(-1, size)).all(1).mean()
            cells.append(f"{100 * same:.1f}%")
        cells += [""] * (len(widths) - len(cells))
        print(table_line(cells, widths))
    reference = "ggml_quantize_chunk, 1 thread" if args.ggml_lib else "gguf-py for GGUF legacy types"
    print(f"ref. s: the reference implementation's time ({reference}) and our speedup over it;")
    print("ref. error: the relative error of the method's reference implementation (llama.cpp for K-quants);")
    print("same: the share of ggml blocks identical to the reference's.")
    print(f"load average: {load_average()}")


def table_line(cells: list[str], widths: list[int]) -> str:
    """The first cell left-aligned, the others right-aligned, in columns of ``widths``."""
    first, *rest = zip(cells, widths, strict=True)
    return " ".join([f"{first[0]:<{first[1]}}", *(f"{cell:>{width}}" for cell, width in rest)])


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
