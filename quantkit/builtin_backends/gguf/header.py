"""A bounded reader of a ``.gguf`` file's header: metadata, tensor infos and where each tensor's bytes lie.

Every count, length, shape and offset is checked against the bytes the file really has
before anything of that size is built, so a malformed file of N bytes costs O(N) time
and memory before it is refused with a :class:`ModelFormatError` naming the file, the
field, its value and the bound. The rules are llama.cpp's (``ggml/src/gguf.cpp``):
versions 2 and 3, no duplicated keys or tensor names, no nested arrays, tensor names
under 64 bytes, at most 4 dimensions, rows whole blocks of their ggml type, data
offsets aligned to ``general.alignment`` (a power of two, default 32); tensors must also
lie inside the file without overlapping.

gguf-py's ``GGUFReader`` is not used to read: it trusts array lengths (a count of 2**40
in a 170 kB file costs it seconds) and slices past the end of its memory map silently.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from quantkit.core.errors import ModelFormatError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_TENSOR_NAME = 63
"""Bytes of a tensor name (ggml's ``GGML_MAX_NAME`` is 64 with the terminating zero)."""

SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_STRING_LENGTH = 8
_MIN_KV = 8 + 4 + 1
"""The smallest key-value pair: an empty key, its type and a one-byte value."""
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8
"""The smallest tensor info: an empty name, no dimension, its type and offset."""


@dataclass(frozen=True)
class KeyValue:
    """One metadata value: ``value`` is a Python scalar or ``str``, an array a numpy array or a list of ``str``."""

    type: GGUFValueType
    value: Any
    item_type: GGUFValueType | None = None
    """The element type of an array."""

    def describe(self) -> str:
        if self.type is GGUFValueType.ARRAY:
            return f"array[{self.item_type.name.lower()}] of {len(self.value)}"
        return self.type.name.lower()


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, its ggml shape (``ne``: fastest-varying dimension first), type and bytes in the file."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    start: int
    """Absolute file offset of its first byte."""
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """A checked ``.gguf`` header: every tensor lies inside the file."""

    path: Path
    size: int
    version: int
    fields: dict[str, KeyValue]
    tensors: dict[str, TensorInfo]
    data_start: int

    def tensor_bytes(self, info: TensorInfo) -> np.ndarray:
        """The raw bytes of tensor ``info`` (a uint8 copy), read now; the file must not have shrunk."""
        data = np.fromfile(self.path, dtype=np.uint8, count=info.nbytes, offset=info.start)
        if data.size != info.nbytes:
            raise ModelFormatError(
                f"{str(self.path)!r}: tensor {info.name!r} has {data.size} of its {info.nbytes} bytes "
                "(the file changed while it was read?)"
            )
        return data


def read_header(path: Path) -> GGUFHeader:
    """Parse and check the header of ``path``; raises :class:`ModelFormatError` for any malformed part."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            size = file.seek(0, 2)
            if size < 24:
                raise ModelFormatError(f"{str(path)!r} has {size} bytes, fewer than a GGUF header's 24 (truncated?)")
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                return _Parser(path, buffer, size).header()
    except OSError as exc:
        raise ModelFormatError(f"{str(path)!r} cannot be read: {exc}") from exc


class _Parser:
    def __init__(self, path: Path, buffer: mmap.mmap, size: int) -> None:
        self.path, self.buffer, self.size, self.pos = path, buffer, size, 0

    def fail(self, message: str) -> ModelFormatError:
        return ModelFormatError(f"{str(self.path)!r}: {message}")

    def take(self, n: int, what: str) -> int:
        """Claim ``n`` bytes at the cursor for ``what``; return where they start."""
        start = self.pos
        if n > self.size - start:
            raise self.fail(
                f"{what} needs {n} bytes at offset {start}, but the file ends at {self.size} (truncated or corrupt)"
            )
        self.pos = start + n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buffer, start)[0]

    def count(self, what: str, item_bytes: int) -> int:
        """A uint64 count of items of at least ``item_bytes`` each, bounded by the bytes left."""
        n = self.scalar("<Q", what)
        bound = (self.size - self.pos) // item_bytes
        if n > bound:
            raise self.fail(f"{what}={n} exceeds the {bound} that the {self.size - self.pos} bytes left can hold")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"length of {what}", 1)
        start = self.take(n, what)
        try:
            return self.buffer[start : start + n].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} at offset {start} is not UTF-8 ({exc.reason})") from None

    def strings(self, key: str, n: int) -> list[str]:
        """``n`` strings of array ``key``: :meth:`string` unrolled (token lists hold 10**5 of them)."""
        buffer, size, pos, out = self.buffer, self.size, self.pos, []
        unpack = struct.Struct("<Q").unpack_from
        try:
            for _ in range(n):
                if size - pos < _STRING_LENGTH:
                    break
                (length,) = unpack(buffer, pos)
                pos += _STRING_LENGTH
                if length > size - pos:
                    break
                out.append(buffer[pos : pos + length].decode("utf-8"))
                pos += length
        except UnicodeDecodeError as exc:
            raise self.fail(f"{key!r}[{len(out)}] at offset {pos} is not UTF-8 ({exc.reason})") from None
        self.pos = pos
        if len(out) < n:  # the same checks, to report where the array broke off
            self.string(f"{key!r}[{len(out)}]")
        return out

    def value_type(self, what: str) -> GGUFValueType:
        code = self.scalar("<I", what)
        try:
            return GGUFValueType(code)
        except ValueError:
            raise self.fail(f"{what}={code} is not a GGUF value type (0..{max(GGUFValueType)})") from None

    def value(self, key: str) -> KeyValue:
        kind = self.value_type(f"type of {key!r}")
        if kind is GGUFValueType.STRING:
            return KeyValue(kind, self.string(f"value of {key!r}"))
        if kind is not GGUFValueType.ARRAY:
            return KeyValue(kind, self.scalar(SCALAR_FORMATS[kind], f"value of {key!r}"))
        item = self.value_type(f"element type of {key!r}")
        if item is GGUFValueType.ARRAY:
            raise self.fail(f"{key!r} is an array of arrays, which llama.cpp does not read either")
        if item is GGUFValueType.STRING:
            n = self.count(f"length of array {key!r}", _STRING_LENGTH)
            return KeyValue(kind, self.strings(key, n), item)
        dtype = np.dtype(SCALAR_FORMATS[item])
        n = self.count(f"length of array {key!r}", dtype.itemsize)
        start = self.take(n * dtype.itemsize, f"values of {key!r}")
        return KeyValue(kind, np.frombuffer(self.buffer, dtype=dtype, count=n, offset=start).copy(), item)

    def header(self) -> GGUFHeader:
        magic = bytes(self.buffer[0:4])
        if magic != MAGIC:
            raise self.fail(f"starts with {magic!r}, not the GGUF magic {MAGIC!r}")
        self.pos = 4
        version = self.scalar("<I", "version")
        if version not in VERSIONS:
            raise self.fail(f"GGUF version {version} is not one quantkit reads ({', '.join(map(str, VERSIONS))})")
        n_tensors = self.scalar("<Q", "tensor count")
        n_fields = self.count("key-value count", _MIN_KV)
        fields: dict[str, KeyValue] = {}
        for index in range(n_fields):
            key = self.string(f"key #{index}")
            if key in fields:
                raise self.fail(f"key {key!r} appears twice")
            fields[key] = self.value(key)
        bound = (self.size - self.pos) // _MIN_TENSOR_INFO
        if n_tensors > bound:
            raise self.fail(f"tensor count={n_tensors} exceeds the {bound} tensor infos the bytes left can hold")
        alignment = _alignment(self, fields.get("general.alignment"))
        infos = [self.tensor_info(index) for index in range(n_tensors)]
        data_start = -(-self.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, shape, qtype, offset, nbytes in infos:
            if name in tensors:
                raise self.fail(f"tensor {name!r} appears twice")
            if offset % alignment:
                raise self.fail(f"tensor {name!r}: data offset {offset} is not a multiple of the alignment {alignment}")
            start = data_start + offset
            if nbytes > self.size - start:
                raise self.fail(
                    f"tensor {name!r}: {nbytes} bytes at offset {start} end past the end of the file "
                    f"({self.size} bytes)"
                )
            tensors[name] = TensorInfo(name, shape, qtype, start, nbytes)
        _check_disjoint(self, tensors.values())
        return GGUFHeader(self.path, self.size, version, fields, tensors, data_start)

    def tensor_info(self, index: int) -> tuple[str, tuple[int, ...], str, int, int]:
        name = self.string(f"name of tensor #{index}")
        if len(name.encode()) > MAX_TENSOR_NAME:
            raise self.fail(f"tensor name {name[:80]!r} is longer than llama.cpp's {MAX_TENSOR_NAME} bytes")
        n_dims = self.scalar("<I", f"n_dims of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise self.fail(f"tensor {name!r}: n_dims={n_dims} exceeds ggml's {MAX_DIMS}")
        shape = tuple(self.scalar("<q", f"dimension {i} of tensor {name!r}") for i in range(n_dims))
        code = self.scalar("<I", f"type of tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(code)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise self.fail(f"tensor {name!r}: type {code} is not a ggml tensor type") from None
        offset = self.scalar("<Q", f"data offset of tensor {name!r}")
        if any(n < 0 for n in shape):
            raise self.fail(f"tensor {name!r}: shape {list(shape)} has a negative dimension")
        if shape and shape[0] % block:
            raise self.fail(f"tensor {name!r}: a row of {shape[0]} values is not whole {qtype.name} blocks of {block}")
        elements = int(np.prod(shape, dtype=object)) if shape else 1
        nbytes = elements // block * type_size
        if nbytes > self.size:
            raise self.fail(
                f"tensor {name!r}: shape {list(shape)} of {qtype.name} needs {nbytes} bytes, "
                f"more than the whole file ({self.size})"
            )
        return name, shape, qtype.name, offset, nbytes


def _alignment(parser: _Parser, field: KeyValue | None) -> int:
    if field is None:
        return DEFAULT_ALIGNMENT
    value = field.value
    if field.type is not GGUFValueType.UINT32 or value == 0 or value & (value - 1):
        raise parser.fail(f"general.alignment={value!r} ({field.describe()}) is not a uint32 power of two")
    return value


def _check_disjoint(parser: _Parser, tensors: Any) -> None:
    ordered = sorted((t for t in tensors if t.nbytes), key=lambda t: t.start)
    for before, after in zip(ordered, ordered[1:]):
        if before.start + before.nbytes > after.start:
            raise parser.fail(f"the data of tensors {before.name!r} and {after.name!r} overlap")
