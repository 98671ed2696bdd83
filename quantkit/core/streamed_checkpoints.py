"""A float checkpoint folder read one module at a time, never whole.

:class:`StreamedCheckpoint` checks the folder as loading a saved model does (``config.json``,
the safetensors headers and index, the sizes against each other, every stored tensor against
the model's parameters, none missing) and builds the model on the meta device; then
:meth:`~StreamedCheckpoint.tensors` materialises the tensors of one module from the
memory-mapped shards, in their stored dtype, and lets them go when its block ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .empty_models import empty_model
from .errors import ModelFormatError
from .safetensors_files import stored_tensors
from .serialization import CONFIG_NAME, check_stored, read_model_config, tied_parameter_names


class StreamedCheckpoint:
    """The float checkpoint in ``directory`` (one ``model.safetensors`` or shards and their
    index), checked, with :attr:`model` its architecture on the meta device. A context manager:
    leaving it closes the memory-mapped shards."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        raw = read_model_config(self.directory)
        source = str(self.directory / CONFIG_NAME)
        if "quantization_config" in raw:
            raise ModelFormatError(f"{source!r} has a quantization_config: quantize from the float original")
        self.stored = stored_tensors(self.directory)
        self.model = empty_model(raw, stored=self.stored, source=source)
        check_stored(self.model, self.stored)
        expected = set(self.model.state_dict()) - tied_parameter_names(self.model)
        missing, unexpected = sorted(expected - set(self.stored)), sorted(set(self.stored) - expected)
        if missing or unexpected:
            raise ModelFormatError(
                f"{str(self.directory)!r} does not match its architecture: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        self._files = ExitStack()
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> StreamedCheckpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the shards opened so far."""
        self._files.close()
        self._handles.clear()

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

    def read_tensor(self, name: str) -> torch.Tensor:
        """One stored tensor, read from its memory-mapped shard on the CPU."""
        path = self.stored[name].file
        try:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = self._files.enter_context(safe_open(path, framework="pt"))
            return handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelFormatError(f"{str(path)!r}: tensor {name!r} could not be read: {exc}") from exc
