"""Quantizing a checkpoint larger than memory: from the float shards on disk to the quantized
shards on disk, one module (calibration-free backends: RTN, EETQ, HQQ, bitsandbytes, GGUF) or one
decoder layer (GPTQ, AWQ) at a time.

:func:`quantize_streaming` reads the float checkpoint from memory-mapped shards
(:class:`~quantkit.core.streamed_checkpoints.StreamedCheckpoint`, the model on the meta device)
and writes every tensor as it comes (:class:`~quantkit.core.shard_writer.ShardWriter`): the
folder :func:`quantkit.save` writes for the same model and config, sharded above
``max_shard_bytes``, which :func:`quantkit.load` reads.

A calibration-free backend that declares :attr:`~quantkit.core.backend.Backend.streams_modules`
runs the hooks of the template :meth:`~quantkit.core.backend.Backend.quantize` module by module:
each target linear through its :meth:`~quantkit.core.backend.Backend.linear_quantizer`, the
modules of its :meth:`~quantkit.core.backend.Backend.other_quantizers` (GGUF's token embedding),
the other tensors copied through in its :meth:`~quantkit.core.backend.Backend.placed_dtype`, each
saved as :meth:`~quantkit.core.backend.Backend.saved_tensors` lays it out: memory holds one
module's float tensors and its quantized form at a time. A calibrated one that declares
:attr:`~quantkit.core.backend.Backend.streams_layers` runs its own
:meth:`~quantkit.core.backend.Backend.quantize`, whose layer-by-layer pipeline
(:func:`quantkit.layerwise.quantize_layerwise`) takes each decoder layer from the shards just
before its turn and hands it back quantized (:class:`_StreamedLayers`, the model's
:class:`~quantkit.layerwise.LayerSource`): memory holds the embedding while the first layer's
inputs are captured, then one layer and the calibration activations. After each layer the run
is made resumable: its tensors flushed, the next layer's inputs saved in the work folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .api import calibration_ids, model_tokenizer
from .core.atomic import atomic_path
from .core.backend import Backend
from .core.config import QuantConfig
from .core.errors import ModelFormatError, QuantizationError, QuantkitError
from .core.hardware import hardware_of, resolve_device
from .core.heap import release_heap
from .core.linears import Target, check_finite
from .core.progress import track
from .core.registry import get_registry
from .core.resolve import as_config
from .core.safetensors_files import read_header
from .core.serialization import write_config
from .core.shard_writer import DEFAULT_MAX_SHARD_BYTES, ShardWriter
from .core.streamed_checkpoints import StreamedCheckpoint
from .estimate import format_seconds
from .layerwise import LAYER_SOURCE_ATTR, SPILL_ATTR, SpilledChunks, decoder_stack, load_activations, save_activations
from .memory_budget import plan_memory

log = logging.getLogger("quantkit")

JOURNAL = ".quantkit-progress.json"
"""The work folder's record of the run (config, checkpoint and calibration fingerprints) and what
it completed: shards and modules (calibration-free), or layers and the next one's inputs (calibrated)."""
LOCK = ".quantkit-run.lock"

COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
"""Files of the float checkpoint copied beside the quantized weights when present."""


def quantize_streaming(
    model_folder: str | os.PathLike,
    config: QuantConfig | Mapping[str, Any] | str,
    out_folder: str | os.PathLike,
    *,
    calibration: torch.Tensor | str | os.PathLike | Sequence[str] | None = None,
    tokenizer: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    device: torch.device | str | None = None,
    resume: bool = True,
    max_memory: int | str | None = None,
) -> Path:
    """Quantize the float checkpoint folder ``model_folder`` (``model.safetensors`` or shards
    and their index; float32, float16 or bfloat16, computed in its stored dtype), or a single-file
    checkpoint a backend streams (a llama ``.gguf``: :meth:`~quantkit.Backend.stream_source`, its
    tokenizer saved beside the output), into ``out_folder``, atomically, never holding the whole
    model; return ``out_folder``.

    ``config`` (a :class:`QuantConfig`, dict or preset name) must name a backend that quantizes
    module by module (``streams_modules``, calibration-free: RTN, EETQ, HQQ, bitsandbytes, GGUF
    with no importance matrix or one read from a file) or layer by layer (``streams_layers``:
    GPTQ, AWQ); others raise :class:`QuantizationError` listing those that can, and a config the
    backend cannot stream (a GGUF importance matrix collected from text) a
    :class:`~quantkit.ConfigValueError` naming the field. ``calibration`` and
    ``tokenizer`` are :func:`quantkit.quantize`'s (text is tokenized by the tokenizer saved in
    ``model_folder`` by default); the output has the bytes of ``quantkit.save(quantkit.quantize(...))``
    of the same model loaded in its stored dtype.

    Complete shards are kept in ``.NAME.quantkit-partial`` beside ``out_folder`` with a journal
    (:data:`JOURNAL`) until the run ends: a calibration-free run that was interrupted (killed, out
    of disk) resumes after its last complete shard when the same checkpoint, config and shard size
    are given again, re-quantizing only the modules not yet on disk. A calibrated run records each
    finished decoder layer (its tensors flushed to disk, the next layer's input activations saved
    beside them, the previous ones deleted once these are on disk: room for two sets of activations
    at a time): given the same checkpoint, config, calibration token ids, shard size and device
    type again, it resumes at the first unfinished layer without reading the finished ones. A
    single file (``.gguf``) grows in that folder too, the journal recording how many of its tensors
    are on disk: it resumes after them. Files the config reads (a GGUF importance matrix) count as
    input. ``resume=False``, or any difference, starts over. A resumed run writes the bytes of an
    uninterrupted one. The output appears at ``out_folder`` only when complete.

    The folder is checked whole before anything is written: a damaged one raises
    :class:`~quantkit.ModelFormatError` and leaves no output. Tokenizer and generation files
    (:data:`COPIED_FILES`) are copied through.

    ``max_memory`` is :func:`quantkit.quantize`'s memory budget, planned for the streamed run
    (calibration activations spilled to a temporary folder beside ``out_folder`` when needed).
    """
    config = as_config(config)
    device = resolve_device(device)
    registry = get_registry()
    backend = registry.backend_for(config, hardware_of(device))
    backend.check_streaming(config)
    calibrated = backend.needs_calibration(config)
    if not (backend.streams_layers if calibrated else backend.streams_modules):
        able = sorted(name for name, b in registry.backends.items() if b.streams_modules or b.streams_layers)
        raise QuantizationError(
            f"backend {backend.name!r} cannot quantize a streamed checkpoint{' with ' if calibrated else ''}"
            f"{'calibration' if calibrated else ''} (it quantizes the whole model in a way of its own); "
            f"backends that can: {', '.join(able)}"
        )
    source, out = Path(model_folder), Path(out_folder)
    start = time.perf_counter()
    with _open(source) as checkpoint:
        carried = checkpoint.tokenizer()  # a .gguf's, saved beside the output; a folder's files are copied
        tokenizer = tokenizer if tokenizer is not None else carried
        tokens = calibration_ids(checkpoint.model, config, calibration, tokenizer) if calibrated else None
        if plan_memory(checkpoint.model, config, max_memory, tokens, streaming=True, device=device).spill:
            setattr(checkpoint.model, SPILL_ATTR, out.parent)
        if not calibrated and calibration is not None:
            log.info("%s needs no calibration data; ignoring it", backend.name)
        if out.suffix in backend.file_suffixes:  # a single-file format, written tensor by tensor (.gguf)
            if tokenizer is None and (source / "tokenizer_config.json").is_file():
                tokenizer = model_tokenizer(checkpoint.model)  # the folder's, which the file embeds
            _write_file(checkpoint, source, out, backend, config, tokenizer, resume, device)
        else:
            _write_folder(checkpoint, source, out, backend, config, tokens, carried, max_shard_bytes, resume, device)
    log.info("%s: streamed %s in %s", config.quant_method, source, format_seconds(time.perf_counter() - start))
    return out


def _write_folder(
    checkpoint: StreamedCheckpoint,
    source: Path,
    out: Path,
    backend: Backend,
    config: QuantConfig,
    tokens: torch.Tensor | None,
    carried: Any,
    max_shard_bytes: int,
    resume: bool,
    device: torch.device,
) -> None:
    """Write the quantized folder ``out`` from ``checkpoint`` through the work folder and its journal
    (see :func:`quantize_streaming`); ``tokens``: the calibration of a layer-by-layer backend, or None;
    ``carried``: the tokenizer a single-file checkpoint carries, saved beside the weights."""
    calibrated = tokens is not None
    targets = {t.name: t for t in backend.targets(checkpoint.model, config, check_weights=False)}
    run = {"config": config.to_dict(), "max_shard_bytes": max_shard_bytes, "source": _fingerprint(source)}
    run["inputs"] = _inputs(backend, config)
    run["calibration"] = _calibration_fingerprint(tokens, device) if calibrated else None
    with _work_folder(out, resume, lambda journal: _journal(journal, run)) as (partial, journal, lock, state):
        outputs: dict[str, list[str]] = {}  # module -> the names of its tensors in the output

        def record(shards: dict[str, Any]) -> None:
            done = {m: names for m, names in outputs.items() if all(map(writer.written, names))}
            _save_journal(journal, {**run, **shards, "modules": done})

        writer = ShardWriter(partial, max_shard_bytes, on_close=None if calibrated else record)
        if state is not None:
            try:
                writer.resume(state)
                if calibrated:
                    read_header(partial / state["activations"])  # complete, or a resume cannot use it
                    log.info("resuming in %s: layers 0-%d already quantized", partial, state["layer"] - 1)
                else:
                    outputs.update(state["modules"])
                    log.info("resuming in %s: %d modules already written", partial, len(outputs))
            except QuantkitError as error:
                log.warning("%s; starting over", error)
                _clear(partial, keep=lock)
                state = None
                writer = ShardWriter(partial, max_shard_bytes, on_close=None if calibrated else record)
        if calibrated:
            layers = _StreamedLayers(checkpoint, writer, targets, _Resume(journal, run, state))
            _stream_layers(checkpoint, backend, config, tokens, layers, device)
        else:
            _stream_modules(checkpoint, backend, config, targets, writer, outputs, device)
        writer.finish()
        journal.unlink(missing_ok=True)  # it names the shards as they were before finish renamed them
        if (dtype := backend.placed_dtype(config)) is not None:
            checkpoint.model.config.dtype = dtype  # as Backend.place records it
        write_config(checkpoint.model, partial, backend.quantization_config_block(checkpoint.model, config))
        if carried is not None:
            carried.save_pretrained(partial)
        for name in COPIED_FILES if source.is_dir() else ():
            if (source / name).is_file():
                shutil.copyfile(source / name, partial / name)
        with atomic_path(out, directory=True) as tmp:
            for item in partial.iterdir():
                if not item.name.startswith("."):  # the lock, leftovers of interrupted writes
                    os.rename(item, tmp / item.name)
        _clear(partial)


def _write_file(
    checkpoint: StreamedCheckpoint,
    source: Path,
    out: Path,
    backend: Backend,
    config: QuantConfig,
    tokenizer: Any,
    resume: bool,
    device: torch.device,
) -> None:
    """Write the single file ``out`` (:meth:`Backend.stream_file`) in the work folder, where a
    journal keeps what the backend records of it: a run of the same checkpoint, config and input
    files resumes from there (see :func:`quantize_streaming`). Renamed into place when complete."""
    run = {"config": config.to_dict(), "source": _fingerprint(source), "inputs": _inputs(backend, config)}
    with _work_folder(out, resume, lambda journal: _recorded(journal, run)) as (partial, journal, _, state):

        def record(written: dict[str, Any]) -> None:
            _save_journal(journal, {**run, "written": written})

        work = partial / out.name
        resumed = None if state is None else state.get("written")
        backend.stream_file(
            checkpoint, config, work, tokenizer=tokenizer, device=device, resumed=resumed, record=record
        )
        with atomic_path(out, directory=False) as tmp:
            os.rename(work, tmp)
        _clear(partial)


def _open(source: Path) -> StreamedCheckpoint:
    """The float checkpoint at ``source``: a folder, or a single file read by the backend owning its suffix."""
    if not source.is_file():
        return StreamedCheckpoint(source)
    owner = get_registry().backend_for_suffix(source.suffix)
    if owner is None:
        raise ModelFormatError(f"{str(source)!r}: no backend streams {source.suffix or 'suffix-less'} files")
    return owner.stream_source(source)


def _fingerprint(source: Path) -> dict[str, list[int]]:
    """Name -> (size, modification time) of the checkpoint's files: what a resumed run must find unchanged."""
    if source.is_file():
        return {source.name: [(info := source.stat()).st_size, info.st_mtime_ns]}
    files = [path for path in sorted(source.iterdir()) if path.suffix in (".safetensors", ".json")]
    return {path.name: [(info := path.stat()).st_size, info.st_mtime_ns] for path in files}


def _inputs(backend: Backend, config: QuantConfig) -> dict[str, Any]:
    """Path -> fingerprint (:func:`_fingerprint`; None when missing) of the files besides the
    checkpoint that ``config`` reads (:meth:`Backend.input_files`)."""
    return {str(path): _fingerprint(path) if path.is_file() else None for path in backend.input_files(config)}


def _journal(journal: Path, run: dict[str, Any]) -> dict[str, Any] | None:
    """What an interrupted run of the same ``run`` completed (see :data:`JOURNAL`), or None."""
    state = _recorded(journal, run)
    if state is None:
        return None
    if run["calibration"] is None:
        return state if isinstance(state.get("modules"), dict) else None
    layer = state.get("layer")
    return state if type(layer) is int and state.get("activations") == _activations_name(layer) else None


def _recorded(journal: Path, run: dict[str, Any]) -> dict[str, Any] | None:
    """The journal's state if it records the same ``run`` (config, fingerprints), or None."""
    try:
        state = json.loads(journal.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    if {k: state.get(k) for k in run} != json.loads(json.dumps(run)):
        log.info(
            "%s is from another checkpoint, config, calibration or shard size (or input file): starting over",
            journal.parent,
        )
        return None
    return state


def _save_journal(journal: Path, state: dict[str, Any]) -> None:
    with atomic_path(journal, directory=False) as tmp:
        tmp.write_text(json.dumps(state))


def _calibration_fingerprint(tokens: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """What a resumed calibrated run must find unchanged besides the checkpoint and config: the
    calibration token ids (their sha256) and the kind of device computing on them."""
    ids = tokens.detach().to("cpu", torch.long).contiguous()
    return {"sha256": hashlib.sha256(ids.numpy()).hexdigest(), "shape": list(ids.shape), "device": device.type}


def _activations_name(layer: int) -> str:
    """The work folder's file of the calibration activations entering decoder layer ``layer``."""
    return f".activations-{layer}.safetensors"


class _WorkFolder(NamedTuple):
    partial: Path
    journal: Path
    lock: Path
    state: dict[str, Any] | None
    """What the interrupted run recorded in ``journal`` (None: a fresh start in an emptied folder)."""


@contextlib.contextmanager
def _work_folder(out: Path, resume: bool, recorded: Callable[[Path], dict[str, Any] | None]) -> Iterator[_WorkFolder]:
    """The work folder ``.NAME.quantkit-partial`` beside ``out``, locked (:func:`_claimed`), with
    ``recorded(journal)`` of the run that left it when resuming, else emptied."""
    partial = out.parent / f".{out.name}.quantkit-partial"
    with _claimed(partial) as lock:
        journal = partial / JOURNAL
        state = recorded(journal) if resume else None
        if state is None:
            if not resume and journal.is_file():
                log.info("resume=False: starting over in %s", partial)
            _clear(partial, keep=lock)
        yield _WorkFolder(partial, journal, lock, state)


@contextlib.contextmanager
def _claimed(partial: Path) -> Iterator[Path]:
    """Hold an exclusive lock on the work folder ``partial`` (created if missing) while a run uses
    it; a run that fails before completing a shard leaves nothing to resume and no folder."""
    partial.mkdir(parents=True, exist_ok=True)
    lock = partial / LOCK
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QuantkitError(f"another quantkit run is writing {partial}: wait for it to end") from None
        try:
            yield lock
        except BaseException:
            if not (partial / JOURNAL).exists():
                _clear(partial)
            raise


def _clear(partial: Path, keep: Path | None = None) -> None:
    """Remove the work folder (all but ``keep``, the lock of a run that goes on using it)."""
    for item in partial.iterdir() if keep is not None else [partial]:
        if item != keep:
            shutil.rmtree(item) if item.is_dir() else item.unlink()


def _stream_modules(
    checkpoint: StreamedCheckpoint,
    backend: Backend,
    config: QuantConfig,
    targets: dict[str, Target],
    writer: ShardWriter,
    outputs: dict[str, list[str]],
    device: torch.device,
) -> None:
    """Quantize the checkpoint with a ``streams_modules`` backend, module by module, but the
    modules in ``outputs`` (written by an interrupted run); record each module's output names there.
    Each module goes through the backend's template hooks as in :meth:`Backend.quantize`."""
    model = checkpoint.model
    others = backend.other_quantizers(model, config, device)  # planned on the whole (meta) model
    quantize = backend.linear_quantizer(model, config, list(targets.values()), None, device)
    steps = _Steps(backend, quantize, others, backend.placed_dtype(config))
    for module, names in track(checkpoint.modules(), f"{backend.name} (streaming)"):
        if module not in outputs:
            outputs[module] = _stream_module(checkpoint, module, names, targets.get(module), steps, writer)
            release_heap()


def _stream_layers(
    checkpoint: StreamedCheckpoint,
    backend: Backend,
    config: QuantConfig,
    tokens: torch.Tensor,
    source: _StreamedLayers,
    device: torch.device,
) -> None:
    """Quantize the checkpoint with a layer-by-layer ``backend``, writing as it goes: the modules
    before the decoder layers (the embedding) are materialised for the capture of the first
    layer's inputs and written (unless a resumed run wrote them), each layer streams through
    ``source``, the modules after them (final norm, output head) are copied through."""
    model = checkpoint.model
    layers = f"{source.stack.prefix}layers."
    modules = checkpoint.modules()
    first = next((i for i, (module, _) in enumerate(modules) if module.startswith(layers)), len(modules))
    if source.resumed.state is None:
        for module, _ in modules[:first]:
            _write(source.writer, checkpoint.materialise(module))
            source.hold(module)
    setattr(model, LAYER_SOURCE_ATTR, source)
    try:
        backend.quantize(model, config, calibration=tokens, device=device)
    finally:
        delattr(model, LAYER_SOURCE_ATTR)
    for module, names in modules[first:]:
        if not module.startswith(layers):
            _stream_module(checkpoint, module, names, None, _Steps(backend), source.writer)
            release_heap()


def _write(writer: ShardWriter, tensors: dict[str, torch.Tensor]) -> None:
    """Add ``tensors`` (full names) to ``writer``, keeping no reference to any."""
    for name, tensor in tensors.items():
        writer.add(name, tensor)


class _Resume(NamedTuple):
    """A calibrated run's journal, the ``run`` it records, and the ``state`` of the interrupted run
    it resumes (None: a fresh run)."""

    journal: Path
    run: dict[str, Any]
    state: dict[str, Any] | None


class _StreamedLayers:
    """The :class:`~quantkit.layerwise.LayerSource` of a streamed checkpoint: each decoder layer is
    read from the shards for its turn (its linears checked finite) and, once quantized, written
    and released with the float modules it replaced; the modules :meth:`hold` names (materialised
    for the capture of the first layer's inputs) are released when the first layer arrives.

    Every finished layer but the last is made resumable (:meth:`finished`): the next layer's inputs
    saved in the work folder, the writer's tensors flushed, then the journal naming both written;
    a run resuming ``resumed.state`` starts from them (:meth:`restore`)."""

    def __init__(
        self, checkpoint: StreamedCheckpoint, writer: ShardWriter, targets: dict[str, Target], resumed: _Resume
    ):
        self.checkpoint, self.writer, self.targets, self.resumed = checkpoint, writer, targets, resumed
        self.stack = decoder_stack(checkpoint.model)
        self._held: list[nn.Module] = []
        self._activations = None if resumed.state is None else resumed.state["activations"]
        self._saving = True

    def hold(self, module: str) -> None:
        self._held.append(self.checkpoint.model.get_submodule(module))

    def restore(
        self, chunks: list[torch.Tensor] | SpilledChunks, device: torch.device
    ) -> tuple[int, list[dict[str, Any]]] | None:
        if self.resumed.state is None:
            return None
        try:
            kwargs = load_activations(self.resumed.journal.parent / self._activations, chunks, device)
        except QuantizationError as error:
            raise QuantizationError(f"{error}; rerun with resume=False to start over") from error
        return self.resumed.state["layer"], kwargs

    def finished(self, index: int, chunks: list[torch.Tensor] | SpilledChunks, kwargs: list[dict[str, Any]]) -> None:
        if not self._saving:
            return
        folder, name = self.resumed.journal.parent, _activations_name(index + 1)
        try:
            save_activations(folder / name, chunks, kwargs)
        except QuantizationError as error:
            log.warning("%s: this run cannot resume if interrupted", error)
            self._saving = False
            return
        state = {**self.resumed.run, "layer": index + 1, "activations": name}
        self.writer.checkpoint(lambda shards: _save_journal(self.resumed.journal, {**state, **shards}))
        if self._activations not in (None, name):
            (folder / self._activations).unlink(missing_ok=True)
        self._activations = name

    def load(self, index: int, layer: nn.Module) -> None:
        for module in self._held:
            module.to("meta")
        prefix = self.stack.layer_name(index)
        self.checkpoint.materialise(prefix, writable=True)  # GPTQ and AWQ update weights in place
        for name, target in self.targets.items():
            if name.startswith(f"{prefix}."):
                check_finite(name, target.linear.weight)
        self._held = list(layer.modules())

    def done(self, index: int, layer: nn.Module) -> None:
        _write(self.writer, layer.state_dict(prefix=f"{self.stack.layer_name(index)}."))
        for module in self._held:
            module.to("meta")
        self._held = []
        release_heap()


class _Steps(NamedTuple):
    """What a module goes through in :meth:`Backend.quantize`'s template: its backend, the run's
    :meth:`~Backend.linear_quantizer` and :meth:`~Backend.other_quantizers`, the
    :meth:`~Backend.placed_dtype`. Without them (modules copied through), a module is written as stored."""

    backend: Backend
    quantize: Callable[[str, nn.Linear, QuantConfig], nn.Module] | None = None
    others: dict[str, Callable[[nn.Module], dict[str, nn.Module]]] = {}
    dtype: torch.dtype | None = None


def _stream_module(
    checkpoint: StreamedCheckpoint,
    module: str,
    names: list[str],
    target: Target | None,
    steps: _Steps,
    writer: ShardWriter,
) -> list[str]:
    """Write the tensors ``names`` of ``module``, quantized when it is a ``target`` or one of the
    ``steps``' others, but those an interrupted run wrote; they are all released on return (a
    function, so that no loop variable keeps one alive). Returns the names of the module's tensors
    in the output."""
    if module in steps.others:
        return _write_new(writer, _quantized_other(checkpoint, module, steps))
    with checkpoint.tensors(names) as tensors:
        if target is None:  # copied through, cast as Backend.place casts it, piece by piece as it is written
            return _write_new(writer, tensors, steps.dtype)
        return _write_new(writer, _quantized(target, tensors, steps))


def _write_new(writer: ShardWriter, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> list[str]:
    """Add ``tensors`` but those an interrupted run wrote to ``writer``, the float ones cast to
    ``dtype`` if given; return all their names."""
    for name, tensor in tensors.items():
        if not writer.written(name):
            writer.add(name, tensor, dtype if tensor.is_floating_point() else None)
    return list(tensors)


def _quantized(target: Target, tensors: dict[str, torch.Tensor], steps: _Steps) -> dict[str, torch.Tensor]:
    """The saved tensors of ``target``'s quantized module, from its float ``tensors`` (full names)."""
    name, meta, config = target
    linear = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
    linear.load_state_dict({key.rpartition(".")[2]: tensor for key, tensor in tensors.items()}, assign=True)
    check_finite(name, linear.weight)
    with torch.no_grad():
        module = steps.quantize(name, linear, config)
    return _saved(steps.backend, {name: _cast(module, steps.dtype)})


def _quantized_other(checkpoint: StreamedCheckpoint, module: str, steps: _Steps) -> dict[str, torch.Tensor]:
    """The saved tensors of the non-linear ``module`` the backend quantizes too: materialised in the
    model, placed and quantized there, and sent back to the meta device once its tensors are taken."""
    checkpoint.materialise(module)
    float_module = _cast(checkpoint.model.get_submodule(module), steps.dtype)
    try:
        with torch.no_grad():
            installed = steps.others[module](checkpoint.model)
        written = _saved(steps.backend, installed)
        for quantized in installed.values():
            quantized.to("meta")  # the tensors taken stay
    finally:
        float_module.to("meta")
    return written


def _saved(backend: Backend, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """What :meth:`Backend.saved_tensors` saves of the quantized ``modules`` (by full name) of a
    model: it is called on a model holding them alone, at their places."""
    holder = nn.Module()
    for name, module in modules.items():
        parent = holder
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)
    return backend.saved_tensors(holder)


def _cast(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """``module`` cast as :meth:`Backend.place` casts the whole model to ``dtype`` (``Module.to`` on a
    parent: a module's own ``to`` may differ, hqq's does nothing)."""
    if dtype is not None:
        nn.ModuleList([module]).to(dtype=dtype)
    return module
