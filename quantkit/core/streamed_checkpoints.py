"""A float checkpoint folder read one module at a time, never whole.

:class:`StreamedCheckpoint` checks the folder as loading a saved model does (``config.json``,
the safetensors headers and index, the sizes against each other, every stored tensor against
the model's parameters, none missing) and builds the model on the meta device; then
:meth:`~StreamedCheckpoint.tensors` materialises the tensors of one module from the
memory-mapped shards, in their stored dtype, and lets them go when its block ends;
:meth:`~StreamedCheckpoint.materialise` fills one submodule of the model in place (moving it
back to the meta device, ``module.to("meta")``, lets its tensors go).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .empty_models import empty_model
from .errors import ModelFormatError
from .safetensors_files import stored_tensors
from .serialization import CONFIG_NAME, check_stored, read_model_config, tied_parameter_names


class StreamedCheckpoint:
    """The float checkpoint in ``directory`` (one ``model.safetensors`` or shards and their
    index), checked, with :attr:`model` its architecture on the meta device. A context manager:
    leaving it lets the memory-mapped shards go."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        raw = read_model_config(self.directory)
        source = str(self.directory / CONFIG_NAME)
        if "quantization_config" in raw:
            raise ModelFormatError(f"{source!r} has a quantization_config: quantize from the float original")
        self.stored = stored_tensors(self.directory)
        self.model = empty_model(raw, stored=self.stored, source=source)
        self.model.config._name_or_path = str(self.directory)  # as from_pretrained sets it
        check_stored(self.model, self.stored)
        expected = set(self.model.state_dict()) - tied_parameter_names(self.model)
        missing, unexpected = sorted(expected - set(self.stored)), sorted(set(self.stored) - expected)
        if missing or unexpected:
            raise ModelFormatError(
                f"{str(self.directory)!r} does not match its architecture: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        self._maps: dict[Path, mmap.mmap] = {}

    def __enter__(self) -> StreamedCheckpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Let the shards mapped so far go (each is unmapped when no tensor read from it is left)."""
        self._maps.clear()

    def tokenizer(self) -> Any:
        """The tokenizer the checkpoint carries inside it (a single-file format's), or None: a
        folder's tokenizer files are read and copied as they are."""
        return None

    def modules(self) -> list[tuple[str, list[str]]]:
        """Every module owning stored tensors, in the model's order, with their full names."""
        groups: dict[str, list[str]] = {}
        for key in self.model.state_dict():
            if key in self.stored:
                groups.setdefault(key.rpartition(".")[0], []).append(key)
        return list(groups.items())

    @contextmanager
    def tensors(self, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
        """The stored tensors ``names``, materialised for the block and released after it
        (unless the block keeps references)."""
        tensors = {name: self.read_tensor(name) for name in names}
        try:
            yield tensors
        finally:
            tensors.clear()

    def materialise(self, module: str, *, writable: bool = False) -> dict[str, torch.Tensor]:
        """Give the submodule ``module`` of :attr:`model` its stored tensors (assigned in place: same
        module objects); return them by full name. They are views of the mapped shards
        (:meth:`read_tensor`) unless ``writable``: then copies in process memory, for a module whose
        tensors will be written to (the pages a write copies from a mapping stay until it closes;
        a copy goes when the module lets it go)."""
        target = self.model.get_submodule(module)
        names = [name for name in target.state_dict(prefix=f"{module}.") if name in self.stored]
        tensors = {name: self.read_tensor(name) for name in names}
        if writable:
            tensors = {name: tensor.clone() for name, tensor in tensors.items()}
        target.load_state_dict({name[len(module) + 1 :]: t for name, t in tensors.items()}, assign=True)
        return tensors

    def read_tensor(self, name: str) -> torch.Tensor:
        """One stored tensor on the CPU, backed by its shard's pages (a private mapping: reading
        costs page cache, which the kernel can reclaim, not process memory; writing to the
        tensor copies the pages it touches and never changes the file)."""
        entry = self.stored[name]
        if entry.numel == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        try:
            mapped = self._maps.get(entry.file)
            if mapped is None:
                with entry.file.open("rb") as file:
                    mapped = self._maps[entry.file] = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
            if entry.offset % entry.dtype.itemsize:  # unaligned: copy
                data = bytearray(mapped[entry.offset : entry.offset + entry.nbytes])
                return torch.frombuffer(data, dtype=entry.dtype).view(entry.shape)
            tensor = torch.frombuffer(mapped, dtype=entry.dtype, count=entry.numel, offset=entry.offset)
            return tensor.view(entry.shape)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelFormatError(f"{str(entry.file)!r}: tensor {name!r} could not be read: {exc}") from exc
