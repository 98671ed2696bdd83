"""Collecting llama.cpp importance matrices from calibration text, and finding a model's.

:func:`collect_imatrix` computes what llama.cpp's ``llama-imatrix`` computes: for every
linear of the decoder layers, the sum over calibration tokens of each input column's squared
activation, and the token count (their ratio is the mean the quantizers weight errors by).
Like ``llama-imatrix`` it observes the *float* model: it runs quantkit's layer-by-layer
pipeline (:func:`quantkit.layerwise.quantize_layerwise`, one decoder layer on the device at a
time) without quantizing anything, so each layer sees the float model's activations, not
those of already quantized layers. Linears outside the decoder layers (an untied ``lm_head``)
get no entry, as in ``llama-imatrix`` without ``--process-output``; nor does the token
embedding, a lookup. Calibration windows are used as given (``llama-imatrix`` also puts a BOS
token first in each chunk when the tokenizer adds one).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from quantkit.core.errors import QuantizationError
from quantkit.core.linears import Target, quantizable_linears
from quantkit.layerwise import LayerContext, decoder_stack, quantize_layerwise

from .config import GGUFConfig
from .imatrix_files import ImportanceMatrix, load_imatrix
from .mixes import gguf_name

log = logging.getLogger("quantkit")


def weight_name(module_name: str, n_layer: int | None) -> str | None:
    """The GGUF weight name an importance matrix files linear ``module_name`` under (``blk.0.attn_q.weight``)."""
    name = gguf_name(module_name, n_layer)
    return None if name is None else f"{name}.weight"


@torch.no_grad()
def collect_imatrix(
    model: nn.Module,
    calibration: torch.Tensor,
    targets: Sequence[Target] | None = None,
    *,
    device: torch.device | str = "cpu",
    dataset: str | None = None,
) -> ImportanceMatrix:
    """The importance matrix of ``targets`` (default: the linears a :class:`GGUFConfig` quantizes;
    only those inside decoder layers get an entry) over calibration token ids ``(nsamples,
    seqlen)``, observed on the float model.

    ``dataset`` names the text in the matrix (``imatrix.datasets``); the chunk size is ``seqlen``.
    """
    targets = quantizable_linears(model, GGUFConfig()) if targets is None else targets
    stack = decoder_stack(model)
    n_layer = len(stack.layers)
    inside = [t for t in targets if t.name.startswith(stack.prefix + "layers.")]
    if not inside:
        raise QuantizationError("no linear to collect an importance matrix for inside the decoder layers")
    matrix = ImportanceMatrix(datasets=[dataset] if dataset else [], chunk_size=int(calibration.shape[1]))

    def observe_layer(ctx: LayerContext) -> None:
        local = ImportanceMatrix()  # this rank's samples; summed over the ranks under torchrun

        def observer(relative: str):
            name = weight_name(f"{ctx.name}.{relative}", n_layer)

            def add(x: torch.Tensor, _chunk: int) -> None:
                rows = x.reshape(-1, x.shape[-1])
                local.add(name, rows.square().sum(0, dtype=torch.float64), rows.shape[0])

            return add

        ctx.observe({relative: observer(relative) for relative in ctx.targets})
        for name, sums in local.sums.items():
            count = ctx.reduce_sum(torch.tensor([local.counts[name]], dtype=torch.float64, device=ctx.device))
            matrix.add(name, ctx.reduce_sum(sums.to(ctx.device)), int(count.item()))

    quantize_layerwise(
        model, inside, calibration, device, observe_layer, description="imatrix", full_rank_tokens=1, data_parallel=True
    )
    return matrix


def resolve_imatrix(
    model: nn.Module,
    config: GGUFConfig,
    targets: Sequence[Target],
    calibration: torch.Tensor | None,
    device: torch.device,
) -> ImportanceMatrix | None:
    """The importance matrix ``config.imatrix`` asks for: read from its file, collected from
    ``calibration`` (token ids of its text), or ``None`` without one."""
    if config.imatrix is None:
        return None
    if config.imatrix_is_file:
        return load_imatrix(config.imatrix)
    if calibration is None:
        raise QuantizationError(
            f"GGUFConfig(imatrix={config.imatrix!r}) collects an importance matrix from calibration text, "
            "but no calibration tokens were given"
        )
    return collect_imatrix(model, calibration, targets, device=device, dataset=config.imatrix)


def imatrix_values(matrix: ImportanceMatrix | None, module_name: str, in_features: int, n_layer: int | None):
    """The per-column values of linear ``module_name`` (``None``: not in ``matrix``, quantized
    without, as llama-quantize does); a matrix of another width is refused."""
    name = None if matrix is None else weight_name(module_name, n_layer)
    if name is None or name not in matrix.sums:
        if matrix is not None:
            log.info("imatrix: no entry for %s (%s); quantized without one", module_name, name)
        return None
    values = matrix.values(name)
    if values.numel() != in_features:
        raise QuantizationError(
            f"importance matrix entry {name!r} has {values.numel()} columns; {module_name} has {in_features} "
            "inputs: the matrix was made for another model"
        )
    return values
