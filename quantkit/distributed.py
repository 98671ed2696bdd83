"""Data-parallel calibration over ``torch.distributed``: who holds which samples, and the reductions.

Launch any calibrating command with ``torchrun --nproc-per-node N -m quantkit quantize ...``:
:func:`session` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and joins the process group (NCCL when CUDA is present,
gloo otherwise). In one process (no ``WORLD_SIZE``, or 1) nothing is initialised and every
operation below is the identity, so a single process computes exactly what it always did.

Each rank calibrates on a disjoint share of the samples (sample ``i`` goes to rank
``i % world``); statistics are summed across ranks; each expensive per-linear solve is given
to one rank (:meth:`Distributed.owners`) and its result broadcast to the others, so every rank
holds the same quantized layer before running its samples through it. Statistics are summed
in float64 (:class:`quantkit.layerwise.HessianAccumulator`, AWQ's), where the order of the
terms does not show at float32 precision: any number of ranks gives the bits of one process.

Environment: ``QUANTKIT_DIST_TIMEOUT``, seconds a collective waits for the other ranks (default
1800); a rank that dies or stops answering makes the others raise :class:`DistributedError`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as td

from .core.errors import QuantizationError

TIMEOUT_ENV = "QUANTKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0

T = TypeVar("T")


class DistributedError(QuantizationError):
    """A distributed run failed: bad launch settings, or a rank died or stopped answering."""


@dataclasses.dataclass
class Distributed:
    """This process's place in a data-parallel calibration run (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    """Where collectives run: the rank's own GPU under NCCL, else the CPU."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    loads: list[float] = dataclasses.field(default_factory=list)
    """Cost of the solves given to each rank so far (:meth:`owners` balances it)."""

    @property
    def is_main(self) -> bool:
        """The rank that writes outputs and prints reports."""
        return self.rank == 0

    def sample_ids(self, nsamples: int) -> torch.Tensor:
        """The global indices of the calibration samples this rank calibrates on."""
        return torch.arange(self.rank, nsamples, self.world)

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The rank that runs each of these solves: the largest first, each to the least loaded rank
        (loads carried over from earlier calls). Every rank computes the same answer."""
        if not self.loads:
            self.loads = [0.0] * self.world
        owners = [0] * len(costs)
        for index in sorted(range(len(costs)), key=lambda i: -costs[i]):
            rank = min(range(self.world), key=lambda r: self.loads[r])
            owners[index] = rank
            self.loads[rank] += costs[index]
        return owners

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; every rank gets the same bits."""
        if self.world > 1:
            with self._collective("all_reduce"):
                buffer = tensor.to(self.device).contiguous()
                td.all_reduce(buffer)
                tensor.copy_(buffer)
        return tensor

    def reduce(self, tensor: torch.Tensor, dst: int | None) -> torch.Tensor | None:
        """Sum ``tensor`` over the ranks onto ``dst`` (every rank when ``None``); in place.
        Returns it on the ranks that receive the sum, ``None`` on the others."""
        if dst is None:
            return self.all_reduce(tensor)
        if self.world > 1:
            with self._collective("reduce"):
                buffer = tensor.to(self.device).contiguous()
                td.reduce(buffer, dst)
                tensor.copy_(buffer)
        return tensor if self.rank == dst else None

    def broadcast(self, value: T | None, src: int) -> T:
        """``src``'s ``value`` on every rank: a tensor, or a dataclass whose tensor fields are sent
        as tensors (other fields as picklable objects between the ranks)."""
        if self.world == 1:
            return value
        with self._collective("broadcast"):
            header: list[Any] = [_header(value) if self.rank == src else None]
            td.broadcast_object_list(header, src, device=self.device if self.device.type == "cuda" else None)
            kind, plain, specs = header[0]
            tensors = {}
            for name, (shape, dtype) in specs.items():
                source = value if kind == "tensor" else getattr(value, name, None)
                buffer = (
                    source.to(self.device).contiguous()  # gloo sends the storage as laid out
                    if self.rank == src
                    else torch.empty(shape, dtype=dtype, device=self.device)
                )
                td.broadcast(buffer, src)
                tensors[name] = buffer
        if self.rank == src:
            return value
        if kind == "tensor":
            return tensors[""]
        return kind(**plain, **tensors)

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.world > 1:
            with self._collective("barrier"):
                td.barrier()

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed; another rank exited or did not answer "
                f"within {TIMEOUT_ENV}={self.timeout_s:g} s, so this run is aborted and writes nothing "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from exc


def _header(value: Any) -> tuple[Any, dict[str, Any], dict[str, tuple[torch.Size, torch.dtype]]]:
    if isinstance(value, torch.Tensor):
        return "tensor", {}, {"": (value.shape, value.dtype)}
    if not dataclasses.is_dataclass(value):
        raise TypeError(f"Distributed.broadcast sends tensors and dataclasses, not {type(value).__name__}")
    plain, specs = {}, {}
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if isinstance(item, torch.Tensor):
            specs[f.name] = (item.shape, item.dtype)
        else:
            plain[f.name] = item
    return type(value), plain, specs


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise DistributedError(f"environment variable {name}={raw!r} is invalid; allowed: an integer >= 0")
    return int(raw)


def _timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        timeout = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise DistributedError(f"environment variable {TIMEOUT_ENV}={raw!r} is invalid; allowed: seconds > 0")
    return timeout


def session() -> Distributed:
    """This process's :class:`Distributed`, joining torchrun's process group on first use.

    One process (``WORLD_SIZE`` unset or 1, no process group initialised) gets rank 0 of 1
    and initialises nothing. A process group the caller initialised already is used as is.
    """
    timeout = _timeout()
    if td.is_available() and td.is_initialized():
        backend = td.get_backend()
        device = _device(backend)
        return Distributed(td.get_rank(), td.get_world_size(), device, timeout)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Distributed(timeout_s=timeout)
    rank = _env_int("RANK", 0)
    if not td.is_available():
        raise DistributedError(f"WORLD_SIZE={world} asks for {world} ranks, but this torch has no torch.distributed")
    if rank >= world:
        raise DistributedError(f"environment variable RANK={rank} is invalid; allowed: 0 to WORLD_SIZE-1={world - 1}")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    try:
        td.init_process_group(backend, timeout=timedelta(seconds=timeout), rank=rank, world_size=world)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"rank {rank} of {world} could not join the {backend} process group (MASTER_ADDR="
            f"{os.environ.get('MASTER_ADDR')!r}, MASTER_PORT={os.environ.get('MASTER_PORT')!r}): {exc}"
        ) from exc
    return Distributed(rank, world, _device(backend), timeout)


def _device(backend: str) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
