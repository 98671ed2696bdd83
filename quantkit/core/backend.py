"""The contract every quantization backend implements, and the template doing their common work."""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .capabilities import Availability, Capabilities, check_shape_limits
from .config import QuantConfig
from .errors import ConfigTypeError, QuantkitError
from .linears import Target, check_finite, quantizable_linears, replace_linears
from .presets import Preset
from .serialization import quant_config_of, read_safetensors_folder, unique_state_dict, write_safetensors_folder
from .streamed_checkpoints import StreamedCheckpoint


class Backend(abc.ABC):
    """One quantization method's implementation, on a template that does the common work.

    Subclasses set three class attributes and implement :meth:`storage_bits`:

    - ``name``: unique backend name (shown by ``quantkit backends``);
    - ``config_class``: the :class:`QuantConfig` subclass it accepts;
    - ``capabilities``: a :class:`Capabilities` declaration, shape limits included;

    and may declare ``presets`` (named configs, with their place in ``quantkit compare``'s
    default run), ``aliases`` (other names of the method, e.g. ``bnb``) and ``layer_classes``.

    Quantizing: a calibration-free backend implements :meth:`quantize_linear`, which the
    template's :meth:`quantize` calls for each linear (through :meth:`linear_quantizer`) once
    the whole model is checked (:meth:`targets`), then :meth:`place`\\ s the model and
    quantizes the :meth:`other_quantizers`' modules. A calibrated one overrides
    :meth:`quantize`, starting from :meth:`targets` (see :mod:`quantkit.layerwise`).

    Serialization: a serializable backend implements :meth:`empty_module`, from which
    :meth:`prepare_for_loading` builds the empty model the saved state dict loads into.
    :meth:`quantization_config_block` and :meth:`module_tensors` shape what
    :meth:`save_pretrained` writes; a layout of its own overrides :meth:`load_pretrained`, and
    a single-file format listed in ``file_suffixes`` (e.g. ``.gguf``) implements
    :meth:`save_file`/:meth:`load_file`.

    Streaming (:func:`quantkit.quantize_streaming`): a backend declaring ``streams_modules``
    or ``streams_layers`` quantizes a checkpoint streamed from disk into the folder
    :meth:`save_pretrained` writes for the same model, byte for byte.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[QuantConfig]]
    capabilities: ClassVar[Capabilities]
    presets: ClassVar[tuple[Preset, ...]] = ()
    aliases: ClassVar[tuple[str, ...]] = ()
    file_suffixes: ClassVar[tuple[str, ...]] = ()
    streams_modules: ClassVar[bool] = False
    """Its :meth:`quantize` is the template's, whose hooks (:meth:`linear_quantizer`,
    :meth:`placed_dtype`, :meth:`other_quantizers`, :meth:`module_tensors`) see one module at a time:
    :func:`quantkit.quantize_streaming` runs them module by module on a checkpoint streamed from
    disk, and writes what :meth:`save_pretrained` writes for the model quantized in memory."""
    streams_layers: ClassVar[bool] = False
    """Its :meth:`quantize` runs :func:`quantkit.layerwise.quantize_layerwise` on the model it is
    given, so it quantizes a model whose decoder layers stream in from disk exactly as one in
    memory (:func:`quantkit.quantize_streaming`; tests/test_streaming.py checks the bytes)."""
    layer_classes: ClassVar[tuple[type[nn.Module], ...]] = ()
    """The quantized layer classes its models are made of: the registered kernels serving them are
    the backend's (``quantkit recommend`` reads where they run)."""

    def is_available(self) -> Availability:
        """Whether this backend can run here; the reason when it cannot."""
        missing = self.capabilities.missing_requirements()
        if missing:
            return Availability(False, f"missing package(s): {', '.join(missing)}")
        return Availability(True)

    # -- checking -------------------------------------------------------------------------

    def check_config(self, config: QuantConfig) -> None:
        """Refuse a config this backend cannot run, before anything changes: one of another
        class here; a backend with rules of its own extends this."""
        if not isinstance(config, self.config_class):
            raise ConfigTypeError(type(self).__name__, "config", config, self.config_class.__name__)

    def targets(self, model: nn.Module, config: QuantConfig, *, check_weights: bool = True) -> list[Target]:
        """The linears of ``model`` to quantize with their effective configs, found in one walk and
        checked before any is touched: :meth:`check_config`, every declared shape limit and,
        with ``check_weights``, finite weights."""
        self.check_config(config)
        targets = quantizable_linears(model, config)
        check_shape_limits(targets, self.capabilities.shape_limits)
        if check_weights:
            for name, linear, _ in targets:
                check_finite(name, linear.weight)
        return targets

    # -- quantizing -----------------------------------------------------------------------

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
        :meth:`needs_calibration` says so, else ``None``. The template checks every target,
        replaces each by its :meth:`linear_quantizer`'s module, :meth:`place`\\ s the model
        and quantizes the modules of its :meth:`other_quantizers`.
        """
        device = torch.device(device)
        targets = self.targets(model, config)
        others = self.other_quantizers(model, config, device)
        quantize = self.linear_quantizer(model, config, targets, calibration, device)
        with torch.no_grad():
            replace_linears(model, targets, quantize, description=self.name)
            model = self.place(model, config, device)
            for quantize_other in others.values():
                quantize_other(model)
        return model

    def linear_quantizer(
        self,
        model: nn.Module,
        config: QuantConfig,
        targets: list[Target],
        calibration: torch.Tensor | None,
        device: torch.device,
    ) -> Callable[[str, nn.Linear, QuantConfig], nn.Module]:
        """The function turning each target linear of ``model`` (its name, the linear, its effective
        config) into its quantized module: :meth:`quantize_linear` on ``device``. A format whose
        linears depend on the whole model works that out here, once (GGUF: the layer count, the
        importance matrix); streaming calls it on the model on the meta device."""
        return lambda name, linear, cfg: self.quantize_linear(name, linear, cfg, device)

    def quantize_linear(self, name: str, linear: nn.Linear, config: QuantConfig, device: torch.device) -> nn.Module:
        """The quantized module replacing ``linear`` (module ``name``, ``config`` its effective
        config), quantized on ``device``."""
        raise NotImplementedError(f"backend {self.name!r} implements neither quantize nor quantize_linear")

    def place(self, model: nn.Module, config: QuantConfig, device: torch.device) -> nn.Module:
        """``model`` once its linears are quantized, on ``device``, its floating-point tensors cast
        to :meth:`placed_dtype` (recorded as its config's ``dtype``) when that is set."""
        dtype = self.placed_dtype(config)
        model.to(device=device, dtype=dtype)
        if dtype is not None and getattr(model, "config", None) is not None:
            model.config.dtype = dtype
        return model

    def placed_dtype(self, config: QuantConfig) -> torch.dtype | None:
        """The dtype :meth:`place` casts the quantized model to (HQQ: its compute dtype); ``None``
        keeps the dtype it was loaded in."""
        return None

    def other_quantizers(
        self, model: nn.Module, config: QuantConfig, device: torch.device
    ) -> dict[str, Callable[[nn.Module], dict[str, nn.Module]]]:
        """Modules of ``model`` beyond its target linears that the format quantizes too (GGUF: the
        token embedding), planned on the float model: name -> the function that, called with the
        model once its linears are quantized and placed, quantizes that module on ``device`` and
        installs it, returning the modules it installed by name (GGUF: a tied head too). None by default."""
        return {}

    # -- the format -----------------------------------------------------------------------

    @abc.abstractmethod
    def storage_bits(self, config: QuantConfig, name: str, out_features: int, in_features: int) -> int:
        """Exact number of bits this format stores for the ``out x in`` linear called ``name``
        (weights, scales, zeros, indices) under ``config``, its effective config: the estimator's
        source. ``name`` is ``""`` when unknown (an estimate from a parameter count)."""

    def code_bits(self, config: QuantConfig, name: str, out_features: int, in_features: int) -> float | None:
        """Bits of each weight's code in linear ``name`` (scales and zeros left out) under its
        effective ``config``: the config's width unless the format picks per-tensor types (GGUF mixes)."""
        return config.code_bits

    def calibration_flops(self, config: QuantConfig, out_features: int, in_features: int, tokens: int) -> float:
        """Matrix-multiply FLOPs the method spends on one ``out x in`` linear calibrated on ``tokens``
        inputs, beyond the forward passes (statistics, searches, solves): the time estimator's source
        for methods it has no formula of its own for. 0 for calibration-free methods."""
        return 0.0

    def calibration_elements(self, config: QuantConfig, out_features: int, in_features: int, tokens: int) -> float:
        """Memory-bound elementwise operations the method spends on one such linear beyond
        :meth:`calibration_flops` (work priced at memory speed, e.g. AQLM's codeword scoring). 0 by default."""
        return 0.0

    def working_bytes(self, config: QuantConfig, out_features: int, in_features: int) -> int:
        """Peak bytes that quantizing one ``out x in`` weight with ``config`` (a target linear, or a
        module of :meth:`other_quantizers`) holds besides the weight as stored and its quantized
        copy: float32 copies, codes before packing, buffers. The streamed peak estimator's source.
        By default four float32 copies of the weight (an elementwise quantizer's float32 weight,
        quotient, codes and a temporary)."""
        return 4 * 4 * out_features * in_features

    def needs_calibration(self, config: QuantConfig) -> bool:
        """Whether quantizing with ``config`` takes calibration tokens: ``requires_calibration``
        unless a config can ask for them (GGUF's importance matrix from text)."""
        return self.capabilities.requires_calibration

    def deterministic(self, config: QuantConfig) -> bool:
        """Whether a model quantized with ``config`` gives the same outputs on every run (the
        comparison evaluates one that does not several times and reports the spread)."""
        return True

    def other_bits(
        self, config: QuantConfig, model: nn.Module, name: str, parameter: torch.Tensor, float_bits: int
    ) -> int:
        """Stored bits of ``model``'s parameter ``name``, which is not a quantized linear's
        weight (embeddings, norms, biases, skipped layers): kept at ``float_bits`` unless
        the format also packs it (GGUF's token embedding)."""
        return parameter.numel() * float_bits

    def storage_context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context in which :meth:`storage_bits` may look at the whole ``model`` (a
        format whose layer types depend on the layer count, like GGUF mixes); the
        estimator calls ``storage_bits`` inside it."""
        return contextlib.nullcontext()

    # -- saving and loading ---------------------------------------------------------------

    def empty_module(self, name: str, linear: nn.Linear, config: QuantConfig) -> nn.Module:
        """An empty quantized module for ``linear`` (``config``: its effective config) that the
        saved state dict loads into."""
        raise NotImplementedError(f"backend {self.name!r} does not load saved models")

    def prepare_for_loading(self, model: nn.Module, config: QuantConfig) -> nn.Module:
        """Swap the linears of an empty model for :meth:`empty_module`\\ s."""
        targets = self.targets(model, config, check_weights=False)
        return replace_linears(model, targets, self.empty_module, description=f"{self.name} (loading)")

    def check_streaming(self, config: QuantConfig) -> None:
        """Refuse, before anything is written, a ``config`` this streaming backend cannot run on a
        checkpoint streamed from disk (GGUF: an importance matrix collected from calibration text),
        naming the field and what works. Nothing by default."""
        return None

    def quantization_config_block(self, model: nn.Module, config: QuantConfig) -> dict:
        """The ``quantization_config`` block of the saved ``config.json``: transformers' own
        where one exists, else the config's :meth:`~QuantConfig.to_dict`. ``model`` is the
        quantized model, or the float one on the meta device when streaming: a block read from
        the model must read the same from both."""
        try:
            return config.to_hf_dict()
        except QuantkitError:
            return config.to_dict()

    def saved_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors :meth:`save_pretrained` writes: the state dict, tied copies left out, with the
        tensors of each module laid out by :meth:`module_tensors`."""
        tensors = unique_state_dict(model)
        for name, module in model.named_modules():
            own = self.module_tensors(name, module)
            if own is not None:
                tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{name}.")}
                tensors.update(own)
        return tensors

    def module_tensors(self, name: str, module: nn.Module) -> dict[str, torch.Tensor] | None:
        """The tensors saved for ``module``, the module ``name`` of a quantized model (full names, its
        submodules' included), when the format lays them out otherwise than its state dict (HQQ);
        ``None`` (the default) saves its state dict."""
        return None

    def save_pretrained(self, model: nn.Module, directory: Path) -> None:
        """Write ``model`` into the empty folder ``directory`` (safetensors + config.json)."""
        block = self.quantization_config_block(model, quant_config_of(model))
        write_safetensors_folder(model, directory, block, self.saved_tensors(model))

    def load_pretrained(self, directory: Path, config: QuantConfig, device: torch.device) -> nn.Module:
        """Read a folder written by :meth:`save_pretrained`."""
        return read_safetensors_folder(directory, config, self, device)

    def save_file(self, model: nn.Module, path: Path, *, tokenizer=None) -> None:
        """Write ``model`` (and ``tokenizer``, which the format embeds) to one file."""
        raise NotImplementedError(f"backend {self.name!r} writes no single-file format")

    def stream_file(
        self,
        checkpoint: StreamedCheckpoint,
        config: QuantConfig,
        path: Path,
        *,
        tokenizer=None,
        device: torch.device,
        resumed: Mapping[str, Any] | None = None,
        record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Write ``checkpoint`` quantized with ``config`` to the single file ``path`` (one of
        ``file_suffixes``) one module at a time, atomically: the bytes :meth:`save_file` writes for
        the same model quantized in memory (:func:`quantkit.quantize_streaming` to a ``.gguf``).

        With ``record``, ``path`` is a work file written in place instead, and ``record`` is called
        with a small JSON-able state each time more of it is on disk; given back as ``resumed`` by
        a later call with the same checkpoint and config, that state lets it keep the file so far."""
        raise NotImplementedError(f"backend {self.name!r} writes no single-file format")

    def input_files(self, config: QuantConfig) -> tuple[Path, ...]:
        """Files besides the checkpoint that quantizing with ``config`` reads (GGUF: an importance
        matrix), which a resumed streamed run must find unchanged. None by default."""
        return ()

    def stream_source(self, path: Path) -> StreamedCheckpoint:
        """The float checkpoint in the single file ``path`` (one of ``file_suffixes``), read one
        module at a time by :func:`quantkit.quantize_streaming`."""
        raise NotImplementedError(f"backend {self.name!r} streams no single-file checkpoint")

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
