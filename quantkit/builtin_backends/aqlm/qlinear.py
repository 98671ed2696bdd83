"""The inference module of AQLM checkpoints: aqlm's ``QuantizedLinear`` tensors, a torch forward.

Tensor names, shapes and dtypes are those of ``aqlm.QuantizedLinear`` (aqlm 1.1.7), which
transformers' AQLM integration loads:

- ``codes``: ``(out / out_group_size, in / in_group_size, num_codebooks)``, int8 for codebooks
  of up to 2**8 entries, else int16; codes of ``2**(b-1)`` and above are stored minus ``2**b``
  (two's complement), as aqlm packs them;
- ``codebooks``: ``(num_codebooks, 2**nbits_per_codebook, out_group_size, in_group_size)``;
- ``scales``: ``(out / out_group_size, 1, 1, 1)``;
- ``bias``: ``(out,)`` or absent;

each a parameter without gradient, as in aqlm.

Codebooks and scales are stored in float16. The forward runs on any device and caches nothing.
Where a table of every codeword's product with each input group is smaller than the weight (2x8 and
1x8 decoding a few rows; :meth:`AQLMLinear.uses_lookup`), each output sums its codes' table entries
(a gather of ``out x in / 8 x M`` values); elsewhere (prompts, 1x16) it decodes the weight and calls
``F.linear``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .aq import STORED_DTYPE, AQResult
from .beam_search import dequantize
from .config import AQLMConfig


def _frozen(tensor: Tensor) -> nn.Parameter:
    """A parameter without gradient, as aqlm holds each tensor (peft finds a layer's device by them)."""
    return nn.Parameter(tensor, requires_grad=False)


def code_dtype(nbits: int) -> torch.dtype:
    """aqlm's storage type of codes of ``nbits`` bits."""
    return torch.int8 if nbits <= 8 else torch.int16


def pack_codes(codes: Tensor, nbits: int) -> Tensor:
    """Codes in ``[0, 2**nbits)`` as aqlm stores them (signed, wrapped)."""
    return torch.where(codes >= 2 ** (nbits - 1), codes - 2**nbits, codes).to(code_dtype(nbits))


def unpack_codes(codes: Tensor, nbits: int) -> Tensor:
    """Stored codes back to ``[0, 2**nbits)``, as int64."""
    return codes.long() % 2**nbits


class AQLMLinear(nn.Module):
    """A linear layer stored as AQLM ``codes``, ``codebooks``, ``scales`` (+ ``bias``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: AQLMConfig,
        *,
        bias: bool,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.in_group_size, self.out_group_size = config.in_group_size, config.out_group_size
        self.num_codebooks, self.nbits_per_codebook = config.num_codebooks, config.nbits_per_codebook
        for name, shape in self.shapes.items():
            setattr(self, name, _frozen(torch.empty(shape, dtype=self.dtypes[name], device=device)))
        self.bias = _frozen(torch.empty(out_features, dtype=bias_dtype, device=device)) if bias else None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each stored tensor (the bias aside)."""
        num_out = self.out_features // self.out_group_size
        size = 2**self.nbits_per_codebook
        return {
            "codes": (num_out, self.in_features // self.in_group_size, self.num_codebooks),
            "codebooks": (self.num_codebooks, size, self.out_group_size, self.in_group_size),
            "scales": (num_out, 1, 1, 1),
        }

    @property
    def dtypes(self) -> dict[str, torch.dtype]:
        return {"codes": code_dtype(self.nbits_per_codebook), "codebooks": STORED_DTYPE, "scales": STORED_DTYPE}

    @classmethod
    def empty_like(cls, linear: nn.Linear, config: AQLMConfig, device: torch.device | str = "meta") -> AQLMLinear:
        """An unfilled module shaped for ``linear`` (for loading a checkpoint into)."""
        bias = linear.bias
        return cls(
            linear.in_features,
            linear.out_features,
            config,
            bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
            device=device,
        )

    @classmethod
    def from_result(cls, linear: nn.Linear, config: AQLMConfig, result: AQResult) -> AQLMLinear:
        """The quantized module of ``linear`` from :func:`~.aq.aq_quantize`'s result."""
        module = cls.empty_like(linear, config)
        device = linear.weight.device
        module.codes = _frozen(pack_codes(result.codes, config.nbits_per_codebook).to(device))
        module.codebooks = _frozen(result.codebooks.to(device=device, dtype=STORED_DTYPE).contiguous())
        module.scales = _frozen(result.scales.to(device=device, dtype=STORED_DTYPE).view(module.shapes["scales"]))
        if linear.bias is not None:
            module.bias = _frozen(linear.bias.detach().clone())
        return module

    def dequantize(self) -> Tensor:
        """The float32 weight ``(out, in)`` these tensors encode."""
        codes = unpack_codes(self.codes, self.nbits_per_codebook)
        return dequantize(codes, self.codebooks.float(), self.scales.float().flatten())

    def uses_lookup(self, rows: int) -> bool:
        """Whether :meth:`forward` on ``rows`` input rows sums table entries: its tables (``rows x M x
        2**nbits`` products per input group) hold fewer values than the weight's groups decode to."""
        table = rows * self.num_codebooks * 2**self.nbits_per_codebook
        return self.out_group_size == 1 and table < self.out_features * self.in_group_size

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        rows = x.numel() // self.in_features
        if not self.uses_lookup(rows):
            return F.linear(x, self.dequantize().to(x.dtype), bias)
        y = self._lookup_product(x.reshape(rows, self.in_features).float()).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def _lookup_product(self, x: Tensor) -> Tensor:
        """``x @ W.T`` for ``x (rows, in)`` float32: per row, the table of every codeword's product
        with each input group, then per output the sum of its codes' entries, times its scale."""
        num_in, size = self.in_features // self.in_group_size, 2**self.nbits_per_codebook
        books = self.codebooks.float()[:, :, 0, :]  # (M, K, ig)
        tables = torch.einsum("rid,mkd->rimk", x.view(len(x), num_in, self.in_group_size), books)
        codes = unpack_codes(self.codes, self.nbits_per_codebook)  # (O, I, M)
        offsets = torch.arange(num_in * self.num_codebooks, device=x.device).view(num_in, -1) * size
        entries = tables.reshape(len(x), -1)[:, (codes + offsets).view(self.out_features, -1)]  # (rows, O, I*M)
        return entries.sum(-1) * self.scales.float().view(1, -1)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.num_codebooks}x{self.nbits_per_codebook}, "
            f"groups={self.out_group_size}x{self.in_group_size}, "
            f"bias={self.bias is not None}"
        )
