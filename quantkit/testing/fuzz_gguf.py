"""Mutating ``.gguf`` files and judging how a reader takes them: shared by the fuzz tests and the campaign.

:func:`split` takes a valid file apart into its pieces (header counts, key-value pairs,
tensor infos, data) and :func:`assemble` puts (mutated) pieces back together, so that a
mutation can change one field and keep the rest of the file consistent.
:func:`structured_mutations` lists targeted damage: truncation at every region boundary,
type swaps and hostile values of known keys, huge counts and lengths, offsets past the
end, duplicated keys and tensors. :func:`random_mutation` damages bytes at random (the
tests draw its seeds with hypothesis). :func:`run_case` loads one input and classifies
the outcome, bounded in time and memory.
"""

from __future__ import annotations

import math
import random
import signal
import struct
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFValueType, LlamaFileType

from quantkit.builtin_backends.gguf.header import SCALAR_FORMATS
from quantkit.core.errors import QuantkitError

OUTCOMES = ("loaded", "refused", "escaped", "hung", "memory")
"""A case's outcome: loaded a valid model, refused with a QuantkitError, another exception
escaped, it ran past its time bound, or its peak memory grew past its bound."""


# -- taking a file apart and putting it back together ------------------------------------


@dataclass(frozen=True)
class KV:
    key: bytes
    value: bytes
    """The value type and the value, exactly as stored."""


@dataclass(frozen=True)
class Info:
    name: bytes
    dims: tuple[int, ...]
    qtype: int
    offset: int


@dataclass(frozen=True)
class Pieces:
    """A GGUF file as pieces; ``boundaries``: byte offsets where each region of the source began."""

    version: int
    kvs: tuple[KV, ...]
    infos: tuple[Info, ...]
    data: bytes
    alignment: int = 32
    boundaries: tuple[int, ...] = field(default=(), compare=False)


def split(data: bytes) -> Pieces:
    """The pieces of a well-formed GGUF file (a seed; not for hostile input)."""
    pos = 24
    version, n_tensors, n_kvs = struct.unpack_from("<IQQ", data, 4)
    boundaries = [0, 4, 8, 16, 24]
    kvs = []
    for _ in range(n_kvs):
        key, pos = _string(data, pos)
        start = pos
        pos = _skip_value(data, pos)
        kvs.append(KV(key, data[start:pos]))
        boundaries.append(pos)
    alignment = 32
    for kv in kvs:
        if kv.key == b"general.alignment":
            alignment = struct.unpack_from("<I", kv.value, 4)[0]
    infos = []
    for _ in range(n_tensors):
        name, pos = _string(data, pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        dims = struct.unpack_from(f"<{n_dims}q", data, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append(Info(name, tuple(dims), qtype, offset))
        boundaries.append(pos)
    data_start = -(-pos // alignment) * alignment
    boundaries += [data_start + info.offset for info in infos] + [len(data)]
    return Pieces(version, tuple(kvs), tuple(infos), data[data_start:], alignment, tuple(sorted(set(boundaries))))


def assemble(pieces: Pieces, *, n_tensors: int | None = None, n_kvs: int | None = None) -> bytes:
    """The file of ``pieces`` (header counts overridden by ``n_tensors``/``n_kvs``)."""
    n_tensors = len(pieces.infos) if n_tensors is None else n_tensors
    n_kvs = len(pieces.kvs) if n_kvs is None else n_kvs
    out = bytearray(b"GGUF" + struct.pack("<IQQ", pieces.version, n_tensors, n_kvs))
    for kv in pieces.kvs:
        out += struct.pack("<Q", len(kv.key)) + kv.key + kv.value
    for info in pieces.infos:
        out += struct.pack("<Q", len(info.name)) + info.name + struct.pack("<I", len(info.dims))
        out += struct.pack(f"<{len(info.dims)}q", *info.dims) + struct.pack("<IQ", info.qtype, info.offset)
    out += bytes(-len(out) % pieces.alignment)
    return bytes(out + pieces.data)


def encode(kind: GGUFValueType, value: Any, item: GGUFValueType | None = None) -> bytes:
    """A stored value: its type, then the value (an array: element type, count, elements)."""
    head = struct.pack("<I", kind)
    if kind is GGUFValueType.STRING:
        raw = value.encode() if isinstance(value, str) else value
        return head + struct.pack("<Q", len(raw)) + raw
    if kind is GGUFValueType.ARRAY:
        body = b"".join(encode(item, v)[4:] for v in value)
        return head + struct.pack("<IQ", item, len(value)) + body
    return head + struct.pack(SCALAR_FORMATS[kind], value)


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("<Q", data, pos)
    return data[pos + 8 : pos + 8 + n], pos + 8 + n


def _skip_value(data: bytes, pos: int, kind: int | None = None) -> int:
    if kind is None:
        (kind,) = struct.unpack_from("<I", data, pos)
        pos += 4
    kind = GGUFValueType(kind)
    if kind is GGUFValueType.STRING:
        return _string(data, pos)[1]
    if kind is GGUFValueType.ARRAY:
        item, n = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if item != GGUFValueType.STRING:
            return pos + n * struct.calcsize(SCALAR_FORMATS[GGUFValueType(item)])
        for _ in range(n):
            pos = _string(data, pos)[1]
        return pos
    return pos + struct.calcsize(SCALAR_FORMATS[kind])


# -- mutations ------------------------------------------------------------------------


@dataclass(frozen=True)
class Mutation:
    """A damaged file: what was done, how to build its bytes, and whether a correct reader must refuse it."""

    name: str
    build: Callable[[], bytes]
    must_refuse: bool

    @property
    def data(self) -> bytes:
        return self.build()


COUNT_KEYS = (
    "llama.block_count",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.context_length",
    "llama.rope.dimension_count",
    "llama.vocab_size",
    "general.file_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.padding_token_id",
)
FLOAT_KEYS = ("llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base")
OTHER_KEYS = ("general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
HOSTILE_COUNTS = (0, 1, 3, 2**20, 2**24, 2**31 - 1, 2**32 - 1)
HOSTILE_FLOATS = (0.0, -1.0, math.nan, math.inf)
HUGE = (2**32, 2**40, 2**63 - 1, 2**64 - 1)
_SWAPS: tuple[tuple[str, bytes], ...] = (
    ("string", encode(GGUFValueType.STRING, "7")),
    ("float32", encode(GGUFValueType.FLOAT32, 7.0)),
    ("bool", encode(GGUFValueType.BOOL, True)),
    ("int32=-1", encode(GGUFValueType.INT32, -1)),
    ("array[uint32]", encode(GGUFValueType.ARRAY, [7, 7], GGUFValueType.UINT32)),
    ("array[string]", encode(GGUFValueType.ARRAY, ["7"], GGUFValueType.STRING)),
    ("empty array", encode(GGUFValueType.ARRAY, [], GGUFValueType.UINT8)),
)


def structured_mutations(data: bytes) -> Iterator[Mutation]:
    """Targeted damage to the valid GGUF file ``data``, in a fixed order."""
    pieces = split(data)
    keys = {kv.key.decode(): i for i, kv in enumerate(pieces.kvs)}
    for cut in sorted({b + d for b in pieces.boundaries for d in (-1, 0, 1)}):
        if 0 <= cut < len(data):
            yield Mutation(f"truncated at {cut}", partial(_truncate, data, cut), True)
    for key in (*COUNT_KEYS, *FLOAT_KEYS, *OTHER_KEYS):
        if key not in keys:
            continue
        index = keys[key]
        original = pieces.kvs[index].value
        kind = GGUFValueType(struct.unpack_from("<I", original)[0])
        for label, value in _SWAPS:
            if value != original:
                refuse = kind.name != label.upper()
                yield Mutation(f"{key} as {label}", partial(_with_value, pieces, index, value), refuse)
        if key in COUNT_KEYS:
            for n in HOSTILE_COUNTS:
                value = encode(kind, n) if n < 2 ** (8 * struct.calcsize(SCALAR_FORMATS[kind])) else None
                if value is not None and value != original:
                    refuse = _count_must_refuse(key, n)
                    yield Mutation(f"{key}={n}", partial(_with_value, pieces, index, value), refuse)
        if key in FLOAT_KEYS:
            for x in HOSTILE_FLOATS:
                yield Mutation(f"{key}={x}", partial(_with_value, pieces, index, encode(kind, x)), True)
        twice = replace(pieces, kvs=(*pieces.kvs, pieces.kvs[index]))
        yield Mutation(f"{key} twice", partial(assemble, twice), True)
        yield Mutation(f"{key} removed", partial(assemble, replace(pieces, kvs=_without(pieces.kvs, index))), False)
    yield from _count_and_length_mutations(data, pieces)
    yield from _tensor_info_mutations(pieces)


def _count_and_length_mutations(data: bytes, pieces: Pieces) -> Iterator[Mutation]:
    n_tensors, n_kvs = len(pieces.infos), len(pieces.kvs)
    for n in (*HUGE, n_tensors + 1):
        yield Mutation(f"tensor count={n}", partial(assemble, pieces, n_tensors=n % 2**64), True)
    for n in (*HUGE, n_kvs + 1):
        yield Mutation(f"key-value count={n}", partial(assemble, pieces, n_kvs=n % 2**64), True)
    yield Mutation("version=1", partial(_patch, data, 4, "<I", 1), True)
    yield Mutation("magic", partial(_patch, data, 0, "<I", 0x58554747), True)
    pos = 24
    for kv in pieces.kvs:
        name = kv.key.decode()
        for n in HUGE[1:]:
            yield Mutation(f"length of key {name}={n}", partial(_patch, data, pos, "<Q", n), True)
        value = pos + 8 + len(kv.key)
        kind = struct.unpack_from("<I", data, value)[0]
        yield Mutation(f"type of {name}=99", partial(_patch, data, value, "<I", 99), True)
        if kind == GGUFValueType.STRING:
            for n in HUGE[1:]:
                yield Mutation(f"length of {name}'s string={n}", partial(_patch, data, value + 4, "<Q", n), True)
        if kind == GGUFValueType.ARRAY:
            yield Mutation(f"element type of {name}=9", partial(_patch, data, value + 4, "<I", 9), True)
            for n in HUGE[1:]:
                yield Mutation(f"length of array {name}={n}", partial(_patch, data, value + 8, "<Q", n), True)
        pos = value + len(kv.value)


def _count_must_refuse(key: str, n: int) -> bool:
    """Whether a changed count makes the file invalid (other context lengths, file types and
    token ids inside the vocabulary describe valid models)."""
    if key == "llama.context_length":
        return n == 0
    if key == "general.file_type":
        return n not in set(LlamaFileType)
    if key.endswith("_token_id"):
        return n >= 2**20
    return True


def _tensor_info_mutations(pieces: Pieces) -> Iterator[Mutation]:
    end = len(pieces.data)
    for i, info in enumerate(pieces.infos):
        name = info.name.decode()
        changes: list[tuple[str, Info, bool]] = [
            ("n_dims=5", replace(info, dims=(*info.dims, 1, 1, 1, 1)[:5]), True),
            ("no dims", replace(info, dims=()), True),
            ("type=99", replace(info, qtype=99), True),
            ("type=F16", replace(info, qtype=1), info.qtype != 0),
            ("offset past the end", replace(info, offset=end + pieces.alignment), True),
            ("offset misaligned", replace(info, offset=info.offset + 1), True),
            ("offset=2**63", replace(info, offset=2**63), True),
            ("offset=0", replace(info, offset=0), i != 0),
            ("name too long", replace(info, name=b"x" * 200), True),
        ]
        for n in (-1, 0, 2**40, 2**62):
            changes.append((f"dims[0]={n}", replace(info, dims=(n, *info.dims[1:])), True))
        changes.append(("dims doubled", replace(info, dims=tuple(2 * d for d in info.dims)), True))
        for label, changed, refuse in changes:
            infos = list(pieces.infos)
            infos[i] = changed
            yield Mutation(f"tensor {name}: {label}", partial(assemble, replace(pieces, infos=tuple(infos))), refuse)
        twice = (*pieces.infos, info)
        yield Mutation(f"tensor {name} twice", partial(assemble, replace(pieces, infos=twice)), True)
        removed = pieces.infos[:i] + pieces.infos[i + 1 :]
        refuse = name != "output.weight"
        yield Mutation(f"tensor {name} removed", partial(assemble, replace(pieces, infos=removed)), refuse)


def _with_value(pieces: Pieces, index: int, value: bytes) -> bytes:
    kvs = list(pieces.kvs)
    kvs[index] = replace(kvs[index], value=value)
    return assemble(replace(pieces, kvs=tuple(kvs)))


def _truncate(data: bytes, cut: int) -> bytes:
    return data[:cut]


def _without(kvs: tuple[KV, ...], index: int) -> tuple[KV, ...]:
    return kvs[:index] + kvs[index + 1 :]


def _patch(data: bytes, pos: int, fmt: str, value: int) -> bytes:
    return data[:pos] + struct.pack(fmt, value) + data[pos + struct.calcsize(fmt) :]


def random_mutation(data: bytes, seed: int, *, edits: int = 4) -> bytes:
    """``data`` with ``edits`` random edits: byte flips, hostile integers written at region
    boundaries, cut or repeated spans (the same seed gives the same bytes)."""
    rng = random.Random(seed)
    boundaries = split(data).boundaries
    out = bytearray(data)
    for _ in range(edits):
        where = rng.choice(boundaries) + rng.choice((0, 0, 4, 8)) if rng.random() < 0.6 else rng.randrange(len(out))
        where = min(where, max(len(out) - 1, 0))
        action = rng.randrange(4)
        if action == 0:
            out[where] ^= 1 << rng.randrange(8)
        elif action == 1:
            value = rng.choice((0, 1, 2**31 - 1, 2**32 - 1, 2**63, 2**64 - 1, rng.getrandbits(64)))
            out[where : where + 8] = value.to_bytes(8, "little")
        elif action == 2:
            del out[where : where + rng.randrange(1, 64)]
        else:
            span = out[where : where + rng.randrange(1, 64)]
            out[where:where] = span
    return bytes(out)


# -- running one case -----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a reader took one input: one of :data:`OUTCOMES`, seconds, peak memory growth, details."""

    kind: str
    seconds: float
    memory_growth: int
    detail: str = ""


class _TimeUp(BaseException):
    """Raised by the alarm into the running case (a BaseException: ``except Exception`` cannot swallow it)."""


def run_case(
    load: Callable[[Path], Any],
    data: bytes,
    path: Path,
    *,
    seconds: float = 10.0,
    memory_bytes: int = 512 * 2**20,
) -> Outcome:
    """Write ``data`` to ``path``, call ``load(path)`` and classify the outcome.

    A result must be a model whose forward pass on two tokens gives finite-shaped logits.
    The time bound is an interval timer (main thread, POSIX); peak memory is the growth of
    the process's resident high-water mark (Linux ``VmHWM``, reset before the case).
    """
    path.write_bytes(data)
    baseline = _reset_peak_memory()
    previous = signal.signal(signal.SIGALRM, _raise_time_up)
    start = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        model = load(path)
        kind, detail = "loaded", ""
        try:
            _check_model(model)
        except Exception as exc:  # a loaded model that does not run is an input accepted wrongly
            kind, detail = "escaped", f"loaded an invalid model: {type(exc).__name__}: {exc}"
    except _TimeUp:
        kind, detail = "hung", f"still running after {seconds} s"
    except QuantkitError as exc:
        kind, detail = "refused", f"{type(exc).__name__}: {exc}"
    except MemoryError as exc:
        kind, detail = "memory", f"MemoryError: {exc}"
    except Exception as exc:  # the very thing being counted: an exception that is not a QuantkitError
        kind, detail = "escaped", "".join(traceback.format_exception_only(exc)).strip()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - start
    growth = _peak_memory() - baseline if baseline is not None else 0
    if kind in ("loaded", "refused") and growth > memory_bytes:
        kind, detail = "memory", f"peak memory grew by {growth / 2**20:.0f} MiB ({detail})"
    return Outcome(kind, elapsed, growth, detail)


def _raise_time_up(signum: int, frame: Any) -> None:
    raise _TimeUp


def _check_model(model: Any) -> None:
    """A loaded model runs: two tokens give logits of shape ``(1, 2, vocab)``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"load returned {type(model).__name__}, not a model")
    vocab = model.config.vocab_size
    with torch.no_grad():
        logits = model(torch.tensor([[0, vocab - 1]])).logits
    if tuple(logits.shape) != (1, 2, vocab):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for 2 tokens of a {vocab}-token vocabulary")


def _status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_memory() -> int | None:
    """Reset the resident high-water mark; the resident size now (``None``: not on Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return None
    return _status("VmRSS")


def _peak_memory() -> int:
    return _status("VmHWM") or 0
