"""Estimator: exact stored size per format, and the time and peak memory of quantizing.

Popular rounded figures ("a 7B model takes 3.5 GB in 4-bit") count 4 bits per
weight and nothing else. Real formats also store scales, zero points and
indices: bitsandbytes NF4 with 64-element blocks stores a float32 absmax per
block (4 + 32/64 = 4.5 bits), double quantization shrinks that to
4 + 8/64 + 32/(64*256) = 4.127 bits, GPTQ 4-bit group 128 stores a float16
scale and a packed 4-bit zero per group plus an int32 ``g_idx`` per input
column. Sizes are reported in both GB (1e9) and GiB (2**30), which the rounded
figures also mix up.

:func:`estimate_quantization` predicts how long ``quantkit.quantize`` (or, with
``streaming=True``, ``quantkit.quantize_streaming``) will take and its peak memory, by what
holds it (:attr:`QuantizeEstimate.memory`). It counts the work in four units: matrix-multiply FLOPs (the
forward passes over the calibration tokens, GPTQ's Hessians and solves, AWQ's
scale and clip searches), elementwise elements (norms, rotary embeddings,
softmax, quantizing and packing the weights), small torch operations (GPTQ's
column loop, per-chunk overheads) and, streamed, the bytes read from the checkpoint
and written out (plus the time this call took to build the architecture from config.json, which
the run spends again), and prices each at a rate measured on the
device and its disk (:func:`measure_rates`, about 0.5 s) or, for short jobs, at
:data:`REFERENCE_RATES`. At those it reproduces the committed SmolLM2-135M GPTQ
and AWQ timings within 10 % and 25 %; against real runs in fresh processes see
``benchmarks/estimate_accuracy.py`` and its committed results. With measured rates, a
calibration-free method's weights are priced at its own quantizer's speed, timed on one weight of
the model's commonest shape (:func:`measure_quantizer`, up to ~1 s).

The streamed peak (``streaming=True``) is the process and the largest of what one step holds
(the shard writer's copy buffer, when it moves a closed shard's data after its header, is a step of
its own): a weight's quantized copy with
the working memory its backend declares (:meth:`~quantkit.core.backend.Backend.working_bytes`;
calibration-free: the stored weights are memory-mapped, page cache rather than process memory,
and modules copied through go in the writer's pieces), or, layer by layer (GPTQ, AWQ), the
calibration activations while the (mapped) embedding captures the first layer's inputs, then one
decoder layer copied into memory in its stored dtype with its quantized linears, the calibration
hidden states and the method's working memory. ``spill=True`` counts the hidden
states kept on disk (:data:`quantkit.layerwise.SPILL_ATTR`): one chunk of them in memory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import mmap
import os
import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, astuple, dataclass, replace
from pathlib import Path

import torch
from huggingface_hub import get_safetensors_metadata, hf_hub_download
from huggingface_hub.errors import NotASafetensorsRepoError
from torch import nn

from .core.backend import Backend
from .core.config import QuantConfig
from .core.errors import ConfigValueError, ModelFormatError, UnknownMethodError
from .core.linears import ROW_BLOCK_ELEMENTS, Target, quantizable_linears
from .core.registry import get_registry
from .core.safetensors_files import DTYPES, stored_tensors
from .core.shard_writer import COPY_BYTES
from .layerwise import DEFAULT_CHUNK_TOKENS, HESSIAN_BLOCK_BYTES, LLAMA_GROUPS, decoder_stack

FLOAT_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}
TYPICAL_SHAPE = (4096, 4096)
"""Layer shape assumed when only a parameter count is known (Llama-7B's attention)."""


@dataclass(frozen=True)
class Estimate:
    """Predicted storage of a model: quantized linears plus everything else."""

    params: int
    quantized_params: int
    quantized_bits: int
    other_bits: int
    code_bits: float | None = None
    """Mean width of the weight codes over the quantized linears (scales and zeros left out)."""

    @property
    def bits_per_param(self) -> float:
        """Bits per parameter of the quantized linears as stored."""
        return self.quantized_bits / self.quantized_params if self.quantized_params else 0.0

    @property
    def total_bytes(self) -> int:
        return (self.quantized_bits + self.other_bits + 7) // 8

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "quantized_params": self.quantized_params,
            "bits_per_param": self.bits_per_param,
            "total_bytes": self.total_bytes,
            "total_gb": self.total_bytes / 1e9,
            "total_gib": self.total_bytes / 2**30,
            "code_bits": self.code_bits,
        }


def parse_params(value: int | float | str) -> int:
    """``7B``, ``13b``, ``135M``, ``70e9`` or a plain number of parameters."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", value.lower())
    if not match:
        raise ConfigValueError("estimate", "params", value, "a number with an optional K/M/B/T suffix, e.g. 7B")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2)]
    return int(float(match.group(1)) * scale)


def layer_bits(config: QuantConfig | None, name: str, out_features: int, in_features: int, float_bits: int) -> int:
    """Stored bits of one linear under ``config`` (``None``: unquantized)."""
    if config is None:
        return out_features * in_features * float_bits
    backends = get_registry().backends_for_method(config.quant_method)
    if not backends:
        raise UnknownMethodError(config.quant_method, get_registry().config_classes())
    return backends[0].storage_bits(config, name, out_features, in_features)


def estimate(
    params: int | str | None = None,
    config: QuantConfig | None = None,
    *,
    model_config: str | os.PathLike | dict | None = None,
    dtype: str = "float16",
) -> Estimate:
    """Predict the stored size of a model quantized with ``config``.

    With ``model_config`` (a ``config.json`` path, folder, dict or hub id), every
    linear is counted at its real shape and the rest (embeddings, norms,
    skipped modules) at ``dtype``. With only ``params``, all parameters are
    taken as linears of :data:`TYPICAL_SHAPE`.
    """
    if dtype not in FLOAT_BITS:
        raise ConfigValueError("estimate", "dtype", dtype, ", ".join(FLOAT_BITS))
    float_bits = FLOAT_BITS[dtype]
    if model_config is not None:
        return _estimate_model(_read_model_config(model_config), config, float_bits)
    if params is None:
        raise ConfigValueError("estimate", "params", None, "a parameter count or a model_config")
    count = parse_params(params)
    out_f, in_f = TYPICAL_SHAPE
    bits = layer_bits(config, "", out_f, in_f, float_bits) * count / (out_f * in_f)
    return Estimate(count, count, round(bits), 0)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""A model hub repository id (``owner/name``): read when no local path has that name."""


def _read_model_config(source: str | os.PathLike | dict) -> dict:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.exists():
        path = path / "config.json" if path.is_dir() else path
        return json.loads(path.read_text())
    if HUB_ID.fullmatch(str(source)):
        with _from_hub(str(source), "config.json"):
            return json.loads(Path(hf_hub_download(str(source), "config.json")).read_text())
    raise ModelFormatError(f"{str(source)!r} is neither a config.json, a model folder nor a hub id (owner/name)")


@contextlib.contextmanager
def _from_hub(repo: str, what: str) -> Iterator[None]:
    """Hub failures (offline, gated, no such model) as a :class:`ModelFormatError` naming ``repo``."""
    try:
        yield
    except Exception as exc:
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ModelFormatError(
            f"could not read the {what} of hub model {repo!r} (offline, gated, or no such model?): {reason}"
        ) from exc


def _stored_dtypes(source: str | os.PathLike | dict) -> Counter[torch.dtype]:
    """Parameters per float dtype in the checkpoint's safetensors headers: a local folder's (or a
    ``config.json``'s folder's), or a hub model's (its headers only); empty without any."""
    counts: Counter[torch.dtype] = Counter()
    if isinstance(source, dict):
        return counts
    folder = Path(source)
    if folder.exists():
        folder = folder if folder.is_dir() else folder.parent
        for tensor in stored_tensors(folder).values() if any(folder.glob("*.safetensors")) else ():
            if tensor.dtype.is_floating_point:
                counts[tensor.dtype] += tensor.numel
        return counts
    with _from_hub(str(source), "safetensors headers"):
        try:
            per_dtype = get_safetensors_metadata(str(source)).parameter_count
        except NotASafetensorsRepoError:  # .bin weights only: config.json's torch_dtype tells
            return counts
    stored = {DTYPES[name]: n for name, n in per_dtype.items() if name in DTYPES}
    counts.update({dtype: n for dtype, n in stored.items() if dtype.is_floating_point})
    return counts


def stored_model(source: str | os.PathLike | dict) -> nn.Module:
    """The architecture of a float checkpoint (folder, ``config.json``, its dict or a hub id) on the
    meta device, its parameters in their stored dtype: the one most of the safetensors headers'
    float tensors name when there are headers, else config.json's ``torch_dtype`` (float32 without
    one)."""
    raw = _read_model_config(source)
    counts = _stored_dtypes(source)
    if counts:
        dtype = counts.most_common(1)[0][0]
    else:
        name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        if name not in FLOAT_BITS:
            raise ConfigValueError("estimate", "torch_dtype", name, ", ".join(FLOAT_BITS))
        dtype = getattr(torch, name)
    return _meta_model(raw).to(dtype)


def _meta_model(raw: dict) -> nn.Module:
    """The architecture a ``config.json`` describes, without weights (on the meta device)."""
    import transformers

    raw = {k: v for k, v in raw.items() if k != "quantization_config"}
    hf_config = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config)


def _estimate_model(raw: dict, config: QuantConfig | None, float_bits: int) -> Estimate:
    return _stored_size(_meta_model(raw), config, float_bits)


def _stored_size(model: nn.Module, config: QuantConfig | None, float_bits: int) -> Estimate:
    """What ``model`` quantized with ``config`` stores, its unquantized tensors at ``float_bits``."""
    total = sum(p.numel() for p in model.parameters())
    targets = (
        quantizable_linears(model, config)
        if config is not None
        else [(n, m, None) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    )
    quantized_params = sum(m.weight.numel() for _, m, _ in targets)
    backends = get_registry().backends_for_method(config.quant_method) if config is not None else []
    with backends[0].storage_context(model) if backends else nullcontext():
        quantized_bits = sum(layer_bits(c, n, m.out_features, m.in_features, float_bits) for n, m, c in targets)
        widths = (
            [(backends[0].code_bits(c, n, m.out_features, m.in_features), m.weight.numel()) for n, m, c in targets]
            if backends
            else []
        )
        quantized_weights = {id(m.weight) for _, m, _ in targets}  # by identity: a tied head is the embedding
        other_bits = sum(
            backends[0].other_bits(config, model, n, p, float_bits) if backends else p.numel() * float_bits
            for n, p in model.named_parameters()
            if id(p) not in quantized_weights
        )
    code_bits = None
    if widths and quantized_params and all(w is not None for w, _ in widths):
        code_bits = sum(w * count for w, count in widths) / quantized_params
    return Estimate(total, quantized_params, quantized_bits, other_bits, code_bits)


# -- time and peak memory of quantizing --------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """How fast a device does each kind of work :class:`Work` counts."""

    flops: float
    """Float32 matrix-multiply FLOP/s."""
    elements: float
    """Elements per second of elementwise (memory-bound) work."""
    op_seconds: float
    """Seconds per operation on a mid-size tensor (its fixed cost)."""
    small_op_seconds: float
    """Seconds per operation on a tiny tensor (one thread: the dispatch cost)."""
    read_bytes: float = 790e6
    """Bytes per second read from a file not in the page cache (a streamed run's checkpoint)."""
    write_bytes: float = 1.0e9
    """Bytes per second written to a file and synced (a streamed run's output)."""
    half_flops: float = 260e9
    """Bfloat16 matrix-multiply FLOP/s: the forward passes of a streamed bfloat16 model."""
    weight_elements: float | None = None
    """Elements per second of the quantizer being estimated, in :data:`WEIGHT_ELEMENTS`' counts, timed
    on a probe weight (:func:`measure_quantizer`); ``None``: priced at :attr:`elements`."""
    device: str | None = None
    """Where these were measured; ``None`` for :data:`REFERENCE_RATES`."""


REFERENCE_RATES = Rates(flops=114e9, elements=1.3e9, op_seconds=20e-6, small_op_seconds=4e-6)
"""This project's 2-core CPU, quiet: the GEMM rate of ``benchmarks/results/calibration_speed.txt``
(its bfloat16 GEMMs, AVX512-BF16, run 2.3x as fast: 386 against 165 GFLOP/s at 1024 x 4096 x 14336),
operation costs as timed there (an operation on 2**17 floats, on 512), and the elementwise rate
that, with the counts below, reproduces its GPTQ times at 16 and 128 samples of 512 tokens
(103 s and 634 s); the disk rates are :class:`Rates`' defaults (``dd`` read the 2.5 GB Llama-3.2-1B
checkpoint at 790 MB/s once the page cache was dropped; :func:`measure_disk` wrote at 0.45-1.6 GB/s).
Used for jobs predicted shorter than :data:`MEASURE_ABOVE_SECONDS`."""

WRITES_PER_OUTPUT_BYTE = 2
"""A streamed run writes each output byte twice: into the shard's scratch file as its tensor is
quantized, then after the header once the shard is complete (:class:`~quantkit.core.shard_writer.ShardWriter`)."""
ELEMENTWISE_PROBE = 2**24
"""Elements of the float32 tensor :func:`measure_rates` multiplies (64 MiB, into another: past the
caches, as a large weight's passes are; 16 MiB ones ran from the 32 MiB cache at twice the rate)."""
REFERENCE_ELEMENTWISE = 3.6e9
"""Elements per second of that multiplication on this project's 2-core CPU, quiet (the median of 9;
2.9-4.0e9 in four runs a minute apart: memory bandwidth shared with other machines)."""
DISK_PROBE_BYTES = 64 << 20
"""Bytes :func:`measure_disk` writes and reads back."""

PROBE_WEIGHTS = 2**24
"""The most weights :func:`measure_quantizer` times a quantizer on (a 4096 x 4096 weight)."""
MEASURE_ABOVE_SECONDS = 5.0
"""A prediction longer than this at :data:`REFERENCE_RATES` is redone at measured rates."""

PROCESS_BYTES = 320 * 2**20
"""Anonymous memory of a Python process that imported torch, transformers and quantkit and built the
model's architecture: 320-330 MiB measured (RssAnon) before a streamed run's first module on
Llama-3.2-1B shapes, 170 MiB of it after the imports alone."""
# Elementwise work per token of one decoder layer's forward pass besides its matmuls: norms,
# residuals and rotary embeddings (~ hidden), the MLP's activation (~ mlp), the attention's
# mask and softmax (~ heads x seqlen scores); and its torch operations, paid once per chunk.
FORWARD_ELEMENTS_PER_HIDDEN = 16
FORWARD_ELEMENTS_PER_MLP = 4
FORWARD_ELEMENTS_PER_SCORE = 6
FORWARD_OPS = 100
CACHED_SCORE_BYTES = 32 * 2**20
"""A chunk whose attention scores fit in this many bytes (AWQ's 1024-token chunks) does its
softmax ~5x faster per score than GPTQ's 8192-token chunks (fitted to the reference runs)."""
DEQUANTIZE_ELEMENTS = 10
"""Per weight: a packed linear dequantizes its weight at every forward call."""
DEQUANTIZE_BYTES = 8
"""Per weight of the largest linear: what a packed linear's forward over a calibration chunk holds
while it dequantizes its weight for a bfloat16 GEMM (integer codes, float32 values, the bfloat16
copy): 448 MiB for an AWQ 14336 x 4096 linear over 1024 rows."""
KERNEL_STATE_BYTES = 0.5
"""Per weight: what a packed linear's kernel prepares at its first forward and keeps while the
layer lives (``int4-cpu``: the codes repacked for torch's int4 operator)."""

GPTQ_SOLVE_ELEMENTS = 128
"""Per weight: the lazy-batch column updates of GPTQ's solve (half a 128-column block each)."""
GPTQ_MSE_ELEMENTS = 27 * 7
"""Per weight with ``mse > 0``: the 27 candidate ranges of the coarse-to-fine grid each quantize the
group once (~7 elementwise passes, the power counted as more); fits the one-thread solve times of
``benchmarks/gptq_reference.py --solve-only``."""
GPTQ_COLUMN_OPS = 30
"""Small operations per input column of GPTQ's column loop (which runs on one thread)."""
PACK_ELEMENTS = 40
"""Per weight: rounding, packing and checking a layer's integer codes."""
LINEAR_OPS = 30
"""Operations to quantize, pack and swap one linear (or one step of a search over it)."""
AWQ_GRID = 20
"""Points of AWQ's scale search; its clip search tries half as many shrinks."""
AWQ_FAKE_QUANTIZE_ELEMENTS = 2
"""Per weight and grid point: quantize-dequantize of the scaled weights."""
AWQ_CLIP_ELEMENTS = 5
"""Per weight and shrink: clamp, quantize and compare in the clip search (its 8 MiB chunks stay in
cache: 8.2-8.9 s for a Llama-3.1-8B layer's 197M clipped weights, 2.6 s of it the error products)."""
AWQ_CLIP_VALUES = 2**21
"""AWQ's clip search works in chunks of this many values per tensor
(``quantkit.builtin_backends.awq.awq.CLIP_CHUNK_VALUES``), 5 of them live at once."""
AWQ_PACK_ELEMENTS = 15
"""Per weight: AWQ quantizing and packing a linear a block of rows at a time (2.2 s for a
Llama-3.1-8B layer)."""
ROW_BLOCKS_LIVE = 4
"""Row blocks (:func:`quantkit.core.linears.row_blocks`) a blockwise step holds at once, as int64
(packing) at most."""

WEIGHT_ELEMENTS = {"bitsandbytes": (26, 26), "rtn": (14, 18), "gguf": (52, 52), "hqq": (118, 70)}
"""Per weight, quantizing one weight with the calibration-free methods: ``(a weight whose float32
copy fits in :data:`CACHED_WEIGHT_BYTES`, a larger one)``, from each backend's ``quantize_linear``
timed on the quiet 2-core CPU at SmolLM2's and Llama-3.2-1B's shapes (bfloat16 and float32 inputs;
ns per weight: RTN 8-12 / 13-14, NF4 19-22 / 20, GGUF Q4_K 40-42 / 45-49 and Q6_K 36 / 27) times
:data:`REFERENCE_RATES`' elementwise rate. HQQ 4-bit g64 (78 ns at 576 x 1536 alone; 46.7 inside
a streamed Llama-3.1-8B run, all its linears: its optimizer's slabs stay in the caches, and a small
weight pays the slabs' per-call costs) was timed on a later host, times the rate
:func:`measure_rates` found there (1.51e9). Other methods count as ``rtn``. Measured rates time the
quantizer itself (:func:`measure_quantizer`): these counts then set only how a weight's cost
changes past the caches."""
CACHED_WEIGHT_BYTES = 8 << 20
"""A weight whose float32 copy is at most this large is quantized at the first rate of
:data:`WEIGHT_ELEMENTS`."""


@dataclass(frozen=True)
class Work:
    """Work in the units :class:`Rates` prices: matmul FLOPs, elementwise elements, operations
    on mid-size tensors (each pays a fixed cost), small single-thread operations, bytes read
    from and written to disk, and a calibration-free quantizer's elements."""

    flops: float = 0.0
    elements: float = 0.0
    ops: float = 0.0
    small_ops: float = 0.0
    read_bytes: float = 0.0
    write_bytes: float = 0.0
    weight_elements: float = 0.0
    """A calibration-free quantizer's elementwise work (:data:`WEIGHT_ELEMENTS`)."""
    half_flops: float = 0.0
    """Matmul FLOPs in bfloat16 (a streamed bfloat16 model's forward passes)."""
    wall: float = 0.0
    """Seconds timed while estimating that the run spends again (building the architecture from
    config.json, transformers' modeling imports included)."""

    def __add__(self, other: Work) -> Work:
        return Work(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def __mul__(self, factor: float) -> Work:
        return Work(*(a * factor for a in astuple(self)))

    __rmul__ = __mul__

    def seconds(self, rates: Rates) -> float:
        return (
            self.flops / rates.flops
            + self.elements / rates.elements
            + self.ops * rates.op_seconds
            + self.small_ops * rates.small_op_seconds
            + self.read_bytes / rates.read_bytes
            + self.write_bytes / rates.write_bytes
            + self.weight_elements / (rates.weight_elements or rates.elements)
            + self.half_flops / rates.half_flops
            + self.wall
        )


@dataclass(frozen=True)
class QuantizeEstimate:
    """Predicted wall time and peak memory of one ``quantkit.quantize`` call."""

    method: str
    parts: dict[str, Work]
    rates: Rates
    memory: dict[str, int]
    """The peak memory in bytes by what holds it (``"process"``, ``"model"``, ``"hidden states"`` ...)."""
    calibration: tuple[int, int] | None = None
    """``(nsamples, seqlen)`` of the calibration tokens, for methods that calibrate."""
    streaming: bool = False
    """Whether this predicts ``quantkit.quantize_streaming`` (else ``quantkit.quantize``)."""
    spill: bool = False
    """Whether the calibration hidden states are counted on disk (one chunk in memory)."""

    @property
    def peak_bytes(self) -> int:
        return sum(self.memory.values())

    def dominant(self, count: int = 2) -> str:
        """The ``count`` largest parts of the peak: ``"model 1.2 GiB, hidden states 0.4 GiB"``."""
        largest = sorted(self.memory.items(), key=lambda item: -item[1])[:count]
        return ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in largest)

    @property
    def seconds(self) -> float:
        return sum(work.seconds(self.rates) for work in self.parts.values())

    @property
    def flops(self) -> float:
        """Matmul FLOPs, float32 and bfloat16."""
        return sum(work.flops + work.half_flops for work in self.parts.values())

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "seconds": self.seconds,
            "peak_bytes": self.peak_bytes,
            "memory": dict(self.memory),
            "streaming": self.streaming,
            "spill": self.spill,
            "flops": self.flops,
            "calibration": list(self.calibration) if self.calibration else None,
            "part_seconds": {name: work.seconds(self.rates) for name, work in self.parts.items()},
            "rates": asdict(self.rates),
        }

    def summary(self) -> str:
        """One line: what, how long, how much memory, and the counted work behind it."""
        what = self.method + (" (streamed)" if self.streaming else "")
        if self.calibration:
            what += f" on {self.calibration[0]} x {self.calibration[1]} calibration tokens"
            what += " (activations on disk)" if self.spill else ""
        where = f"measured on {self.rates.device}" if self.rates.device else "reference CPU"
        return (
            f"{what}: predicted {format_seconds(self.seconds)}, peak memory {self.peak_bytes / 2**30:.1f} GiB "
            f"({self.flops / 1e12:.2g} TFLOP at {self.rates.flops / 1e9:.0f} GFLOP/s, {where})"
        )


def format_seconds(seconds: float) -> str:
    """``0.4 s``, ``12 s``, ``3 min 05 s``, ``1 h 20 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


@functools.cache
def measure_rates(device: str = "cpu", disk: bool = False) -> Rates:
    """Rates of ``device`` (once per process, ~0.5 s on a CPU): the matmul rates of a
    calibration-shaped product in float32 and bfloat16, the rate of an elementwise operation on a weight-sized tensor
    (elementwise work is priced at :data:`REFERENCE_RATES`' rate times the measured one's ratio
    to :data:`REFERENCE_ELEMENTWISE`), mid-size operations taken to speed up with the matmul
    rate, the cost of a tiny operation, and with ``disk`` (what a streamed run reads and writes)
    the disk (:func:`measure_disk`, 64 MiB written; else :data:`REFERENCE_RATES`' disk). (Timings swing by
    100x on a shared machine, where each multi-threaded operation may wait milliseconds for a
    descheduled thread: an oversubscribed CPU runs small models several times slower than
    predicted.)"""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def median_seconds(fn: Callable[[], object], repeats: int = 7) -> float:
        fn()
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    a, b = torch.randn(2048, 576, device=dev), torch.randn(576, 1536, device=dev)
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1] / median_seconds(lambda: a @ b)
    a16, b16 = a.bfloat16(), b.bfloat16()
    half_flops = 2 * a.shape[0] * a.shape[1] * b.shape[1] / median_seconds(lambda: a16 @ b16)
    x, y = torch.randn(ELEMENTWISE_PROBE, device=dev), torch.empty(ELEMENTWISE_PROBE, device=dev)
    elementwise = ELEMENTWISE_PROBE / median_seconds(lambda: torch.mul(x, 1.5, out=y), 9)
    v, n = torch.zeros(512, device=dev), 100

    def small_ops() -> None:
        for _ in range(n):
            v.add_(1.0)

    read, write = measure_disk() if disk else (REFERENCE_RATES.read_bytes, REFERENCE_RATES.write_bytes)
    return Rates(
        flops,
        REFERENCE_RATES.elements * elementwise / REFERENCE_ELEMENTWISE,
        REFERENCE_RATES.op_seconds * REFERENCE_RATES.flops / flops,
        median_seconds(small_ops) / n,
        read,
        write,
        half_flops,
        device=str(dev),
    )


def measure_disk(directory: str | os.PathLike | None = None, size: int = DISK_PROBE_BYTES) -> tuple[float, float]:
    """Bytes per second written (and synced) to, then read back from a temporary file of ``size``
    bytes in ``directory`` (the temporary folder by default), its pages dropped from the page
    cache in between (``posix_fadvise``; where that is missing the read is a cached one). It is read
    as a streamed run reads a checkpoint: mapped copy-on-write, each page faulted in by a torch
    operation over a tensor on the mapping."""
    data = os.urandom(1 << 20) * (size >> 20)
    with tempfile.NamedTemporaryFile(dir=directory) as file:
        start = time.perf_counter()
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
        write = len(data) / (time.perf_counter() - start)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            pages = torch.frombuffer(mapped, dtype=torch.uint8)
            for piece in pages.split(8 << 20):
                piece.max()
            del pages, piece
        read = len(data) / (time.perf_counter() - start)
    return read, write


@dataclass(frozen=True)
class _Decoder:
    """Forward costs per token of one Llama-family decoder layer at a sequence length."""

    layers: int
    heads: int
    hidden: int
    mlp: int
    q_out: int
    shapes: dict[str, tuple[int, int]]
    """``(out, in)`` of each linear of a layer, by name in the layer (``mlp.down_proj``)."""
    seqlen: int = 0
    chunk_tokens: int = 0
    """Tokens that go through a layer together."""
    bfloat16: bool = False
    """Whether the layers compute in bfloat16 (a streamed bfloat16 checkpoint), else in float32."""

    def linears(self, names: tuple[str, ...]) -> float:
        return 2.0 * sum(out * inp for out, inp in (self.shapes[n] for n in names))

    @property
    def attention(self) -> float:
        return 4.0 * self.q_out * self.seqlen  # scores and weighted sum, full matrices

    @property
    def layer_flops(self) -> float:
        return self.linears(tuple(self.shapes)) + self.attention

    def forward(self, flops: float) -> Work:
        """Work per token of the part of a layer's forward that does ``flops`` of matmuls:
        its share of the layer's elementwise work and operations (per chunk) goes with it."""
        share = flops / self.layer_flops
        per_score = FORWARD_ELEMENTS_PER_SCORE
        if self.chunk_tokens * self.heads * self.seqlen * 4 <= CACHED_SCORE_BYTES:
            per_score /= 5
        elements = (
            FORWARD_ELEMENTS_PER_HIDDEN * self.hidden
            + FORWARD_ELEMENTS_PER_MLP * self.mlp
            + per_score * self.heads * self.seqlen
        )
        matmuls = Work(half_flops=flops) if self.bfloat16 else Work(flops)
        return matmuls + Work(elements=share * elements, ops=share * FORWARD_OPS)

    def before(self, group: int) -> float:
        """Matmul FLOPs per token of a layer's forward up to the input of ``LLAMA_GROUPS[group]``."""
        flops = sum(self.linears(g.names) for g in LLAMA_GROUPS[:group])
        return flops + (self.attention if group > 0 else 0.0)

    def inspected(self, group: int) -> float:
        """Matmul FLOPs per token of the module AWQ's scale search runs for ``LLAMA_GROUPS[group]``."""
        inspect = LLAMA_GROUPS[group].inspect
        if inspect is None:
            return self.linears(LLAMA_GROUPS[group].names)
        names = tuple(n for n in self.shapes if n.startswith(inspect + "."))
        return self.linears(names) + (self.attention if inspect == "self_attn" else 0.0)


def _passes(per_token: Work, tokens: int, chunks: int) -> Work:
    """``per_token`` over ``tokens`` in ``chunks``: operations are paid per chunk, not per token."""
    return replace(per_token * tokens, ops=per_token.ops * chunks)


def _layer_targets(model: nn.Module, config: QuantConfig) -> tuple[_Decoder, list[dict[str, tuple[int, int]]]]:
    """The decoder's shapes (sequence length unset) and the quantized linears of each layer."""
    stack = decoder_stack(model)
    per_layer: list[dict[str, tuple[int, int]]] = [{} for _ in stack.layers]
    for name, linear, _ in quantizable_linears(model, config):
        head, _, rest = name.removeprefix(stack.prefix).partition(".")
        index, _, relative = rest.partition(".")
        if head == "layers" and index.isdigit():
            per_layer[int(index)][relative] = (linear.out_features, linear.in_features)
    first = stack.layers[0]
    shapes = {n: (m.out_features, m.in_features) for n, m in first.named_modules() if isinstance(m, nn.Linear)}
    decoder = _Decoder(
        layers=len(stack.layers),
        heads=model.config.num_attention_heads,
        hidden=model.config.hidden_size,
        mlp=shapes["mlp.up_proj"][0],
        q_out=shapes["self_attn.q_proj"][0],
        shapes=shapes,
    )
    return decoder, per_layer


def _groups(targets: Mapping[str, tuple[int, int]]) -> list[tuple[int, list[str]]]:
    """``(index in LLAMA_GROUPS, quantized members)`` of a layer's groups with any."""
    found = [(i, [n for n in g.names if n in targets]) for i, g in enumerate(LLAMA_GROUPS)]
    return [(i, members) for i, members in found if members]


def _weights(targets: Mapping[str, tuple[int, int]], names: list[str] | None = None) -> int:
    return sum(out * inp for n, (out, inp) in targets.items() if names is None or n in names)


def _propagate(decoder: _Decoder, targets: Mapping[str, tuple[int, int]], tokens: int, chunks: int) -> Work:
    """The quantized layer's forward that makes the next layer's inputs."""
    dequantize = Work(elements=DEQUANTIZE_ELEMENTS * _weights(targets)) * chunks
    return _passes(decoder.forward(decoder.layer_flops), tokens, chunks) + dequantize


def _gptq_work(decoder: _Decoder, per_layer: list, config: QuantConfig, nsamples: int) -> dict[str, Work]:
    seqlen, chunk = decoder.seqlen, max(1, DEFAULT_CHUNK_TOKENS // decoder.seqlen)
    tokens, chunks = nsamples * seqlen, math.ceil(nsamples / chunk)
    decoder = replace(decoder, chunk_tokens=min(chunk, nsamples) * seqlen)
    parts = {"forward": Work(), "hessians": Work(), "solves": Work(), "packing": Work()}
    for index, targets in enumerate(per_layer):
        groups = _groups(targets)
        prefixes = [decoder.before(i) for i, _ in groups]
        for flops in prefixes if getattr(config, "true_sequential", True) else prefixes[-1:]:
            parts["forward"] += _passes(decoder.forward(flops), tokens, chunks)
        for _, members in groups:
            n = targets[members[0]][1]
            weights = _weights(targets, members)
            # one float32 product per sample, added to a float64 sum (HessianAccumulator)
            parts["hessians"] += Work(2.0 * n * n * tokens, 2.0 * n * tokens + 3.0 * n * n * nsamples, 5 * nsamples)
            per_weight = GPTQ_SOLVE_ELEMENTS + (GPTQ_MSE_ELEMENTS if getattr(config, "mse", 0) > 0 else 0)
            parts["solves"] += Work(n**3 + weights * n, per_weight * weights, small_ops=GPTQ_COLUMN_OPS * n)
            parts["packing"] += Work(elements=PACK_ELEMENTS * weights, ops=LINEAR_OPS * len(members))
        if index + 1 < decoder.layers:
            parts["forward"] += _propagate(decoder, targets, tokens, chunks)
    return parts


def _awq_work(decoder: _Decoder, per_layer: list, config: QuantConfig, nsamples: int, search: int) -> dict[str, Work]:
    seqlen = decoder.seqlen
    chunk = max(1, search // seqlen)
    tokens, chunks, kept = nsamples * seqlen, math.ceil(nsamples / chunk), min(chunk, nsamples) * seqlen
    decoder = replace(decoder, chunk_tokens=kept)
    shrinks = AWQ_GRID // 2
    parts = {"forward": Work(), "scale search": Work(), "clip search": Work(), "packing": Work()}
    for index, targets in enumerate(per_layer):
        groups = _groups(targets)
        if groups:
            statistics_pass = decoder.forward(decoder.before(groups[-1][0]))
            mean_abs = Work(elements=2.0 * sum(targets[m[0]][1] for _, m in groups))
            parts["forward"] += _passes(statistics_pass + mean_abs, tokens, chunks)
        for i, members in groups:
            group = LLAMA_GROUPS[i]
            weights = _weights(targets, members)
            out, inp = targets[members[0]]
            previous = decoder.shapes.get(group.previous)
            square = not group.scale_when_square or previous == (out, inp)
            if len(members) == len(group.names) and square:
                point = _passes(decoder.forward(decoder.inspected(i)), kept, 1)
                fake_quantize = Work(elements=AWQ_FAKE_QUANTIZE_ELEMENTS * weights, ops=LINEAR_OPS)
                parts["scale search"] += (AWQ_GRID + 1) * (point + fake_quantize)
            for name in members:
                if group.clips(name):
                    o, n = targets[name]
                    gram = 2.0 * kept * n * config.group_size  # each group's input Gram matrix
                    errors = 2.0 * shrinks * o * n * config.group_size  # the error of every shrink through it
                    parts["clip search"] += Work(gram + errors, AWQ_CLIP_ELEMENTS * shrinks * o * n, LINEAR_OPS)
        parts["packing"] += Work(elements=AWQ_PACK_ELEMENTS * _weights(targets), ops=LINEAR_OPS * len(targets))
        if index + 1 < decoder.layers:
            parts["forward"] += _propagate(decoder, targets, tokens, chunks)
    return parts


def _awq_working(targets: Mapping[str, tuple[int, int]], item: int, kept_tokens: int) -> int:
    """AWQ's memory for one decoder layer: each group's search inputs (``kept_tokens`` of them, in
    ``item``-byte floats), the larger of the scale search's copy of a group's weights (restored
    after the grid) and the clip search's chunks, and a few row blocks (``quantkit.builtin_backends.awq``
    works through every weight in blocks: no float copy of a weight, no whole weight's codes)."""
    groups = _groups(targets)
    if not groups:
        return 0
    kept = kept_tokens * item * sum(targets[members[0]][1] for _, members in groups)
    blocks = ROW_BLOCKS_LIVE * ROW_BLOCK_ELEMENTS
    search = max(item * _weights(targets, members) for _, members in groups) + 4 * blocks  # float32 blocks
    clip = 5 * AWQ_CLIP_VALUES * 4
    return kept + max(search, clip, 8 * blocks)  # packing: int64 blocks


def _gptq_working(targets: Mapping[str, tuple[int, int]], item: int, seqlen: int) -> int:
    """GPTQ's memory for one decoder layer, the largest of each group's: float64 Hessian sum with a
    sample in float32 and a row block of its product, in float32 and float64
    (:class:`~quantkit.layerwise.HessianAccumulator`);
    solve, two float32 Hessians and the stacked ``item``-byte weights; and column loop, the inverse
    factor with the weights and their codes in float32 (``gptq_quantize``)."""
    sizes = [0]
    for _, members in _groups(targets):
        n, weights = targets[members[0]][1], _weights(targets, members)
        hessian = 8 * n * n + 3 * min(HESSIAN_BLOCK_BYTES, 4 * n * n) + 4 * seqlen * n
        sizes += [hessian, 8 * n * n + item * weights, 4 * n * n + (8 + item) * weights]
    return max(sizes)


def _activation_memory(decoder: _Decoder, item: int, nsamples: int, chunk_samples: int, spill: bool) -> dict[str, int]:
    """The calibration activations of a layer-by-layer run: the hidden states of every sample (one
    chunk's when they are spilled to disk) in ``item``-byte floats, and one chunk's temporaries
    (attention scores, MLP activations, the layer's output), in the layer's dtype."""
    chunk_tokens = min(chunk_samples, nsamples) * decoder.seqlen
    held = chunk_tokens if spill else nsamples * decoder.seqlen
    temporaries = chunk_tokens * (2 * decoder.heads * decoder.seqlen + 3 * decoder.mlp + 4 * decoder.hidden) * item
    return {"hidden states": held * decoder.hidden * item, "chunk temporaries": temporaries}


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _streaming_phases(
    model: nn.Module,
    backend: Backend,
    config: QuantConfig,
    targets: list[Target],
    others: Iterable[str],
    working: dict[str, int],
    activations: dict[str, int] | None,
) -> list[dict[str, int]]:
    """What memory holds at each step of ``quantkit.quantize_streaming`` besides the process and
    the shard writer: each quantized weight (a target linear's, or one of ``others``, the modules
    the backend's other quantizers quantize) quantized with the working memory its backend declares;
    or, with ``activations`` (a layer-by-layer run), the activations while the embedding captures
    the first layer's inputs (the modules outside the decoder layers are read and copied through as
    views of the mapped shards: page cache, not process memory), then each decoder layer (copied into
    process memory: the method writes to it) with its quantized linears, the activations and
    ``working`` memory, then while its quantized forward makes the next layer's inputs (each
    packed linear dequantized for the call)."""
    float_bits = 8 * next(model.parameters()).element_size()
    with backend.storage_context(model):
        quantized = {
            name: (linear.weight, cfg, backend.storage_bits(cfg, name, linear.out_features, linear.in_features) // 8)
            for name, linear, cfg in targets
        }
        for name in others if activations is None else ():
            weight = model.get_submodule(name).weight
            size = backend.other_bits(config, model, f"{name}.weight", weight, float_bits) // 8
            quantized[name] = (weight, config, size)
    if activations is None:
        return [
            {"quantizing one weight": backend.working_bytes(cfg, *weight.shape), "its quantized copy": size}
            for weight, cfg, size in quantized.values()
        ]
    stack = decoder_stack(model)
    phases = [dict(activations)]
    for index, layer in enumerate(stack.layers):
        prefix = f"{stack.layer_name(index)}."
        size = sum(s for name, (_, _, s) in quantized.items() if name.startswith(prefix))
        held = {"decoder layer": _nbytes(layer), "its quantized linears": size, **activations}
        weights = [w.numel() for name, (w, _, _) in quantized.items() if name.startswith(prefix)]
        phases.append({**held, **working})
        phases.append(
            {
                **held,
                "its kernels' prepared weights": int(KERNEL_STATE_BYTES * sum(weights)),
                "the next layer's inputs": activations["hidden states"],
                "dequantized for the next layer's inputs": DEQUANTIZE_BYTES * max(weights, default=0),
            }
        )
    return phases


def estimate_quantization(
    model: nn.Module | str | os.PathLike | dict,
    config: QuantConfig,
    *,
    nsamples: int | None = None,
    seqlen: int | None = None,
    device: torch.device | str = "cpu",
    rates: Rates | None = None,
    streaming: bool = False,
    spill: bool = False,
) -> QuantizeEstimate:
    """Predict the wall time and peak memory of ``quantkit.quantize(model, config)``, or with
    ``streaming`` of ``quantkit.quantize_streaming`` of the model's checkpoint folder.

    ``model`` is the model itself, or its ``config.json`` (path, folder or dict) for its
    shapes alone: weights counted in float32 (``quantkit.quantize`` of a loaded model), or
    with ``streaming`` in their stored dtype (the safetensors headers' in a folder that has
    them, else config.json's). ``nsamples`` and ``seqlen`` of the calibration tokens default
    to the config's; ``spill`` counts the hidden states of a layer-by-layer calibration kept
    on disk. ``rates`` defaults to :data:`REFERENCE_RATES`, replaced by :func:`measure_rates`
    on ``device`` when the prediction exceeds :data:`MEASURE_ABOVE_SECONDS`.
    """
    built = 0.0  # a streamed run builds the architecture as this does: timed here, paid again there
    if not isinstance(model, nn.Module):
        start = time.perf_counter()
        model = stored_model(model) if streaming else _meta_model(_read_model_config(model))
        built = time.perf_counter() - start
    backends = get_registry().backends_for_method(config.quant_method)
    if not backends:
        raise UnknownMethodError(config.quant_method, get_registry().config_classes())
    backend = backends[0]
    targets = quantizable_linears(model, config)
    weights = sum(linear.weight.numel() for _, linear, _ in targets)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cached, uncached = WEIGHT_ELEMENTS.get(config.quant_method, WEIGHT_ELEMENTS["rtn"])
    with backend.storage_context(model):
        others = backend.other_quantizers(model, config, torch.device("cpu"))
    quantized = [linear.weight.numel() for _, linear, _ in targets]
    quantized += [model.get_submodule(name).weight.numel() for name in others]
    elements = sum(n * (cached if 4 * n <= CACHED_WEIGHT_BYTES else uncached) for n in quantized)
    parts = {"quantize": Work(weight_elements=elements, ops=LINEAR_OPS * len(quantized))}
    working = max(backend.working_bytes(cfg, *linear.weight.shape) for _, linear, cfg in targets)
    activations = None  # the hidden states and temporaries of a layer-by-layer calibration
    item = next(model.parameters()).element_size()
    calibration = None
    if backend.needs_calibration(config):
        nsamples = nsamples or getattr(config, "nsamples", 128)
        seqlen = seqlen or getattr(config, "seqlen", 512)
        calibration = (nsamples, seqlen)
        if config.quant_method in ("gptq", "awq"):
            decoder, per_layer = _layer_targets(model, config)
            decoder = replace(decoder, seqlen=seqlen, bfloat16=next(model.parameters()).dtype == torch.bfloat16)
            if config.quant_method == "awq":
                search = getattr(backend, "search_tokens", DEFAULT_CHUNK_TOKENS)
                parts = _awq_work(decoder, per_layer, config, nsamples, search)
                kept = min(max(1, search // seqlen), nsamples) * seqlen
                working = max(_awq_working(layer, item, kept) for layer in per_layer)
            else:
                search, parts = DEFAULT_CHUNK_TOKENS, _gptq_work(decoder, per_layer, config, nsamples)
                working = max(_gptq_working(layer, item, seqlen) for layer in per_layer)
            activations = _activation_memory(decoder, item, nsamples, max(1, search // seqlen), spill)
        else:  # another method: one forward pass over the calibration tokens, and the work it declares
            tokens = nsamples * seqlen
            parts["forward"] = Work(flops=2.0 * weights * tokens)
            shapes = [(cfg, *lin.weight.shape, tokens) for _, lin, cfg in targets]
            parts["calibration"] = Work(
                flops=sum(backend.calibration_flops(*shape) for shape in shapes),
                elements=sum(backend.calibration_elements(*shape) for shape in shapes),
            )
    memory = {"process": PROCESS_BYTES}
    if streaming:  # every stored tensor read from disk once, the output written (twice) once
        parts["build the architecture"] = Work(wall=built)
        parts["read checkpoint"] = Work(read_bytes=model_bytes)
        output = _stored_size(model, config, 8 * item).total_bytes
        parts["write output"] = Work(write_bytes=WRITES_PER_OUTPUT_BYTE * output)
        phases = _streaming_phases(model, backend, config, targets, others, {"method working": working}, activations)
        phases.append({"shard writer copy": min(COPY_BYTES, output)})  # closing a shard: nothing else is held
        memory.update(max(phases, key=lambda phase: sum(phase.values())))
    else:
        memory.update({"model": model_bytes, **(activations or {}), "method working": working})
        if activations is not None:
            # GPTQ's updates, AWQ's scales: a checkpoint loaded memory-mapped keeps its pages and the written copies
            memory["rewritten weights"] = weights * item
    result = QuantizeEstimate(
        config.quant_method,
        parts,
        rates or REFERENCE_RATES,
        memory,
        calibration,
        streaming=streaming,
        spill=spill and activations is not None,
    )
    if rates is None and result.seconds > MEASURE_ABOVE_SECONDS:
        result = replace(result, rates=measure_rates(str(torch.device(device)), disk=streaming))
    if calibration is None and result.rates.device is not None and result.rates.weight_elements is None:
        name, linear, cfg = _probe_target(targets)
        shape = (min(linear.out_features, max(1, PROBE_WEIGHTS // linear.in_features)), linear.in_features)
        probed = measure_quantizer(backend, name, cfg, shape, linear.weight.dtype, result.rates.device)
        result = replace(result, rates=replace(result.rates, weight_elements=probed))
    return result


def _probe_target(targets: list[Target]) -> Target:
    """A target of the shape that holds most of the weights to quantize."""
    totals: Counter[tuple[int, int]] = Counter()
    for _, linear, _ in targets:
        totals[tuple(linear.weight.shape)] += linear.weight.numel()
    shape = totals.most_common(1)[0][0]
    return next(target for target in targets if tuple(target[1].weight.shape) == shape)


def measure_quantizer(
    backend: Backend, name: str, config: QuantConfig, shape: tuple[int, int], dtype: torch.dtype, device: str
) -> float:
    """Elements per second, in :data:`WEIGHT_ELEMENTS`' counts, of ``backend`` quantizing the linear
    ``name`` under ``config``: timed once on a random ``dtype`` weight of ``shape`` (out, in) on
    ``device``, after a small one (libraries load on first use). The method's own speed here and now:
    the elementwise probe of :func:`measure_rates` gauges memory bandwidth, which cache- and
    compute-bound quantizers (HQQ's slabs, bitsandbytes' ``bucketize``) do not follow."""
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        backend.quantize_linear(name, nn.Linear(256, 128, bias=False, dtype=dtype), config, dev)
        linear = nn.Linear(shape[1], shape[0], bias=False, dtype=dtype)
        nn.init.normal_(linear.weight, std=0.02)
        sync()
        start = time.perf_counter()
        backend.quantize_linear(name, linear, config, dev)
        sync()
        seconds = time.perf_counter() - start
    weights = shape[0] * shape[1]
    cached, uncached = WEIGHT_ELEMENTS.get(config.quant_method, WEIGHT_ELEMENTS["rtn"])
    return weights * (cached if 4 * weights <= CACHED_WEIGHT_BYTES else uncached) / seconds
