"""A llama ``.gguf`` read one module at a time, as a float checkpoint to quantize by streaming.

:class:`GGUFCheckpoint` is a :class:`~quantkit.core.streamed_checkpoints.StreamedCheckpoint`
over one ``.gguf`` file: its header, key types and hyperparameters are checked against its
tensors (:func:`~.reader.read_llama`) and the transformers llama they describe is built on the
meta device (:func:`~.reader.empty_llama`); then each tensor is read from the memory-mapped
file under its transformers name, ``attn_q``/``attn_k`` rows back in transformers' order, F32,
F16 and BF16 tensors as views of the file's pages where they can be, quantized ones
(Q8_0, Q4_K, ...) decoded by :func:`~.quants.dequantize`, one tensor at a time.

Every tensor comes in the checkpoint's :attr:`~GGUFCheckpoint.dtype`: float16 when every matrix
of the file is F16, bfloat16 when every one is BF16, float32 otherwise (quantized, F32 or mixed
matrices); the F32 norms of an F16 or BF16 file are cast to it, as
``quantkit.models.load_model(path, dtype=...)`` casts them. The GGUF backend gives it to
:func:`quantkit.quantize_streaming` for a ``.gguf`` path (:meth:`~quantkit.Backend.stream_source`).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from quantkit.core.errors import ModelFormatError
from quantkit.core.safetensors_files import StoredTensor
from quantkit.core.serialization import tied_parameter_names
from quantkit.core.streamed_checkpoints import StreamedCheckpoint

from . import quants
from .header import TensorInfo
from .reader import empty_llama, hf_names, hf_row_order, read_llama, rope_freqs
from .rope import ROPE_FREQS

GGUF_SUFFIX = ".gguf"
FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
"""The ggml float types, with the torch dtype they are read in."""


class GGUFCheckpoint(StreamedCheckpoint):
    """The llama ``.gguf`` at ``path``, checked, with :attr:`model` its architecture on the meta device
    and :attr:`stored` its tensors under their transformers names (``dtype`` and ``shape`` as read,
    ``offset`` where their bytes start in the file). :attr:`rope_freqs` holds the file's llama3 rope
    divisors (``rope_freqs.weight``, not a parameter) or None; the model keeps transformers' default
    rotary embedding, as ``quantkit.models.load_model`` reads it. A context manager: leaving it lets
    the memory-mapped file go."""

    def __init__(self, path: str | os.PathLike):  # replaces the base class's reading of a folder
        self.path = Path(path)
        self.directory = self.path.parent
        header, shape = read_llama(self.path)
        self._header = header
        infos = {name: info for name, info in header.tensors.items() if name != ROPE_FREQS}
        unknown = sorted({info.qtype for info in infos.values()} - set(quants.QUANT_TYPES))
        if unknown:
            raise ModelFormatError(
                f"{str(self.path)!r} holds {', '.join(unknown)} tensors; quantkit decodes "
                f"{', '.join(quants.QUANT_TYPES)}"
            )
        self.dtype = _checkpoint_dtype(infos.values())
        self.rope_freqs = rope_freqs(header)
        self.model = empty_llama(header, shape, self.dtype)
        self.model.config._name_or_path = str(self.path)
        names = hf_names(self.model)
        self._infos = {names[name]: info for name, info in infos.items()}  # read_llama checked every name
        self.stored = {
            key: StoredTensor(self.path, self.dtype, info.shape[::-1], info.start) for key, info in self._infos.items()
        }
        slots = self.model.state_dict()
        wrong = [key for key, entry in self.stored.items() if tuple(slots[key].shape) != entry.shape]
        missing = sorted(set(slots) - set(self.stored) - tied_parameter_names(self.model))
        if wrong or missing:  # read_llama's checks make this unreachable unless transformers' llama changes
            raise ModelFormatError(
                f"{str(self.path)!r} does not match transformers' llama: shapes of {wrong[:5]}, missing {missing[:5]}"
            )
        self._maps: dict[Path, mmap.mmap] = {}

    def read_tensor(self, name: str) -> torch.Tensor:
        """One tensor, in :attr:`dtype`, on the CPU: a view of the file's pages (a private mapping, as
        :meth:`StreamedCheckpoint.read_tensor`) when stored in that dtype, aligned and not reordered,
        else a copy (decoded, cast or reordered)."""
        entry, info = self.stored[name], self._infos[name]
        try:
            tensor = self._decode(info, entry.shape)
            order = hf_row_order(info.name, entry.shape[0], self.model.config)
            if order is not None:
                tensor = tensor[order]
            return tensor.to(self.dtype)
        except ModelFormatError:
            raise
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelFormatError(f"{str(self.path)!r}: tensor {info.name!r} could not be read: {exc}") from exc

    def tokenizer(self) -> Any:
        """The transformers tokenizer the file's ``tokenizer.*`` metadata describes (transformers'
        GGUF conversion); ``save_pretrained`` writes its files beside a streamed output."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.directory, gguf_file=self.path.name)
        except Exception as exc:  # transformers' conversion raises many kinds on metadata it cannot use
            raise ModelFormatError(f"{str(self.path)!r}: transformers cannot build its tokenizer: {exc}") from exc

    def _decode(self, info: TensorInfo, shape: tuple[int, ...]) -> torch.Tensor:
        """Tensor ``info`` of transformers ``shape`` in its file dtype (quantized types: float32)."""
        if info.nbytes == 0:
            return torch.empty(shape, dtype=FILE_DTYPES.get(info.qtype, torch.float32))
        mapped, dtype = self._mapped(), FILE_DTYPES.get(info.qtype)
        if dtype is None:
            data = torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=info.start)
            return quants.dequantize(data, info.qtype, shape)
        if info.start % dtype.itemsize:  # unaligned: copy
            data = bytearray(mapped[info.start : info.start + info.nbytes])
            return torch.frombuffer(data, dtype=dtype).view(shape)
        return torch.frombuffer(mapped, dtype=dtype, count=info.nbytes // dtype.itemsize, offset=info.start).view(shape)

    def _mapped(self) -> mmap.mmap:
        mapped = self._maps.get(self.path)
        if mapped is None:
            with self.path.open("rb") as file:
                size = file.seek(0, os.SEEK_END)
                if size != self._header.size:  # reading past a shrunk file's end would crash the process
                    raise ModelFormatError(
                        f"{str(self.path)!r} has {size} bytes, not the {self._header.size} its header was read from"
                    )
                mapped = self._maps[self.path] = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        return mapped


def _checkpoint_dtype(infos: Iterable[TensorInfo]) -> torch.dtype:
    """float16 or bfloat16 when every matrix is stored in it, else float32 (holds every type exactly)."""
    types = {info.qtype for info in infos if len(info.shape) > 1}
    return FILE_DTYPES[types.pop()] if types in ({"F16"}, {"BF16"}) else torch.float32
