"""Writing a ``.gguf`` from a float checkpoint streamed from disk, one module in memory at a time.

The file is planned first on the meta device: the GGUF backend's empty quantized model
(:meth:`~quantkit.core.backend.Backend.prepare_for_loading`, the types its mixes give by layer)
laid out as :func:`.export.write_gguf` lays it out gives every tensor's name, shape, type and size,
so the header, metadata and tensor infos are written before any tensor is quantized. Then each
module is read from the shards, quantized as the in-memory backend quantizes it, checked against
its plan, written and released. The bytes are those of ``quantkit.save(quantkit.quantize(...))``.
"""

from __future__ import annotations

import copy
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.core.atomic import atomic_path
from quantkit.core.backend import Backend
from quantkit.core.errors import QuantizationError
from quantkit.core.linears import check_finite
from quantkit.core.progress import track
from quantkit.core.registry import get_registry
from quantkit.core.streamed_checkpoints import StreamedCheckpoint

from .config import GGUFConfig
from .export import FileTensor, file_tensor, file_tensors, head_counts, open_writer
from .imatrix import resolve_imatrix
from .imatrix_files import ImportanceMatrix
from .mixes import ModelShape, bound_shape
from .qlinear import GGUFEmbedding, GGUFWeight


def write_gguf_streamed(
    checkpoint: StreamedCheckpoint,
    config: GGUFConfig,
    path: Path,
    tokenizer: Any,
    device: torch.device,
    imatrix: ImportanceMatrix | None = None,
) -> None:
    """Quantize ``checkpoint`` with ``config`` into the ``.gguf`` at ``path`` (atomically), one
    module at a time, weighting the linears by ``imatrix`` (default: ``config.imatrix``'s file)."""
    backend = get_registry().backend_named("gguf")
    backend.check_streaming(config)
    model = checkpoint.model
    planned_model = backend.prepare_for_loading(copy.deepcopy(model), config)
    plan = list(file_tensors(planned_model))
    types = {name: m.qtype for name, m in planned_model.named_modules() if isinstance(m, GGUFWeight)}
    del planned_model
    shape = ModelShape.of(model.config)
    if imatrix is None:
        imatrix = resolve_imatrix(model, config, [], None, device)
    heads, n_layer = head_counts(model.config), model.config.num_hidden_layers
    groups = [(module, list(entries)) for module, entries in groupby(plan, key=lambda t: t.key.rpartition(".")[0])]
    with atomic_path(Path(path), directory=False) as tmp:
        writer = open_writer(tmp, model.config, config.quant_type, tokenizer)
        try:
            for entry in plan:
                entry.add_info(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for module, entries in track(groups, "gguf (streaming .gguf)"):
                if module == "":  # computed from the config, not read (a llama3 rope's divisors)
                    for entry in entries:
                        writer.write_tensor_data(entry.array())
                    continue
                checkpoint.materialise(module)
                float_module = model.get_submodule(module)
                quantized = float_module
                if module in types:
                    check_finite(module, float_module.weight)
                    quantized = _quantize(backend, config, module, float_module, types[module], device, imatrix, shape)
                tensors = quantized.state_dict(prefix=f"{module}.")
                for entry in entries:
                    written = file_tensor(entry.key, tensors[entry.key], quantized, n_layer, heads)
                    _check_planned(entry, written)
                    writer.write_tensor_data(written.array())
                del tensors, quantized, float_module
                model.get_submodule(module).to("meta")
        finally:
            writer.close()


def _quantize(
    backend: Backend,
    config: GGUFConfig,
    name: str,
    module: nn.Module,
    qtype: str,
    device: torch.device,
    imatrix: ImportanceMatrix | None,
    shape: ModelShape | None,
) -> nn.Module:
    """``module`` quantized as :meth:`GGUFBackend.quantize` quantizes it: the token embedding in
    its planned type, a linear as the backend's :meth:`quantize_linear` does."""
    if isinstance(module, nn.Embedding):
        return GGUFEmbedding.from_embedding(module, qtype, device).cpu()
    with bound_shape(shape):
        return backend.quantize_linear(name, module, config.for_module(name), device, imatrix, shape).cpu()


def _check_planned(planned: FileTensor, written: FileTensor) -> None:
    """``written`` must have the name, shape, type and size the header announced for it."""
    got = (written.name, tuple(written.data.shape), written.data.dtype, written.raw_dtype)
    want = (planned.name, tuple(planned.data.shape), planned.data.dtype, planned.raw_dtype)
    if got != want:
        raise QuantizationError(
            f"GGUF streaming: tensor {planned.key} came out as (name, shape, dtype, type) {got}, "
            f"but the file's header announced {want}"
        )
