"""Writing a ``.gguf`` from a float checkpoint streamed from disk, one module in memory at a time.

The file is planned first on the meta device: the GGUF backend's empty quantized model
(:meth:`~quantkit.core.backend.Backend.prepare_for_loading`, the types its mixes give by layer)
laid out as :func:`.export.write_gguf` lays it out gives every tensor's name, shape, type and size,
so the header, metadata and tensor infos are written before any tensor is quantized. Then each
module is read from the shards, quantized by the backend's own hooks (its
:meth:`~quantkit.core.backend.Backend.linear_quantizer` and
:meth:`~quantkit.core.backend.Backend.other_quantizers`, as :meth:`GGUFBackend.quantize` runs
them), checked against its plan, written and released. The bytes are those of
``quantkit.save(quantkit.quantize(...))``.

Tensors are written in plan order, so the file up to the end of a module is what every run of the
same inputs writes there: a run handed a ``record`` callback reports that point after each module
(the file flushed to disk first), and a later run handed it back (``resumed``) keeps the file up to
it and quantizes only the modules after it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from gguf import GGUFWriter
from torch import nn

from quantkit.core.atomic import atomic_path
from quantkit.core.backend import Backend
from quantkit.core.errors import QuantizationError
from quantkit.core.heap import release_heap
from quantkit.core.linears import Target, check_finite, set_submodule
from quantkit.core.progress import track
from quantkit.core.registry import get_registry
from quantkit.core.streamed_checkpoints import StreamedCheckpoint

from .config import GGUFConfig
from .export import FileTensor, file_tensor, file_tensors, head_counts, open_writer

log = logging.getLogger("quantkit")

Record = Callable[[dict[str, int]], None]
"""Called with ``{"tensors": n, "offset": bytes}`` once the file's first ``n`` tensors are on disk."""


class _Steps(NamedTuple):
    """What each module of the file goes through: the backend's linear quantizer, its other
    quantizers (the token embedding), and the targets giving each linear its effective config."""

    quantize: Callable[[str, nn.Linear, GGUFConfig], nn.Module]
    others: dict[str, Callable[[nn.Module], dict[str, nn.Module]]]
    targets: dict[str, Target]


def write_gguf_streamed(
    checkpoint: StreamedCheckpoint,
    config: GGUFConfig,
    path: Path,
    tokenizer: Any,
    device: torch.device,
    imatrix: str | os.PathLike | None = None,
    *,
    resumed: Mapping[str, Any] | None = None,
    record: Record | None = None,
) -> None:
    """Quantize ``checkpoint`` with ``config`` into the ``.gguf`` at ``path``, one module at a time;
    ``imatrix``: a llama.cpp importance-matrix file to use instead of ``config.imatrix``.

    Without ``record`` the file appears at ``path`` complete or not at all. With it, ``path`` is a
    work file written in place and ``record`` is called after each module; ``resumed``, what an
    interrupted call on the same checkpoint, config and tokenizer recorded last, keeps the file up
    to there. A ``resumed`` the file does not bear out (its header differs, it is shorter) starts
    the file over, with a warning.
    """
    if imatrix is not None:
        config = dataclasses.replace(config, imatrix=os.fspath(imatrix))
    backend = get_registry().backend_named("gguf")
    backend.check_streaming(config)
    if record is not None:
        _write(checkpoint, backend, config, Path(path), tokenizer, device, resumed, record)
        return
    with atomic_path(Path(path), directory=False) as tmp:
        _write(checkpoint, backend, config, tmp, tokenizer, device, None, lambda _: None)


def _write(
    checkpoint: StreamedCheckpoint,
    backend: Backend,
    config: GGUFConfig,
    path: Path,
    tokenizer: Any,
    device: torch.device,
    resumed: Mapping[str, Any] | None,
    record: Record,
) -> None:
    """Write the file at ``path`` (see :func:`write_gguf_streamed`)."""
    model = checkpoint.model
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # as quantize() sees it: an earlier write's materialised embedding untied it
    planned_model = backend.prepare_for_loading(copy.deepcopy(model), config)
    plan = list(file_tensors(planned_model))
    del planned_model
    targets = {t.name: t for t in backend.targets(model, config, check_weights=False)}
    quantize = backend.linear_quantizer(model, config, list(targets.values()), None, device)
    steps = _Steps(quantize, backend.other_quantizers(model, config, device), targets)
    heads, n_layer = head_counts(model.config), model.config.num_hidden_layers
    groups = [(module, list(entries)) for module, entries in groupby(plan, key=lambda t: t.key.rpartition(".")[0])]
    writer = open_writer(path, model.config, config.quant_type, tokenizer)
    for entry in plan:
        entry.add_info(writer)
    with _opened(writer, path, plan, resumed) as (file, done):
        written = 0
        for module, entries in track(groups, "gguf (streaming .gguf)"):
            first, written = written, written + len(entries)
            if written <= done:
                continue  # on disk already
            todo = entries[max(done - first, 0) :]
            _append_all(file, _arrays(checkpoint, module, todo, steps, n_layer, heads), writer.data_alignment)
            release_heap()  # the module's arrays are let go: glibc's freed heap back to the OS
            file.flush()
            os.fsync(file.fileno())
            record({"tensors": written, "offset": file.tell()})


def _arrays(
    checkpoint: StreamedCheckpoint,
    module: str,
    entries: list[FileTensor],
    steps: _Steps,
    n_layer: int,
    heads: dict[str, int],
) -> list[np.ndarray]:
    """The data of the planned tensors ``entries`` of ``module``: read from the checkpoint,
    quantized, checked against the plan; the module's float and quantized tensors are released."""
    if module == "":  # computed from the config, not read (a llama3 rope's divisors)
        return [entry.array() for entry in entries]
    checkpoint.materialise(module)
    float_module = checkpoint.model.get_submodule(module)
    try:
        modules = _quantize(checkpoint.model, module, steps)
        tensors = modules[module].state_dict(prefix=f"{module}.")
        arrays = []
        for entry in entries:
            written = file_tensor(entry.key, tensors[entry.key], modules[module], n_layer, heads)
            _check_planned(entry, written)
            arrays.append(written.array())
        for quantized in modules.values():
            quantized.to("meta")  # the arrays taken stay
        return arrays
    finally:
        float_module.to("meta")


def _quantize(model: nn.Module, name: str, steps: _Steps) -> dict[str, nn.Module]:
    """Module ``name`` of ``model`` (materialised) as :meth:`GGUFBackend.quantize` leaves it, by
    name with the modules quantized along: the token embedding through the backend's other
    quantizers (a tied head along; ``model`` keeps its float modules), a target linear through its
    linear quantizer, any other module as it is."""
    if name in steps.others:
        floats = dict(model.named_modules())
        installed = steps.others[name](model)
        for key in installed:
            set_submodule(model, key, floats[key])  # the checkpoint's model stays the float one
        return {key: module.cpu() for key, module in installed.items()}
    module = model.get_submodule(name)
    if name in steps.targets:
        check_finite(name, module.weight)
        with torch.no_grad():
            module = steps.quantize(name, module, steps.targets[name].config).cpu()
    return {name: module}


@contextmanager
def _opened(
    writer: GGUFWriter, path: Path, plan: list[FileTensor], resumed: Mapping[str, Any] | None
) -> Iterator[tuple[BinaryIO, int]]:
    """The file at ``path`` open at the end of its first complete tensors, and their number: those
    ``resumed`` records where the file bears it out, else none after the header written anew."""
    header = path.with_name(f".{path.name}.header")
    try:
        writer.write_header_to_file(header)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    finally:
        writer.close()
    kept = None if resumed is None else _kept(path, header, plan, writer.data_alignment, resumed)
    if kept is None:
        kept = 0, header.stat().st_size
        os.replace(header, path)
    else:
        header.unlink()
        log.info("resuming %s after its first %d tensors", path.name, kept[0])
    done, offset = kept
    with open(path, "r+b") as file:
        file.truncate(offset)
        file.seek(offset)
        yield file, done


def _kept(
    path: Path, header: Path, plan: list[FileTensor], alignment: int, resumed: Mapping[str, Any]
) -> tuple[int, int] | None:
    """The tensors and byte offset ``resumed`` records (``{"tensors": n, "offset": bytes}``) when
    the file at ``path`` bears them out: it starts with this run's ``header`` and reaches the
    offset where the plan's first ``n`` tensors end. None, with a warning, when it does not."""
    tensors, offset = resumed.get("tensors"), resumed.get("offset")
    expected = header.read_bytes()
    if type(tensors) is not int or not 0 < tensors <= len(plan):
        problem = f"its record names {tensors!r} of {len(plan)} tensors"
    elif offset != _end(len(expected), plan[:tensors], alignment):
        problem = f"its record's offset {offset!r} is not where its first {tensors} tensors end"
    elif not path.is_file() or path.stat().st_size < offset:
        problem = f"it holds fewer than the {offset} bytes recorded"
    else:
        with open(path, "rb") as file:
            if file.read(len(expected)) == expected:
                return tensors, offset
        problem = "its header differs from this run's (another tokenizer or checkpoint)"
    log.warning("cannot resume %s: %s; starting over", path, problem)
    return None


def _end(start: int, tensors: list[FileTensor], alignment: int) -> int:
    """Where ``tensors`` end when written after ``start`` bytes (:func:`_append`'s layout)."""
    for tensor in tensors:
        nbytes = tensor.data.numel() * tensor.data.element_size()
        start = GGUFWriter.ggml_pad(start, alignment) + GGUFWriter.ggml_pad(nbytes, alignment)
    return start


def _append_all(file: BinaryIO, arrays: list[np.ndarray], alignment: int) -> None:
    """:func:`_append` each of ``arrays`` (a function: no loop variable keeps the last one alive)."""
    for array in arrays:
        _append(file, array, alignment)


def _append(file: BinaryIO, array: np.ndarray, alignment: int) -> None:
    """``array`` at the next multiple of ``alignment`` in ``file``, zero-padded to a multiple after
    it: :meth:`GGUFWriter.write_tensor_data`'s layout."""
    file.write(bytes(GGUFWriter.ggml_pad(file.tell(), alignment) - file.tell()))
    array.tofile(file)
    file.write(bytes(GGUFWriter.ggml_pad(array.nbytes, alignment) - array.nbytes))


def _check_planned(planned: FileTensor, written: FileTensor) -> None:
    """``written`` must have the name, shape, type and size the header announced for it."""
    got = (written.name, tuple(written.data.shape), written.data.dtype, written.raw_dtype)
    want = (planned.name, tuple(planned.data.shape), planned.data.dtype, planned.raw_dtype)
    if got != want:
        raise QuantizationError(
            f"GGUF streaming: tensor {planned.key} came out as (name, shape, dtype, type) {got}, "
            f"but the file's header announced {want}"
        )
