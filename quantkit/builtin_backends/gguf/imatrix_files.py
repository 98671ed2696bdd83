"""llama.cpp importance matrices and their two file formats.

An importance matrix holds, for each quantized weight (under its GGUF name, such as
``blk.0.attn_q.weight``), the sum of the squares of its inputs per input column and the
number of tokens summed; quantizers weight each column's error by the mean,
``sum / count``. llama.cpp's ``llama-imatrix`` writes it in either format, and
``llama-quantize`` reads both:

* **GGUF** (``.gguf``, llama.cpp's default since mid-2025): ``general.type = "imatrix"``,
  ``imatrix.datasets`` (array of strings), ``imatrix.chunk_count`` and ``imatrix.chunk_size``
  (uint32), and per weight two F32 tensors in name order: ``<name>.in_sum2`` (the sums,
  ``ne = [columns]``) and ``<name>.counts`` (``ne = [1]``). The sums and counts are kept as
  they are, so files of the same calibration can be merged exactly.
* **legacy** (``.dat``), little-endian: int32 entry count; per entry (in name order) int32
  name length, the name, int32 ``ncall`` (chunks seen, ``ceil(count / chunk_size)``), int32
  ``nval``, ``nval`` float32 values ``mean * ncall``; then int32 chunk count, int32 length
  and the name of the dataset. The chunk size is not stored: a legacy file reads back as
  ``ncall`` chunks of :data:`LEGACY_CHUNK_SIZE` tokens, the same means.

Entries of expert-stacked (MoE) weights, several matrices per weight, are refused: quantkit's
GGUF backend quantizes dense Llama-family models.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFValueType
from torch import Tensor

from quantkit.core.atomic import atomic_path
from quantkit.core.errors import ConfigValueError, ModelFormatError

from .header import DEFAULT_ALIGNMENT, read_header

FORMATS = ("gguf", "dat")
FILE_SUFFIXES = (".gguf", ".dat")
LEGACY_CHUNK_SIZE = 512
"""Tokens per chunk assumed for a legacy file (llama-imatrix's default context)."""

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSION = 3
_F32 = 0  # ggml's GGML_TYPE_F32
_SUM2, _COUNTS = ".in_sum2", ".counts"


@dataclass
class ImportanceMatrix:
    """Per weight (GGUF name): the sum of squared inputs per column and the tokens summed.

    ``sums`` are float64 ``(columns,)`` tensors and ``counts`` int64 scalars: plain sums,
    so that matrices of disjoint calibration text add up exactly (:meth:`add`).
    """

    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, Tensor] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_size: int = LEGACY_CHUNK_SIZE
    """Tokens per calibration chunk (llama.cpp's context length)."""

    @property
    def chunk_count(self) -> int:
        """Whole chunks of the most-seen weight (llama.cpp's ``imatrix.chunk_count``)."""
        return max((int(c) for c in self.counts.values()), default=0) // max(1, self.chunk_size)

    def names(self) -> list[str]:
        return sorted(self.sums)

    def add(self, name: str, sum_sq: Tensor, count: int | Tensor) -> None:
        """Fold ``count`` more tokens whose squared inputs per column sum to ``sum_sq`` into ``name``."""
        sum_sq = sum_sq.detach().to(device="cpu", dtype=torch.float64)
        if name in self.sums:
            if self.sums[name].shape != sum_sq.shape:
                raise ModelFormatError(
                    f"importance matrix entry {name!r} has {self.sums[name].numel()} columns; "
                    f"cannot add {sum_sq.numel()}"
                )
            self.sums[name] += sum_sq
            self.counts[name] += int(count)
        else:
            self.sums[name] = sum_sq.clone()
            self.counts[name] = torch.tensor(int(count), dtype=torch.int64)

    def values(self, name: str) -> Tensor:
        """float32 mean of the squared inputs per column of ``name``: what the quantizers take
        (all ones where no token was seen, as llama-quantize does)."""
        count = int(self.counts[name])
        if count <= 0:
            return torch.ones_like(self.sums[name], dtype=torch.float32)
        return (self.sums[name] / count).to(torch.float32)

    def save(self, path: str | Path, format: str | None = None) -> Path:
        """Write the matrix atomically in llama.cpp's ``format`` (``"gguf"`` or ``"dat"``;
        default: from the suffix, ``.dat`` for the legacy one, else GGUF)."""
        path = Path(path)
        format = format or ("dat" if path.suffix.lower() == ".dat" else "gguf")
        if format not in FORMATS:
            raise ConfigValueError("ImportanceMatrix.save", "format", format, ", ".join(map(repr, FORMATS)))
        if not self.sums:
            raise ModelFormatError("an empty importance matrix cannot be saved (llama.cpp refuses to read one)")
        data = _gguf_bytes(self) if format == "gguf" else _dat_bytes(self)
        with atomic_path(path, directory=False) as tmp:
            tmp.write_bytes(data)
        return path


def load_imatrix(path: str | Path) -> ImportanceMatrix:
    """Read a llama.cpp importance matrix, GGUF or legacy (told apart by the GGUF magic, as llama.cpp does)."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except OSError as exc:
        raise ModelFormatError(f"importance matrix {str(path)!r} cannot be read: {exc}") from exc
    return _read_gguf(path) if magic == _GGUF_MAGIC else _read_dat(path)


# ----------------------------------------------------------------------------- GGUF


def _gguf_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _pad(size: int) -> int:
    return -size % DEFAULT_ALIGNMENT


def _gguf_bytes(matrix: ImportanceMatrix) -> bytes:
    """The bytes llama.cpp's ``gguf_write_to_file`` writes for this matrix."""
    kv = [
        _gguf_string("general.type") + struct.pack("<I", GGUFValueType.STRING) + _gguf_string("imatrix"),
        _gguf_string("imatrix.datasets")
        + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, len(matrix.datasets))
        + b"".join(_gguf_string(d) for d in matrix.datasets),
        _gguf_string("imatrix.chunk_count") + struct.pack("<II", GGUFValueType.UINT32, matrix.chunk_count),
        _gguf_string("imatrix.chunk_size") + struct.pack("<II", GGUFValueType.UINT32, matrix.chunk_size),
    ]
    infos, blobs, offset = [], [], 0
    for name in matrix.names():
        for suffix, values in (
            (_SUM2, matrix.sums[name].to(torch.float32).numpy()),
            (_COUNTS, np.array([float(matrix.counts[name])], dtype=np.float32)),
        ):
            # ggml_n_dims drops trailing dimensions of 1: a (columns x 1) tensor is written as 1-d
            infos.append(_gguf_string(name + suffix) + struct.pack("<IqIQ", 1, values.size, _F32, offset))
            blob = values.astype("<f4").tobytes()
            blobs.append(blob + bytes(_pad(len(blob))))
            offset += len(blobs[-1])
    head = _GGUF_MAGIC + struct.pack("<IqQ", _GGUF_VERSION, len(infos), len(kv)) + b"".join(kv) + b"".join(infos)
    return head + bytes(_pad(len(head))) + b"".join(blobs)


def _read_gguf(path: Path) -> ImportanceMatrix:
    header = read_header(path)
    fields = header.fields

    def field_value(key: str, kind: GGUFValueType, item: GGUFValueType | None = None):
        found = fields.get(key)
        if found is None:
            raise ModelFormatError(f"{str(path)!r} has no {key!r}: not a llama.cpp importance matrix")
        if found.type is not kind or found.item_type is not item:
            raise ModelFormatError(f"{str(path)!r}: {key!r} is {found.describe()}, expected {kind.name.lower()}")
        return found.value

    kind = fields.get("general.type")
    if kind is None or kind.value != "imatrix":
        found = None if kind is None else kind.value
        raise ModelFormatError(f"{str(path)!r} is a GGUF file of general.type {found!r}, not an importance matrix")
    matrix = ImportanceMatrix(
        datasets=list(field_value("imatrix.datasets", GGUFValueType.ARRAY, GGUFValueType.STRING)),
        chunk_size=int(field_value("imatrix.chunk_size", GGUFValueType.UINT32)),
    )
    names = sorted({n.removesuffix(_SUM2) for n in header.tensors if n.endswith(_SUM2)})
    if not names:
        raise ModelFormatError(f"{str(path)!r} holds no '<weight>{_SUM2}' tensor")
    for name in names:
        sums, counts = header.tensors[name + _SUM2], header.tensors.get(name + _COUNTS)
        if counts is None:
            raise ModelFormatError(f"{str(path)!r}: {name + _SUM2!r} has no {name + _COUNTS!r} beside it")
        for info in (sums, counts):
            if info.qtype != "F32":
                raise ModelFormatError(f"{str(path)!r}: {info.name!r} is {info.qtype}; llama.cpp writes F32")
        n_counts = math.prod(counts.shape)
        if n_counts != 1:
            raise ModelFormatError(
                f"{str(path)!r}: {name!r} stacks {n_counts} matrices (a mixture of experts); quantkit's GGUF "
                "backend quantizes dense models only"
            )
        values = np.frombuffer(header.tensor_bytes(sums).tobytes(), dtype="<f4").astype(np.float64)
        count = np.frombuffer(header.tensor_bytes(counts).tobytes(), dtype="<f4")[0]
        if not (np.isfinite(values).all() and np.isfinite(count)):
            raise ModelFormatError(f"{str(path)!r}: {name!r} holds non-finite values")
        matrix.add(name, torch.from_numpy(values), round(float(count)))
    return matrix


# ----------------------------------------------------------------------------- legacy


def _dat_bytes(matrix: ImportanceMatrix) -> bytes:
    """The bytes llama.cpp's ``save_imatrix_legacy`` writes: values ``(sum / count) * ncall`` in float32."""
    parts = [struct.pack("<i", len(matrix.sums))]
    for name in matrix.names():
        sums = matrix.sums[name].to(torch.float32).numpy()
        count = np.float32(int(matrix.counts[name]))
        ncall = -(-int(matrix.counts[name]) // matrix.chunk_size)
        if count == 0:  # llama.cpp stores 1 for a weight that saw no token
            values = np.ones_like(sums)
        else:
            values = (sums / count) * np.float32(ncall)
        encoded = name.encode("utf-8")
        parts += [struct.pack("<i", len(encoded)), encoded, struct.pack("<ii", ncall, sums.size)]
        parts.append(values.astype("<f4").tobytes())
    dataset = (matrix.datasets[-1] if matrix.datasets else "").encode("utf-8")
    parts += [struct.pack("<ii", matrix.chunk_count, len(dataset)), dataset]
    return b"".join(parts)


def _read_dat(path: Path) -> ImportanceMatrix:
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or n > len(data) - pos:
            raise ModelFormatError(
                f"{str(path)!r}: {what} needs {n} bytes at offset {pos}, but the file ends at {len(data)} "
                "(not a llama.cpp importance matrix, or truncated)"
            )
        pos += n
        return data[pos - n : pos]

    def int32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = int32("the entry count")
    if n_entries < 1:
        raise ModelFormatError(f"{str(path)!r}: entry count {n_entries}; a llama.cpp importance matrix has at least 1")
    matrix = ImportanceMatrix(chunk_size=LEGACY_CHUNK_SIZE)
    for i in range(n_entries):
        try:
            name = take(int32(f"entry {i}'s name length"), f"entry {i}'s name").decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{str(path)!r}: entry {i}'s name is not UTF-8") from None
        ncall, nval = int32(f"{name!r}'s call count"), int32(f"{name!r}'s value count")
        if nval < 1 or ncall < 0:
            raise ModelFormatError(f"{str(path)!r}: {name!r} has {nval} values and {ncall} calls")
        values = np.frombuffer(take(4 * nval, f"{name!r}'s values"), dtype="<f4").astype(np.float64)
        if not np.isfinite(values).all():
            raise ModelFormatError(f"{str(path)!r}: {name!r} holds non-finite values")
        # llama-quantize's means are values / ncall (the values themselves when ncall is 0)
        matrix.add(name, torch.from_numpy(values * LEGACY_CHUNK_SIZE), max(ncall, 1) * LEGACY_CHUNK_SIZE)
    if pos + 8 <= len(data):  # the optional trailer: chunk count, dataset name
        pos += 4
        dataset = take(int32("the dataset name length"), "the dataset name")
        if dataset:
            matrix.datasets.append(dataset.decode("utf-8", errors="replace"))
    return matrix
