"""Layer-by-layer calibration of decoder-only transformers, shared by GPTQ, AWQ, AQLM and plugins.

:func:`quantize_layerwise` embeds the calibration tokens, captures the inputs of the first
decoder layer (hidden states and the keyword arguments the model passes it: attention mask,
position ids, rotary position embeddings) and then, layer by layer:

1. moves the layer to the working device (the rest of the model stays where it is);
2. hands a :class:`LayerContext` to the backend, which observes the inputs of the layer's
   linears (:meth:`LayerContext.observe`) and quantizes them in place;
3. runs the now quantized layer to produce the next layer's inputs
   (:meth:`LayerContext.propagate`), so each layer is calibrated on the activations the
   quantized model really produces.

The calibration samples go through each layer in chunks, which bounds the memory of the
forward passes; one set of hidden states (``nsamples x seqlen x hidden``) lives on the device,
or, when the model carries a folder as ``model.quantkit_activation_spill``
(:data:`SPILL_ATTR`, set by :func:`quantkit.memory_budget.plan_memory`'s callers when the
hidden states would pass a memory budget), on disk in a temporary folder inside it, one file per
chunk, read back one chunk at a time (:class:`SpilledChunks`): the same bytes, so the same
result, and the folder is removed when the run ends, failed or not.

Launched with ``torchrun`` (:mod:`quantkit.distributed`), each rank runs this pipeline on its
own share of the samples (sample ``i`` on rank ``i % world``): backends sum their statistics
over the ranks (:meth:`HessianAccumulator.reduce`, :meth:`LayerContext.reduce_sum`), give each
solve to one rank (``ctx.dist.owners``) and broadcast its result (``ctx.dist.broadcast``), so
that every rank holds the same quantized layer before propagating its samples. Statistics
summed in float64 (Hessians, AWQ's) give the same bits on any number of ranks.

A model whose decoder layers are not in memory (:mod:`quantkit.streaming`: built on the meta
device, read from disk) carries a :class:`LayerSource` as ``model.quantkit_layer_source``
(:data:`LAYER_SOURCE_ATTR`): the pipeline asks it for each layer just before the layer's turn
and hands the layer back once it is quantized and has propagated; the layer then returns to
the device it came from (the meta device), so one float layer is in memory at a time. A source
may also keep each finished layer's outputs (:meth:`LayerSource.finished`, with
:func:`save_activations`) and hand them back to a later run (:meth:`LayerSource.restore`,
:func:`load_activations`), which then starts at the first layer not finished.

Supported architectures: the Llama family — ``model_type`` ``llama`` (Llama, SmolLM),
``mistral`` and ``qwen2`` — whose decoder layers are ``model.model.layers`` with
``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``. Anything else raises
:class:`QuantizationError` naming the architecture.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .core.atomic import atomic_path
from .core.errors import QuantizationError
from .core.linears import Target, set_submodule
from .core.progress import track
from .core.safetensors_files import header_bytes
from .distributed import Distributed, DistributedError, session

log = logging.getLogger("quantkit")

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DEFAULT_CHUNK_TOKENS = 8192
HESSIAN_BLOCK_BYTES = 64 * 2**20
"""The float32 temporary of one ``x^T x`` product is formed in row blocks of at most this size
(adding it to the float64 sum makes a float64 copy of it: 3x this size in all)."""
REPORT_ATTR = "quantkit_calibration_report"
"""The model attribute holding the :class:`PipelineReport` of its last calibration."""
LAYER_SOURCE_ATTR = "quantkit_layer_source"
"""The model attribute holding the :class:`LayerSource` of a model whose layers are not in memory."""
SPILL_ATTR = "quantkit_activation_spill"
"""The model attribute naming a folder in which the pipeline keeps the calibration hidden states on
disk (absent or ``None``: in memory)."""
ACTIVATIONS_METADATA = "quantkit_activations"
"""The metadata key of a :func:`save_activations` file: its layout (chunks, keyword arguments) as JSON."""


@dataclass(frozen=True)
class LinearGroup:
    """Linears of one decoder layer that read the same input (names relative to the layer).

    ``previous`` is the module whose output that input is (a norm or a linear: AWQ folds its
    scales into it); ``inspect`` the module whose output AWQ's scale search compares (``None``:
    the linears' own outputs), called with the layer's keyword arguments when
    ``inspect_takes_kwargs``. ``scale_when_square`` scales the group only when its linears and
    ``previous`` have the same shape (``o_proj`` after ``v_proj`` without grouped-query attention).
    ``clip`` tells AWQ whether to search a clipping range for these linears.
    """

    names: tuple[str, ...]
    previous: str
    inspect: str | None = None
    inspect_takes_kwargs: bool = False
    scale_when_square: bool = False
    clip: tuple[bool, ...] = ()

    def clips(self, name: str) -> bool:
        return self.clip[self.names.index(name)] if self.clip else True


LLAMA_GROUPS = (
    LinearGroup(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        previous="input_layernorm",
        inspect="self_attn",
        inspect_takes_kwargs=True,
        clip=(False, False, True),
    ),
    LinearGroup(("self_attn.o_proj",), previous="self_attn.v_proj", scale_when_square=True),
    LinearGroup(("mlp.gate_proj", "mlp.up_proj"), previous="post_attention_layernorm", inspect="mlp"),
    LinearGroup(("mlp.down_proj",), previous="mlp.up_proj"),
)
"""Input groups of a Llama-family decoder layer, in execution order."""


@dataclass
class LayerWork:
    """Work one rank did during a calibration run (summed over its layers)."""

    samples: int = 0
    """Calibration samples this rank calibrated on."""
    forward_tokens: int = 0
    """Tokens run through decoder layers (each observing or propagating forward counts)."""
    hessian_flops: float = 0.0
    """Multiply-adds counted apart, of the input statistics (``X^T X``) this rank accumulated."""
    solves: int = 0
    """Per-linear solves (GPTQ, AQLM, AWQ clipping searches) this rank ran."""
    solve_cost: float = 0.0
    """Their summed cost estimate, in the units given to :meth:`Distributed.owners`."""


@dataclass
class PipelineReport:
    """What one calibration run cost."""

    layers: int
    tokens: int
    seconds: float
    peak_rss_bytes: int
    """Largest resident set size sampled (psutil) after each chunk of each pass."""
    peak_device_bytes: int | None = None
    """``torch.cuda.max_memory_allocated`` on CUDA devices, else ``None``."""
    rank: int = 0
    world: int = 1
    work: LayerWork = field(default_factory=LayerWork)
    """This rank's share of the work (see :mod:`quantkit.distributed`)."""


@dataclass(frozen=True)
class DecoderStack:
    """Where a supported model keeps its decoder layers."""

    base: nn.Module  # holds embed_tokens, layers, norm, rotary_emb
    prefix: str  # name of ``base`` in the model plus ".", e.g. "model."
    groups: tuple[LinearGroup, ...]

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.layers

    def layer_name(self, index: int) -> str:
        return f"{self.prefix}layers.{index}"


def decoder_stack(model: nn.Module) -> DecoderStack:
    """The decoder layers of a supported model; :class:`QuantizationError` for any other."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    base, prefix = (model.model, "model.") if isinstance(getattr(model, "model", None), nn.Module) else (model, "")
    parts = ("embed_tokens", "layers", "rotary_emb")
    if model_type not in SUPPORTED_MODEL_TYPES or not all(hasattr(base, p) for p in parts):
        raise QuantizationError(
            f"layer-by-layer calibration does not support {type(model).__name__} "
            f"(model_type {model_type!r}); supported: the Llama family, model_type "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (decoder layers at model.model.layers)"
        )
    return DecoderStack(base, prefix, LLAMA_GROUPS)


class SpilledChunks(Sequence[torch.Tensor]):
    """The hidden states entering the current decoder layer, one tensor per chunk of samples, kept
    in a file per chunk in ``folder`` (the raw bytes) and read back onto ``device`` into a fresh
    tensor at each access: memory holds only the chunks in use. Indexed, assigned and appended to
    as the list of tensors it stands for."""

    def __init__(self, device: torch.device, folder: Path):
        self.device, self.folder = device, folder
        self._chunks: list[tuple[torch.Size, torch.dtype] | None] = []

    def __len__(self) -> int:
        return len(self._chunks)

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        index = range(len(self))[index]
        shape, dtype = self._chunks[index]
        tensor = torch.empty(shape, dtype=dtype)
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        with self._path(index).open("rb") as file:
            if file.readinto(data) != data.size:
                raise QuantizationError(f"{self._path(index)} lost calibration activations: was it changed meanwhile?")
        return tensor.to(self.device)

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        index = range(len(self))[index]
        with self._path(index).open("wb") as file:
            file.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        self._chunks[index] = (tensor.shape, tensor.dtype)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[c] for c in range(len(self)))

    def append(self, tensor: torch.Tensor) -> None:
        self._chunks.append(None)
        self[len(self._chunks) - 1] = tensor

    def spec(self, index: int) -> tuple[torch.Size, torch.dtype]:
        """The shape and dtype of chunk ``index``, without reading it."""
        return self._chunks[index]

    def _path(self, index: int) -> Path:
        return self.folder / f"chunk-{index}.bin"


@contextlib.contextmanager
def _hidden_states(
    device: torch.device, spill: str | os.PathLike | None
) -> Iterator[list[torch.Tensor] | SpilledChunks]:
    """An empty list for the hidden states' chunks, or with ``spill`` (a folder) an empty
    :class:`SpilledChunks` in a temporary folder inside it, removed on leaving."""
    if spill is None:
        yield []
        return
    folder = Path(tempfile.mkdtemp(prefix=".quantkit-activations-", dir=spill))
    log.info("calibration activations spilled to %s", folder)
    try:
        yield SpilledChunks(device, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_activations(path: Path, chunks: list[torch.Tensor] | SpilledChunks, kwargs: list[dict[str, Any]]) -> None:
    """Write the hidden states ``chunks`` entering a decoder layer and each chunk's keyword
    arguments ``kwargs`` (tensors, tuples of tensors, None, numbers, strings) to the safetensors
    file ``path``, atomically and flushed to disk, a chunk at a time in memory (read from disk
    when spilled). The layout (:data:`ACTIVATIONS_METADATA`) lets :func:`load_activations` rebuild
    them; a keyword argument of another type raises :class:`QuantizationError`."""
    layout, tensors = _kwargs_layout(kwargs)
    specs = {name: (tensor.shape, tensor.dtype) for name, tensor in tensors.items()}
    for c in range(len(chunks)):
        specs[f"hidden.{c}"] = (
            chunks.spec(c) if isinstance(chunks, SpilledChunks) else (chunks[c].shape, chunks[c].dtype)
        )
    metadata = {ACTIVATIONS_METADATA: json.dumps({"chunks": len(chunks), "kwargs": layout})}
    sized = {name: (dtype, shape, math.prod(shape) * dtype.itemsize) for name, (shape, dtype) in specs.items()}
    head, order = header_bytes(sized, metadata)
    with atomic_path(path, directory=False) as tmp, tmp.open("wb") as file:
        file.write(head)
        for name in order:
            tensor = chunks[int(name.removeprefix("hidden."))] if name.startswith("hidden.") else tensors[name]
            file.write(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def load_activations(
    path: Path, chunks: list[torch.Tensor] | SpilledChunks, device: torch.device
) -> list[dict[str, Any]]:
    """Append the hidden states a :func:`save_activations` file holds to ``chunks`` (on ``device``),
    one at a time; return the keyword arguments of each chunk (their tensors on ``device``).
    A file that is not one raises :class:`QuantizationError`."""
    try:
        with safe_open(path, framework="pt") as file:
            layout = json.loads(file.metadata()[ACTIVATIONS_METADATA])
            for c in range(layout["chunks"]):
                chunks.append(file.get_tensor(f"hidden.{c}").to(device))
            return [{key: _kwarg(file, spec, device) for key, spec in chunk.items()} for chunk in layout["kwargs"]]
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as error:
        raise QuantizationError(f"{path} does not hold saved calibration activations: {error}") from error


def _kwargs_layout(kwargs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Each chunk's keyword arguments as JSON (a value, or the names of its tensors) and those tensors."""
    layout: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    for c, chunk in enumerate(kwargs):
        layout.append({})
        for key, value in chunk.items():
            name = f"kwargs.{c}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name], layout[c][key] = value, {"tensor": name}
            elif isinstance(value, tuple) and all(isinstance(item, torch.Tensor) for item in value):
                tensors.update({f"{name}.{i}": item for i, item in enumerate(value)})
                layout[c][key] = {"tuple": [f"{name}.{i}" for i in range(len(value))]}
            elif value is None or isinstance(value, bool | int | float | str):
                layout[c][key] = {"value": value}
            else:
                raise QuantizationError(f"the decoder layers' argument {key}={type(value).__name__} cannot be saved")
    return layout, tensors


def _kwarg(file: Any, spec: dict[str, Any], device: torch.device) -> Any:
    """One keyword argument of a :func:`save_activations` file, as :func:`_kwargs_layout` laid it out."""
    if "tensor" in spec:
        return file.get_tensor(spec["tensor"]).to(device)
    if "tuple" in spec:
        return tuple(file.get_tensor(name).to(device) for name in spec["tuple"])
    return spec["value"]


class _StopForward(Exception):
    """Raised by a hook to abandon a forward pass once it has seen what it needs."""


class _MemoryMeter:
    def __init__(self, device: torch.device):
        self.device, self.process, self.peak_rss = device, psutil.Process(), 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)

    def peak_device(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None


@dataclass
class LayerContext:
    """One decoder layer during calibration, on the working device, with its inputs.

    ``chunks[c]`` holds the hidden states entering the layer for the ``c``-th chunk of
    calibration samples (a list, or :class:`SpilledChunks` when they are kept on disk: each access
    reads the chunk from there), ``kwargs[c]`` the other arguments of its forward. ``targets`` maps
    names relative to the layer (``"mlp.down_proj"``) to the linears to quantize.

    Under ``torchrun`` the chunks hold this rank's samples only (``sample_ids[c]``: their
    global indices): sum statistics over the ranks with :meth:`reduce_sum` (in float64, so that
    the result does not depend on the number of ranks) before using them, and share results with ``dist``
    (:class:`~quantkit.distributed.Distributed`). ``work`` counts this rank's work.
    """

    index: int
    name: str
    layer: nn.Module
    groups: tuple[LinearGroup, ...]
    targets: dict[str, Target]
    chunks: list[torch.Tensor] | SpilledChunks
    kwargs: list[dict[str, Any]]
    _meter: _MemoryMeter = field(repr=False)
    dist: Distributed = field(default_factory=Distributed)
    sample_ids: list[torch.Tensor] = field(default_factory=list)
    work: LayerWork = field(default_factory=LayerWork)

    @property
    def device(self) -> torch.device:
        return self.chunks.device if isinstance(self.chunks, SpilledChunks) else self.chunks[0].device

    def target_groups(self) -> list[tuple[LinearGroup, list[str]]]:
        """Each input group with its members that are quantized (groups without any are left out)."""
        found = [(g, [n for n in g.names if n in self.targets]) for g in self.groups]
        return [(g, members) for g, members in found if members]

    def module(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` (a statistic of this rank's samples) over every rank, in place; the
        identity in one process. Sum counts the same way to turn sums into means."""
        return self.dist.all_reduce(tensor)

    def replace(self, name: str, module: nn.Module) -> None:
        """Swap the submodule ``name`` of this layer for ``module``."""
        set_submodule(self.layer, name, module)

    def forward(self, chunk: int) -> torch.Tensor:
        """The layer's output for one chunk."""
        hidden = self.chunks[chunk]
        self.work.forward_tokens += hidden.shape[0] * hidden.shape[1]
        out = self.layer(hidden, **self.kwargs[chunk])
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def observe(
        self,
        observers: Mapping[str, Callable[[torch.Tensor, int], None]],
        chunks: Sequence[int] | None = None,
    ) -> None:
        """Run the layer over the chunks; ``observers[name](x, c)`` sees the input ``x`` of the
        submodule ``name`` for chunk ``c``. Each forward stops once every observed module has
        seen its input, so observing early modules is cheap."""
        state: dict[str, Any] = {"chunk": 0, "seen": set()}

        def make_hook(name: str, observer: Callable[[torch.Tensor, int], None]):
            def hook(module: nn.Module, args: tuple) -> None:
                observer(args[0], state["chunk"])
                state["seen"].add(name)
                if len(state["seen"]) == len(observers):
                    raise _StopForward

            return hook

        handles = [self.module(n).register_forward_pre_hook(make_hook(n, fn)) for n, fn in observers.items()]
        try:
            for c in range(len(self.chunks)) if chunks is None else chunks:
                state["chunk"], state["seen"] = c, set()
                with contextlib.suppress(_StopForward):
                    self.forward(c)
                self._meter.sample()
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def propagate(self) -> None:
        """Replace every chunk of inputs by this layer's outputs (the next layer's inputs)."""
        for c in range(len(self.chunks)):
            self.chunks[c] = self.forward(c)
            self._meter.sample()


class LayerSource(Protocol):
    """Where the decoder layers of a model built on the meta device come from (see
    :data:`LAYER_SOURCE_ATTR`): :meth:`load` materialises layer ``index`` in place (on the CPU,
    same modules, real tensors) just before its turn; :meth:`done` receives it quantized, after
    it has propagated, still on the working device, before the pipeline returns it to meta.

    :meth:`restore` tells where an interrupted run left off: the first layer still to quantize,
    the hidden states entering it appended to ``chunks`` (on ``device``), and the keyword arguments
    of each chunk; None starts at layer 0 from the captured inputs. :meth:`finished` follows
    :meth:`done` of every layer but the last, ``chunks`` holding the next layer's inputs: the
    moment to keep them for such a restore (:func:`save_activations`)."""

    def load(self, index: int, layer: nn.Module) -> None: ...

    def done(self, index: int, layer: nn.Module) -> None: ...

    def restore(
        self, chunks: list[torch.Tensor] | SpilledChunks, device: torch.device
    ) -> tuple[int, list[dict[str, Any]]] | None: ...

    def finished(
        self, index: int, chunks: list[torch.Tensor] | SpilledChunks, kwargs: list[dict[str, Any]]
    ) -> None: ...


LayerQuantizer = Callable[[LayerContext], None]
"""A backend's per-layer step: quantize ``ctx.targets`` in place (see :class:`LayerContext`)."""


def check_calibration(model: nn.Module, calibration: torch.Tensor | None, full_rank_tokens: int) -> None:
    """Refuse calibration token ids the model cannot use; warn when there are fewer than
    ``full_rank_tokens``."""
    if calibration is None or calibration.dim() != 2 or calibration.dtype != torch.long:
        shape = None if calibration is None else (tuple(calibration.shape), calibration.dtype)
        raise QuantizationError(f"calibration must be token ids of shape (nsamples, seqlen), dtype long; got {shape}")
    nsamples, seqlen = calibration.shape
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and seqlen > max_positions:
        raise QuantizationError(
            f"calibration seqlen={seqlen} exceeds the model's max_position_embeddings={max_positions}; "
            f"use seqlen <= {max_positions}"
        )
    if nsamples * seqlen == 0:
        raise QuantizationError(f"calibration has {nsamples} x {seqlen} tokens: raise nsamples and seqlen above 0")
    if nsamples * seqlen < full_rank_tokens:
        log.warning(
            "calibration has %d x %d = %d tokens, fewer than the %d inputs of the widest quantized linear: "
            "its input statistics are rank-deficient (GPTQ's Hessian rests on its dampening); more tokens "
            "calibrate better",
            nsamples,
            seqlen,
            nsamples * seqlen,
            full_rank_tokens,
        )
    vocab = model.get_input_embeddings().num_embeddings
    if calibration.numel() and (calibration.min() < 0 or calibration.max() >= vocab):
        raise QuantizationError(
            f"calibration token ids span [{int(calibration.min())}, {int(calibration.max())}]; "
            f"the model's vocabulary has {vocab} ids: tokenize with the model's own tokenizer"
        )


def layer_targets(targets: Sequence[Target], stack: DecoderStack) -> list[dict[str, Target]]:
    """``targets`` per decoder layer, under their names in it; each must lie inside one."""
    per_layer: list[dict[str, Target]] = [{} for _ in stack.layers]
    outside = []
    for target in targets:
        head, _, rest = target.name.removeprefix(stack.prefix).partition(".")
        index, _, relative = rest.partition(".")
        if head != "layers" or not index.isdigit():
            outside.append(target.name)
            continue
        per_layer[int(index)][relative] = target
    if outside:
        raise QuantizationError(
            f"{targets[0].config.quant_method} calibrates linears inside decoder layers only; "
            f"{', '.join(outside)} lie outside: add them to modules_to_not_convert"
        )
    return per_layer


@torch.no_grad()
def _capture_first_inputs(
    stack: DecoderStack,
    calibration: torch.Tensor,
    device: torch.device,
    chunks: list[torch.Tensor] | SpilledChunks,
    chunk_samples: int,
) -> list[dict[str, Any]]:
    """Embed each chunk of samples and catch what the model passes to decoder layer 0: the hidden
    states appended to ``chunks``, the other arguments returned."""
    kwargs: list[dict[str, Any]] = []

    def catch(module: nn.Module, args: tuple, kw: dict) -> None:
        kw = dict(kw)
        chunks.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append(kw)
        raise _StopForward

    embed, rotary = stack.base.embed_tokens, stack.base.rotary_emb
    homes = [(m, _device_of(m)) for m in (embed, rotary)]
    for module, _ in homes:
        module.to(device)
    handle = stack.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for ids in calibration.split(chunk_samples):
            with contextlib.suppress(_StopForward):
                stack.base(input_ids=ids.to(device), use_cache=False)
    finally:
        handle.remove()
        for module, home in homes:
            module.to(home)
    if len(chunks) != math.ceil(len(calibration) / chunk_samples):
        raise QuantizationError(f"{type(stack.base).__name__} never called its first decoder layer")
    return kwargs


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def quantize_layerwise(
    model: nn.Module,
    targets: Sequence[Target],
    calibration: torch.Tensor | None,
    device: torch.device | str,
    quantize_layer: LayerQuantizer,
    *,
    description: str,
    chunk_samples: int | None = None,
    full_rank_tokens: int | None = None,
    data_parallel: bool = False,
) -> PipelineReport:
    """Calibrate and quantize ``model``'s decoder layers one after the other, in place.

    ``targets`` are the linears to quantize, checked (:meth:`quantkit.Backend.targets`);
    ``quantize_layer(ctx)`` quantizes ``ctx.targets`` of one layer (see :class:`LayerContext`);
    the pipeline then runs that quantized layer to get the next layer's inputs. Samples go
    through each layer ``chunk_samples`` at a time (default: about 8192 tokens per chunk).
    Fewer calibration tokens than ``full_rank_tokens`` (default: the widest input of the linears
    to quantize) get a warning: the inputs' statistics are rank-deficient. Returns the
    wall time and peak memory, also logged and set as ``model.quantkit_calibration_report``.

    ``data_parallel`` declares that ``quantize_layer`` sums its statistics over the ranks of a
    torchrun launch (:class:`LayerContext`); a multi-rank run of one that does not is refused.
    """
    start = time.perf_counter()
    dist = session()
    device = dist.device if dist.world > 1 and torch.device(device).type == "cuda" else torch.device(device)
    stack = decoder_stack(model)
    per_layer = layer_targets(targets, stack)
    widest = max(t.linear.in_features for t in targets)
    check_calibration(model, calibration, widest if full_rank_tokens is None else full_rank_tokens)
    nsamples, seqlen = calibration.shape
    if dist.world > 1 and not data_parallel:
        raise DistributedError(
            f"{description} does not calibrate data-parallel: launch it without torchrun (WORLD_SIZE={dist.world})"
        )
    if nsamples < dist.world:
        raise DistributedError(
            f"{nsamples} calibration samples cannot be shared by {dist.world} ranks: raise nsamples to at least "
            f"{dist.world} or launch fewer ranks"
        )
    chunk_samples = chunk_samples or max(1, DEFAULT_CHUNK_TOKENS // seqlen)
    ids = dist.sample_ids(nsamples)
    local = calibration if dist.world == 1 else calibration[ids]
    work = LayerWork(samples=len(ids))
    meter = _MemoryMeter(device)
    source: LayerSource | None = getattr(model, LAYER_SOURCE_ATTR, None)
    was_training = model.training
    model.eval()
    try:
        with _hidden_states(device, getattr(model, SPILL_ATTR, None)) as chunks:
            restored = source.restore(chunks, device) if source is not None else None
            first, kwargs = restored or (0, _capture_first_inputs(stack, local, device, chunks, chunk_samples))
            sample_ids = list(ids.split(chunk_samples))
            if len(chunks) != len(sample_ids) or len(kwargs) != len(sample_ids):
                raise QuantizationError(
                    f"the restored activations hold {len(chunks)} chunks; expected {len(sample_ids)}"
                )
            meter.sample()
            for index in track(range(first, len(stack.layers)), f"{description} layers"):
                layer = stack.layers[index]
                home = _device_of(layer)
                if source is not None:
                    source.load(index, layer)
                layer.to(device)
                ctx = LayerContext(
                    index,
                    stack.layer_name(index),
                    layer,
                    stack.groups,
                    per_layer[index],
                    chunks,
                    kwargs,
                    meter,
                    dist=dist,
                    sample_ids=sample_ids,
                    work=work,
                )
                if ctx.targets:
                    quantize_layer(ctx)
                if index + 1 < len(stack.layers):
                    ctx.propagate()
                if source is not None:
                    source.done(index, layer)
                    if index + 1 < len(stack.layers):
                        source.finished(index, chunks, kwargs)
                layer.to(home)
    finally:
        model.train(was_training)
    report = PipelineReport(
        layers=len(stack.layers),
        tokens=nsamples * seqlen,
        seconds=time.perf_counter() - start,
        peak_rss_bytes=meter.peak_rss,
        peak_device_bytes=meter.peak_device(),
        rank=dist.rank,
        world=dist.world,
        work=work,
    )
    device_peak = ""
    if report.peak_device_bytes is not None:
        device_peak = f", {device} peak {report.peak_device_bytes / 2**20:.0f} MiB"
    ranks = f" (rank {dist.rank} of {dist.world}: {len(ids)} samples, {work.solves} solves)" if dist.world > 1 else ""
    log.info(
        "%s: %d layers on %d x %d tokens in %.1f s; peak RSS %.0f MiB%s%s",
        description,
        report.layers,
        nsamples,
        seqlen,
        report.seconds,
        report.peak_rss_bytes / 2**20,
        device_peak,
        ranks,
    )
    setattr(model, REPORT_ATTR, report)
    return report


class HessianAccumulator:
    """``H = 2/n * sum(x x^T)`` over the calibration inputs of one linear layer: the statistic
    GPTQ's and AQLM's layer objectives ``||(W - Q) X||^2`` need.

    Each sample's ``x^T x`` is computed in float32 and the samples are summed in float64. A
    float64 sum of float32 terms is exact unless the terms' magnitudes span more than about
    2**29 / n, so :attr:`H` (float32) has the same bits whatever order the samples come in and
    however they are split into chunks or over ranks: two ranks give one process's Hessians.
    Memory: ``8 * in_features**2`` bytes (the sum, kept in row blocks that forming :attr:`H`
    frees one by one) plus a sample in float32 and a block's product (:data:`HESSIAN_BLOCK_BYTES`);
    ``4 *`` once formed.

    Pass the layer's ``dist`` (``ctx.dist``) and call :meth:`reduce` for the Hessian over every
    rank's samples.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None, dist: Distributed | None = None):
        self.dist = dist or Distributed()
        self.in_features = in_features
        self.nsamples = 0
        self.flops = 0.0
        """Multiply-adds (counted apart) spent on the products ``x^T x``."""
        rows = max(1, HESSIAN_BLOCK_BYTES // (4 * in_features))
        self._starts = range(0, in_features, rows)
        self._sum: list[torch.Tensor] | None = [
            torch.zeros(min(rows, in_features - start), in_features, dtype=torch.float64, device=device)
            for start in self._starts
        ]
        self._H: torch.Tensor | None = None

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Fold in the inputs of a chunk of samples ``(samples, tokens, in_features)``, or of one
        sample ``(tokens, in_features)``; each token counts as one row of ``X``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features; the accumulator expects {self.in_features}")
        if self._sum is None:
            raise ValueError("the accumulator's Hessian was already formed; make a new accumulator for more inputs")
        samples = x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x.reshape(1, -1, x.shape[-1])
        self.flops += 2.0 * samples.shape[0] * samples.shape[1] * self.in_features**2
        for sample in samples:  # one float32 product per sample (and row block), summed in float64
            sample = sample.to(device=self._sum[0].device, dtype=torch.float32)
            for start, block in zip(self._starts, self._sum):
                block.add_(sample[:, start : start + block.shape[0]].t() @ sample)
        self.nsamples += samples.shape[0] * samples.shape[1]

    @property
    def H(self) -> torch.Tensor:
        """The Hessian (float32) of the inputs added so far on this rank; after :meth:`reduce`,
        of every rank's. Forming it frees the float64 sum: no inputs can be added after."""
        if self._H is None:
            if self._sum is None:
                raise ValueError("this rank does not hold the Hessian: reduce() sent it to another rank")
            blocks, self._sum = self._sum, None
            self._H = torch.empty(self.in_features, self.in_features, dtype=torch.float32, device=blocks[0].device)
            for index, start in enumerate(self._starts):
                self._H[start : start + blocks[index].shape[0]] = blocks[index].mul_(2.0 / max(self.nsamples, 1))
                blocks[index] = None  # freed before the next block's float32 rows are written
        return self._H

    @torch.no_grad()
    def reduce(self, dst: int | None = None) -> torch.Tensor | None:
        """The Hessian over every rank's samples on rank ``dst`` (every rank when ``None``),
        ``None`` on the others; in one process :attr:`H`. Every rank calls it."""
        dist = self.dist
        if dist.world > 1:
            if self._sum is None:
                raise ValueError("reduce() needs the float64 sum: call it before reading H")
            count = dist.all_reduce(torch.tensor([float(self.nsamples)], dtype=torch.float64))
            self.nsamples = int(count)
            received = [dist.reduce(block, dst) for block in self._sum]  # every rank sends every block
            if received[0] is None:
                self._sum = None
                return None
        return self.H


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """Run work on one CPU thread. A sequential solve (GPTQ's column loop) is thousands of small
    ops, and intra-op threads add a synchronization to each that costs more than it saves (measured
    on a shared 2-core machine: a 960 x 576 GPTQ solve takes 1.8 s on one thread, 20 s on two); an
    accumulating scatter (AQLM's codebook gradient) sums in a fixed order only on one thread."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
