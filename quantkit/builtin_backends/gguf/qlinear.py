"""Modules that keep their weight as raw ggml blocks and dequantize it on the fly.

The packed weight is a frozen ``uint8`` parameter called ``weight`` of shape
``(rows, bytes per row)``, the exact bytes a ``.gguf`` file stores, so transformers'
weight tying (``lm_head.weight = embed_tokens.weight``) shares it between a tied
embedding and output head. The ggml type travels with it in the state dict as the
int32 buffer ``ggml_type`` (gguf's ``GGMLQuantizationType`` number), so a saved
layer says what its bytes are.

:class:`GGUFLinear` runs through the kernels registered for it (:mod:`.kernels`): torch's int4
CPU kernel for Q4_0, Q4_1 and Q4_K, repacked from these bytes at the first forward (the state
dict keeps the bytes as they are), the dequantize reference for every type, and the weight
dequantized once and kept when the user forces ``dequantize-cached``.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType
from torch import Tensor, nn

from quantkit.core.dispatch import KernelLinear
from quantkit.core.errors import ModelFormatError

from . import native, quants
from .mixes import row_bytes

CODE_BITS = {
    "Q2_K": 2,
    "Q3_K": 3,
    "Q4_0": 4,
    "Q4_1": 4,
    "Q4_K": 4,
    "Q5_0": 5,
    "Q5_1": 5,
    "Q5_K": 5,
    "Q6_K": 6,
    "Q8_0": 8,
    "IQ4_NL": 4,
    "IQ4_XS": 4,
}
"""Bits of a code of each quantized ggml type (float types: their width)."""
SCALE_GROUP = {"Q2_K": 16, "Q3_K": 16, "Q6_K": 16}
"""Weights sharing one scale, where it is not the 32 of the other quantized types."""
FLOAT_BITS = {"F32": 32, "F16": 16, "BF16": 16}


class GGUFWeight(nn.Module):
    """Base of the GGUF modules: a ``(rows, cols)`` matrix stored as ggml blocks of ``qtype``."""

    def __init__(self, rows: int, cols: int, qtype: str, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.weight = nn.Parameter(
            torch.empty((rows, row_bytes(qtype, cols)), dtype=torch.uint8, device=device), requires_grad=False
        )
        self.register_buffer("ggml_type", torch.zeros((), dtype=torch.int32, device=device))
        self.set_type(qtype)

    def set_type(self, qtype: str) -> None:
        """Declare the ggml type of the stored bytes."""
        self.qtype = qtype
        self.ggml_type.fill_(int(GGMLQuantizationType[qtype]))

    def load_bytes(self, data: Tensor, qtype: str) -> None:
        """Take ``data`` (uint8, ``(rows, bytes per row)``) as this weight's bytes of ``qtype``."""
        expected = (self.rows, row_bytes(qtype, self.cols))
        if data.dtype != torch.uint8 or tuple(data.shape) != expected:
            raise ModelFormatError(
                f"{qtype} bytes of shape {tuple(data.shape)} ({data.dtype}) do not encode a "
                f"{self.rows}x{self.cols} matrix; expected uint8 {expected}"
            )
        self.weight = nn.Parameter(data, requires_grad=False)
        self.set_type(qtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full weight matrix, on the weight's device: float32, rounded to ``dtype`` if another
        (through :mod:`.native` where it serves: the same values, computed faster)."""
        fast = native.dequantize(self.weight, self.qtype, dtype)
        if fast is not None:
            return fast.reshape(self.rows, self.cols)
        return quants.dequantize(self.weight, self.qtype, (self.rows, self.cols)).to(dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # The saved ggml type decides the byte layout: adopt it before torch checks shapes.
        key = prefix + "ggml_type"
        if key in state_dict:
            number = int(state_dict[key])
            try:
                qtype = GGMLQuantizationType(number).name
                quants.block_size(qtype)
            except ValueError:
                raise ModelFormatError(f"{key}={number} is not a ggml type quantkit can read") from None
            data = state_dict.get(prefix + "weight")
            if data is not None and tuple(data.shape) != (self.rows, row_bytes(qtype, self.cols)):
                raise ModelFormatError(
                    f"{prefix}weight has shape {tuple(data.shape)}, which is not {qtype} bytes of a "
                    f"{self.rows}x{self.cols} matrix"
                )
            if qtype != self.qtype:
                shape = (self.rows, row_bytes(qtype, self.cols))
                self.weight = nn.Parameter(
                    torch.empty(shape, dtype=torch.uint8, device=self.weight.device), requires_grad=False
                )
                self.qtype = qtype
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)


class GGUFLinear(GGUFWeight, KernelLinear):
    """``nn.Linear`` with a GGUF-quantized weight; forward runs the kernel chosen for it
    (:class:`~quantkit.core.dispatch.KernelLinear`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qtype: str,
        *,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(out_features, in_features, qtype, device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, qtype: str, device: torch.device | None = None, imatrix: Tensor | None = None
    ) -> GGUFLinear:
        """Quantize ``linear``'s weight to ``qtype``, on ``device`` (default: the weight's), weighted
        by the importance-matrix values ``imatrix`` (one per input column) if given."""
        weight = linear.weight.detach()
        device = device or weight.device
        module = cls(
            linear.in_features,
            linear.out_features,
            qtype,
            bias=linear.bias is not None,
            device=device,
            dtype=weight.dtype,
        )
        module.load_bytes(quants.quantize(weight.to(device), qtype, imatrix), qtype)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    @classmethod
    def tied_to(cls, embedding: GGUFEmbedding) -> GGUFLinear:
        """An output head sharing ``embedding``'s packed table (tied word embeddings)."""
        module = cls(embedding.cols, embedding.rows, embedding.qtype, device="meta")
        module.weight = embedding.weight
        module.ggml_type = embedding.ggml_type.clone()
        return module

    @property
    def bits(self) -> int:
        """Bits of one code of the stored type (a float type's width)."""
        return CODE_BITS.get(self.qtype) or FLOAT_BITS[self.qtype]

    @property
    def group_size(self) -> int:
        """Inputs sharing one scale (a float type: the whole row)."""
        if self.qtype in FLOAT_BITS:
            return self.in_features
        return SCALE_GROUP.get(self.qtype, 32)

    def load_bytes(self, data: Tensor, qtype: str) -> None:
        super().load_bytes(data, qtype)
        self.reset_kernel()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
            f"bias={self.bias is not None}"
        )


class GGUFEmbedding(GGUFWeight):
    """``nn.Embedding`` with a GGUF-quantized table; looks up rows and dequantizes only those."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        qtype: str,
        *,
        padding_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, qtype, device)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        # Output dtype, kept as an empty float buffer so that model.to(dtype) updates it; never on
        # the meta device (an empty model's), as no state dict fills a non-persistent buffer.
        marker_device = None if device is not None and torch.device(device).type == "meta" else device
        self.register_buffer("dtype_marker", torch.empty(0, dtype=dtype, device=marker_device), persistent=False)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, qtype: str, device: torch.device | None = None) -> GGUFEmbedding:
        """Quantize ``embedding``'s table to ``qtype``, on ``device`` (default: the table's)."""
        weight = embedding.weight.detach()
        device = device or weight.device
        module = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            qtype,
            padding_idx=embedding.padding_idx,
            device=device,
            dtype=weight.dtype,
        )
        module.load_bytes(quants.quantize(weight.to(device), qtype), qtype)
        return module

    def forward(self, input_ids: Tensor) -> Tensor:
        flat = input_ids.reshape(-1)
        rows = quants.dequantize(self.weight.index_select(0, flat), self.qtype, (flat.numel(), self.cols))
        return rows.to(self.dtype_marker.dtype).reshape(*input_ids.shape, self.cols)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"
