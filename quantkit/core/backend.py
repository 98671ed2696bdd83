"""The contract every quantization backend implements."""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .capabilities import Availability, Capabilities
from .config import QuantConfig
from .presets import Preset
from .serialization import read_safetensors_folder, write_safetensors_folder


class Backend(abc.ABC):
    """One quantization method's implementation.

    Subclasses set three class attributes and implement :meth:`quantize`:

    - ``name``: unique backend name (shown by ``quantkit backends``);
    - ``config_class``: the :class:`QuantConfig` subclass it accepts;
    - ``capabilities``: a :class:`Capabilities` declaration;

    and may declare ``presets`` (named configs, with their place in ``quantkit compare``'s
    default run) and ``aliases`` (other names of the method, e.g. ``bnb``).

    Serialization: a backend whose output is serializable implements
    :meth:`prepare_for_loading` (replace linears with empty quantized modules
    so that the saved state dict loads into them). It may override
    :meth:`save_pretrained`/:meth:`load_pretrained` for a folder layout of its
    own, and :meth:`save_file`/:meth:`load_file` for single-file formats
    listed in ``file_suffixes`` (e.g. ``.gguf``).
    """

    name: ClassVar[str]
    config_class: ClassVar[type[QuantConfig]]
    capabilities: ClassVar[Capabilities]
    presets: ClassVar[tuple[Preset, ...]] = ()
    aliases: ClassVar[tuple[str, ...]] = ()
    file_suffixes: ClassVar[tuple[str, ...]] = ()

    def is_available(self) -> Availability:
        """Whether this backend can run here; the reason when it cannot."""
        missing = self.capabilities.missing_requirements()
        if missing:
            return Availability(False, f"missing package(s): {', '.join(missing)}")
        return Availability(True)

    @abc.abstractmethod
    def quantize(
        self,
        model: nn.Module,
        config: QuantConfig,
        *,
        calibration: torch.Tensor | None,
        device: torch.device,
    ) -> nn.Module:
        """Quantize ``model`` in place and return it.

        ``calibration`` holds token ids of shape ``(nsamples, seqlen)`` when
        the backend declares ``requires_calibration``, else ``None``.
        """

    @abc.abstractmethod
    def storage_bits(self, config: QuantConfig, name: str, out_features: int, in_features: int) -> int:
        """Exact number of bits this format stores for the ``out x in`` linear
        called ``name`` (weights, scales, zeros, indices): the estimator's source.

        ``name`` is ``""`` when unknown (an estimate from a parameter count).
        """

    def code_bits(self, config: QuantConfig, name: str, out_features: int, in_features: int) -> float | None:
        """Bits of each weight's code in linear ``name`` (scales and zeros left out):
        ``config``'s width unless the format picks per-tensor types (GGUF mixes)."""
        return (config.for_module(name) if name else config).code_bits

    def other_bits(self, config: QuantConfig, model: nn.Module, name: str, parameter: torch.Tensor, float_bits: int) -> int:
        """Stored bits of ``model``'s parameter ``name``, which is not a quantized linear's
        weight (embeddings, norms, biases, skipped layers): kept at ``float_bits`` unless
        the format also packs it (GGUF's token embedding)."""
        return parameter.numel() * float_bits

    def storage_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context in which :meth:`storage_bits` may look at the whole ``model`` (a
        format whose layer types depend on the layer count, like GGUF mixes); the
        estimator calls ``storage_bits`` inside it."""
        return contextlib.nullcontext()

    def prepare_for_loading(self, model: nn.Module, config: QuantConfig) -> nn.Module:
        """Swap the linears of an empty (meta-device) model for empty quantized modules."""
        raise NotImplementedError(f"backend {self.name!r} does not load saved models")

    def save_pretrained(self, model: nn.Module, directory: Path) -> None:
        """Write ``model`` into the empty folder ``directory`` (safetensors + config.json)."""
        write_safetensors_folder(model, directory)

    def load_pretrained(self, directory: Path, config: QuantConfig, device: torch.device) -> nn.Module:
        """Read a folder written by :meth:`save_pretrained`."""
        return read_safetensors_folder(directory, config, self, device)

    def save_file(self, model: nn.Module, path: Path, *, tokenizer=None) -> None:
        """Write ``model`` (and ``tokenizer``, which the format embeds) to one file."""
        raise NotImplementedError(f"backend {self.name!r} writes no single-file format")

    def load_file(self, path: Path, device: torch.device) -> nn.Module:
        raise NotImplementedError(f"backend {self.name!r} reads no single-file format")

    def describe(self) -> dict:
        """This backend as plain data (``quantkit backends --json``)."""
        availability = self.is_available()
        return {
            "name": self.name,
            "quant_method": self.config_class.quant_method,
            "aliases": list(self.aliases),
            "bits": [int(b) if float(b).is_integer() else b for b in self.config_class.bit_widths()],
            "presets": [p.name for p in self.presets],
            "available": availability.ok,
            "reason": availability.reason,
            **self.capabilities.to_dict(),
        }
