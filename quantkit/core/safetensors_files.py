"""The safetensors files of a saved model folder, read defensively.

A folder holds ``model.safetensors`` or shards listed by ``model.safetensors.index.json``.
Everything about the tensors (names, dtypes, shapes, byte ranges) is read and checked from the
headers alone (8 bytes of length, then bounded JSON) before any tensor data is read, so a
damaged or hostile file is refused in time and memory proportional to its header. Every
failure is a :class:`ModelFormatError` naming the file and the entry.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config_files import parse_json, read_json
from .errors import ModelFormatError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}
"""The safetensors metadata quantkit writes (transformers reads ``format``)."""
MAX_HEADER_BYTES = 100 * 2**20
"""Largest safetensors header read (the safetensors library's own limit)."""
MAX_INDEX_BYTES = 64 * 2**20
"""Largest ``model.safetensors.index.json`` read."""

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype names quantkit reads, with their torch dtypes."""
WRITE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16")
WRITE_ORDER += ("F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
"""The order in which the safetensors library lays tensors out in a file, by dtype (then by name):
a file written in it has the bytes ``safetensors.torch.save_file`` writes."""
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
"""torch dtype -> its safetensors name."""


def header_bytes(
    tensors: Mapping[str, tuple[torch.dtype, Sequence[int], int]], metadata: Mapping[str, str]
) -> tuple[bytes, list[str]]:
    """The start of a safetensors file holding ``tensors`` (name -> dtype, shape, bytes): the header's
    8-byte length and the header padded to 8 bytes, the data laid out in safetensors' own order
    (by dtype as :data:`WRITE_ORDER`, then name); and that order, in which the data must follow."""
    order = sorted(tensors, key=lambda name: (WRITE_ORDER.index(DTYPE_NAMES[tensors[name][0]]), name))
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in order:
        dtype, shape, size = tensors[name]
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as its file's header describes it (no data read)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Position of the tensor's first byte in :attr:`file`."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def stored_tensors(directory: Path) -> dict[str, StoredTensor]:
    """Every tensor of the folder's safetensors file(s), from their checked headers."""
    found: dict[str, StoredTensor] = {}
    index = _read_index(directory)
    files = sorted(set(index.values())) if index is not None else [WEIGHTS_NAME]
    for name in files:
        if index is not None and not (directory / name).is_file():
            raise ModelFormatError(f"{str(directory / INDEX_NAME)!r}: weight_map names {name!r}, which is missing")
        for key, entry in read_header(directory / name).items():
            if key in found:
                raise ModelFormatError(f"tensor {key!r} is stored twice: in {found[key].file.name} and {name}")
            found[key] = entry
    for key, name in (index or {}).items():
        if key not in found or found[key].file.name != name:
            raise ModelFormatError(f"{str(directory / INDEX_NAME)!r}: weight_map[{key!r}]={name!r}, which lacks it")
    return found


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors one safetensors file declares, checked against the file's size: known dtypes,
    non-negative integer shapes, byte ranges matching those and tiling the data exactly."""
    if not path.is_file():
        raise ModelFormatError(f"{str(path)!r} is missing")
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            prefix = file.read(8)
            length = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or length > min(size - 8, MAX_HEADER_BYTES):
                raise ModelFormatError(
                    f"{str(path)!r} is truncated or not safetensors: header length "
                    f"{length if len(prefix) == 8 else 'missing'}, file size {size} bytes "
                    f"(at most {MAX_HEADER_BYTES} header bytes, within the file)"
                )
            text = file.read(length).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFormatError(f"{str(path)!r}: the safetensors header is not UTF-8 ({exc})") from exc
    except OSError as exc:
        raise ModelFormatError(f"{str(path)!r} could not be read: {exc}") from exc
    header = parse_json(text, f"{path} (safetensors header)")
    if not isinstance(header, dict):
        raise ModelFormatError(f"{str(path)!r}: the safetensors header is a {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFormatError(f"{str(path)!r}: __metadata__={metadata!r} is not a map of strings")
    entries, ranges = {}, []
    for key, value in header.items():
        entries[key], offsets = _entry(path, key, value, 8 + length)
        ranges.append((*offsets, key))
    _check_tiling(path, sorted(ranges), size - 8 - length)
    return entries


def stored_bytes(folder: Path, module_names: Iterable[str]) -> dict[str, int]:
    """Bytes of a saved model folder: ``size_bytes`` (every file) and ``quantized_bytes``
    (the safetensors tensors named ``<module>.*`` for the given modules)."""
    prefixes = tuple(f"{name}." for name in module_names)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    quantized = sum(
        entry.nbytes
        for path in folder.rglob("*.safetensors")
        for name, entry in read_header(path).items()
        if name.startswith(prefixes)
    )
    return {"size_bytes": size, "quantized_bytes": quantized}


def load_tensors(stored: dict[str, StoredTensor]) -> dict[str, torch.Tensor]:
    """The data of tensors whose headers :func:`stored_tensors` checked, on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted({entry.file for entry in stored.values()}):
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelFormatError(f"{str(path)!r} is corrupt or truncated: {exc}") from exc
    return tensors


def _read_index(directory: Path) -> dict[str, str] | None:
    """The index's ``weight_map`` (tensor name -> file name inside ``directory``), or None."""
    path = directory / INDEX_NAME
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_INDEX_BYTES:
        raise ModelFormatError(f"{str(path)!r} is {path.stat().st_size} bytes; at most {MAX_INDEX_BYTES} are read")
    index = read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ModelFormatError(f"{str(path)!r}: weight_map is {type(weight_map).__name__}; expected an object")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not _is_inside(name):
            raise ModelFormatError(
                f"{str(path)!r}: weight_map[{key!r}]={name!r}; expected a .safetensors file name inside the folder "
                "(relative, no '..')"
            )
    return weight_map


def _is_inside(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return (
        name.endswith(".safetensors")
        and "\\" not in name
        and "\0" not in name
        and bool(parts)
        and not PurePosixPath(name).is_absolute()
        and ".." not in parts
        and ":" not in parts[0]
    )


def _entry(path: Path, key: str, value: object, data_start: int) -> tuple[StoredTensor, tuple[int, int]]:
    where = f"{str(path)!r}: tensor {key!r}"
    if not isinstance(value, dict):
        raise ModelFormatError(f"{where} is described by a {type(value).__name__}, not an object")
    dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ModelFormatError(f"{where}: dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ModelFormatError(f"{where}: shape={shape!r}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int and n >= 0 for n in offsets)):
        raise ModelFormatError(f"{where}: data_offsets={offsets!r}; expected [begin, end], non-negative integers")
    entry = StoredTensor(path, DTYPES[dtype], tuple(shape), data_start + offsets[0])
    if offsets[1] - offsets[0] != entry.nbytes:
        raise ModelFormatError(
            f"{where}: data_offsets={offsets} span {offsets[1] - offsets[0]} bytes; "
            f"{dtype} {shape} needs {entry.nbytes}"
        )
    return entry, (offsets[0], offsets[1])


def _check_tiling(path: Path, ranges: list[tuple[int, int, str]], data_bytes: int) -> None:
    """Byte ranges, sorted, must follow each other exactly and end where the file does."""
    end = 0
    for begin, stop, key in ranges:
        if begin != end:
            raise ModelFormatError(
                f"{str(path)!r}: tensor {key!r} starts at data byte {begin}, expected {end} (gap or overlap)"
            )
        end = stop
    if end != data_bytes:
        raise ModelFormatError(
            f"{str(path)!r}: the tensors' data ends at byte {end} but the file holds {data_bytes} data bytes "
            "(truncated or padded)"
        )
