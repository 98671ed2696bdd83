"""Writing a checkpoint's safetensors shards tensor by tensor, never holding the checkpoint.

Each tensor's bytes go to disk as it is added, into a scratch file of the shard being filled;
closing a shard writes its safetensors header and copies the data after it, widest dtype first,
then by name, so that every tensor is aligned (the safetensors library also orders by width).
Memory holds the tensor being added and a copy buffer, whatever the checkpoint's size.

The folder gets the hub's layout: ``model.safetensors`` when one shard suffices, else
``model-00001-of-0000N.safetensors``... and ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .atomic import fsync_path
from .errors import ConfigValueError, QuantkitError
from .safetensors_files import (
    DTYPE_NAMES,
    DTYPES,
    INDEX_NAME,
    SAFETENSORS_METADATA,
    WEIGHTS_NAME,
    header_bytes,
    read_header,
)

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
"""The hub's shard size (5 GB)."""
SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
COPY_BYTES = 64 * 2**20
"""Bytes copied at a time from a shard's scratch file into the shard."""


class ShardWriter:
    """Writes tensors into the folder ``directory`` in shards of at most ``max_shard_bytes``
    of tensor data (a larger tensor gets a shard of its own); :meth:`finish` names the shards
    and writes the index.

    ``on_close(state)`` is called each time a shard is complete on disk, with :meth:`state`: the
    journal from which :meth:`resume` continues an interrupted writer after its last complete shard.
    :meth:`checkpoint` makes every tensor added so far durable, the shard being filled included.
    """

    def __init__(
        self,
        directory: Path,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        on_close: Callable[[dict[str, Any]], None] | None = None,
    ):
        if type(max_shard_bytes) is not int or max_shard_bytes <= 0:
            raise ConfigValueError("ShardWriter", "max_shard_bytes", max_shard_bytes, "a positive integer")
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.total_bytes = 0
        self._on_close = on_close
        self._shards: list[Path] = []
        self._shard_bytes: list[int] = []
        self._weight_map: dict[str, int] = {}
        self._entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        self._scratch = None
        self._scratch_bytes = 0
        self._synced = 0  # complete shards flushed to disk by checkpoint()
        self._closed_scratch: list[Path] | None = None  # kept from the first checkpoint on: it may name them

    def state(self) -> dict[str, Any]:
        """The complete shards (file, data bytes, tensor names) as JSON-ready data."""
        names: list[list[str]] = [[] for _ in self._shards]
        for name, shard in self._weight_map.items():
            if shard < len(self._shards):
                names[shard].append(name)
        return {
            "shards": [
                {"file": path.name, "bytes": size, "tensors": sorted(tensors)}
                for path, size, tensors in zip(self._shards, self._shard_bytes, names, strict=True)
            ]
        }

    def checkpoint(self, commit: Callable[[dict[str, Any]], None]) -> None:
        """Flush every tensor added so far to disk, then call ``commit`` with the state :meth:`resume`
        continues from at this very point: :meth:`state` and the shard being filled (``open``: its
        scratch file, length and tensors). A shard closed after a checkpoint keeps its scratch file
        until the next ``commit`` returns, as the state committed before may name it."""
        for path in self._shards[self._synced :]:
            fsync_path(path)
        self._synced = len(self._shards)
        state = self.state()
        if self._scratch is not None:
            self._scratch.flush()
            os.fsync(self._scratch.fileno())
            tensors = {name: [DTYPE_NAMES[dtype], *rest] for name, (dtype, *rest) in self._entries.items()}
            state["open"] = {"file": Path(self._scratch.name).name, "bytes": self._scratch_bytes, "tensors": tensors}
        fsync_path(self.directory)
        commit(state)
        for path in self._closed_scratch or ():
            path.unlink(missing_ok=True)
        self._closed_scratch = []

    def resume(self, state: dict[str, Any]) -> None:
        """Adopt the complete shards a :meth:`state` of an earlier writer of this folder lists, after
        checking each holds exactly its tensors; the shard that writer was filling is started over,
        or, from a :meth:`checkpoint`'s state, continued after the tensors it had then."""
        if self._shards or self._weight_map:
            raise QuantkitError("a writer resumes before it writes")
        for shard in state["shards"]:
            path = self.directory / shard["file"]
            try:
                header = read_header(path)
            except (OSError, QuantkitError) as error:
                raise QuantkitError(f"the interrupted run's shard {path} is unreadable: {error}") from error
            if sorted(header) != sorted(shard["tensors"]):
                raise QuantkitError(f"the interrupted run's shard {path} does not hold the tensors its journal lists")
            for name in shard["tensors"]:
                self._weight_map[name] = len(self._shards)
            self._shards.append(path)
            self._shard_bytes.append(shard["bytes"])
            self.total_bytes += shard["bytes"]
        if "open" in state:
            self._reopen(state["open"])

    def _reopen(self, shard: dict[str, Any]) -> None:
        """Continue filling the shard a :meth:`checkpoint` recorded as ``open``, cut back to its length then."""
        path, size = self.directory / f".shard-{len(self._shards) + 1}.part", shard["bytes"]
        if shard["file"] != path.name or not path.is_file() or path.stat().st_size < size:
            raise QuantkitError(f"the interrupted run's unfinished shard {path} is missing or truncated")
        self._scratch = path.open("r+b")
        self._scratch.truncate(size)
        self._scratch.seek(size)
        self._scratch_bytes = size
        self.total_bytes += size
        self._closed_scratch = []
        for name, (dtype, shape, begin, end) in shard["tensors"].items():
            self._entries[name] = (DTYPES[dtype], shape, begin, end)
            self._weight_map[name] = len(self._shards)

    def written(self, name: str) -> bool:
        """Whether ``name`` is in a complete shard."""
        return self._weight_map.get(name, len(self._shards)) < len(self._shards)

    def add(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Write ``tensor`` (any device) as ``name``, cast to ``dtype`` if given: a piece of at most
        :data:`COPY_BYTES` at a time, so that casting a large tensor (an 8B model's 2 GiB float32
        head) never holds its cast copy whole."""
        dtype = dtype or tensor.dtype
        if name in self._weight_map:
            raise QuantkitError(f"tensor {name!r} is written twice")
        if dtype not in DTYPE_NAMES:
            raise QuantkitError(f"tensor {name!r} has dtype {dtype}; safetensors stores {', '.join(DTYPES)}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        nbytes = flat.numel() * dtype.itemsize
        if self._entries and self._scratch_bytes + nbytes > self.max_shard_bytes:
            self._close_shard()
        if self._scratch is None:
            self._scratch = (self.directory / f".shard-{len(self._shards) + 1}.part").open("w+b")
            self._scratch_bytes = 0
        step = max(1, COPY_BYTES // max(flat.element_size(), dtype.itemsize))
        for start in range(0, flat.numel(), step):  # pieces of COPY_BYTES: a cast holds one at a time
            self._scratch.write(flat[start : start + step].to(dtype).contiguous().view(torch.uint8).numpy())
        self._entries[name] = (dtype, list(tensor.shape), self._scratch_bytes, self._scratch_bytes + nbytes)
        self._weight_map[name] = len(self._shards)
        self._scratch_bytes += nbytes
        self.total_bytes += nbytes

    def finish(self) -> list[str]:
        """Close the last shard, give the shards their final names, write the index when there
        are several; the names of the files written."""
        if self._scratch is not None:
            self._close_shard()
        if not self._shards:
            raise QuantkitError("no tensor was written; a checkpoint needs at least one")
        count = len(self._shards)
        names = [WEIGHTS_NAME] if count == 1 else [SHARD_NAME.format(index=i + 1, count=count) for i in range(count)]
        for shard, name in zip(self._shards, names, strict=True):
            shard.rename(self.directory / name)
        if count == 1:
            return names
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {key: names[shard] for key, shard in sorted(self._weight_map.items())},
        }
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [*names, INDEX_NAME]

    def _close_shard(self) -> None:
        """Write the shard being filled (header, then its scratch data in safetensors' order)."""
        scratch, entries = self._scratch, self._entries
        head, order = header_bytes(
            {key: (dtype, shape, end - begin) for key, (dtype, shape, begin, end) in entries.items()},
            SAFETENSORS_METADATA,
        )
        shard = self.directory / f".shard-{len(self._shards) + 1}.safetensors"
        with shard.open("wb") as out:
            out.write(head)
            for key in order:
                _, _, begin, end = entries[key]
                scratch.seek(begin)
                while begin < end:
                    chunk = scratch.read(min(COPY_BYTES, end - begin))
                    if not chunk:
                        raise QuantkitError(f"{scratch.name!r} ended before tensor {key!r}: was it changed meanwhile?")
                    out.write(chunk)
                    begin += len(chunk)
        scratch.close()
        if self._closed_scratch is None:
            Path(scratch.name).unlink()
        else:
            self._closed_scratch.append(Path(scratch.name))
        self._shards.append(shard)
        self._shard_bytes.append(sum(end - begin for _, _, begin, end in entries.values()))
        self._scratch, self._entries = None, {}
        if self._on_close is not None:
            self._on_close(self.state())
