"""The backend conformance suite: the contract every backend, built-in or plugin, must keep.

In a plugin's own tests (a plain pytest run with the plugin installed, so that its entry
point registers it), one line makes a parametrized test of every check for every config::

    from quantkit.testing import conformance_tests

    test_example_int8 = conformance_tests("example-int8", configs=[{}, {"scale_dtype": "float16"}])

Each check runs on a :func:`~quantkit.testing.models.tiny_llama` quantized through the public
API (calibrated backends get a few random token ids). A check that a backend's declarations
rule out (``serializable=False``, hardware it does not declare, ``Backend.deterministic``
false, a backend that is unavailable here) is skipped with the reason. Each config is
quantized and saved once and shared by the checks that only read the result.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ..api import load, quantize, save
from ..core.backend import Backend
from ..core.capabilities import Availability
from ..core.config import QuantConfig
from ..core.errors import (
    BackendUnavailableError,
    ConfigTypeError,
    ModelFormatError,
    NotTrainableError,
    QuantkitError,
)
from ..core.hardware import Hardware, hardware_of, resolve_device
from ..core.linears import quantizable_linears
from ..core.registry import get_registry
from ..core.resolve import as_config
from ..core.safetensors_files import stored_bytes
from ..core.serialization import unique_state_dict
from ..estimate import estimate
from ..streaming import quantize_streaming
from .models import tiny_llama, token_ids

if importlib.util.find_spec("peft") is not None:  # quantkit.finetune needs peft
    from ..finetune import attach_lora
else:
    attach_lora = None

FOLDER = "folder"
"""The layout key of a saved model folder (the others are a backend's ``file_suffixes``)."""
VOCAB = 256
"""Vocabulary size of the suite's model."""
UNAVAILABLE = "conformance check: simulated missing dependency"
"""The reason a backend made unavailable by the suite gives."""


@dataclass
class ForeignConfig(QuantConfig):
    """A config no backend takes: what a backend is handed by mistake."""

    quant_method: ClassVar[str] = "conformance-foreign"


@dataclass
class Quantized:
    """One config's shared result: quantized once, saved once (before any forward)."""

    model: nn.Module
    float_config: dict[str, Any]
    """The float model's ``config.json`` (what the estimator reads)."""
    targets: dict[str, tuple[int, int]]
    """``(out_features, in_features)`` of every linear the config targets."""
    float_bytes: int
    """Bytes per weight of the float model."""
    predicted_bits: dict[str, int]
    """``storage_bits`` of every target (:func:`predicted_storage_bits`)."""
    saved: dict[str, Path]
    """Layout (:data:`FOLDER` or a file suffix) -> where it was saved."""
    logits: torch.Tensor | None
    """The quantized model's logits on :func:`probe_ids` (``None`` without inference hardware)."""


@dataclass
class Case:
    """One check of one backend with one config, with the pytest fixtures it runs on."""

    backend: Backend
    config: QuantConfig
    device: torch.device
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch
    storage_rtol: float
    shared: Callable[[Case], Quantized]
    """This config's :class:`Quantized` result, built by the first check that asks."""
    shared_folder: Callable[[], Path]
    """A new folder that outlives this check (for the shared result's saves)."""

    @property
    def hardware(self) -> Hardware:
        return hardware_of(self.device)

    def require(self, *, inference: bool = False, saved: bool = False) -> None:
        """Skip, with the reason, when the backend's declarations rule the check out here."""
        availability = self.backend.is_available()
        if not availability:
            pytest.skip(f"backend {self.backend.name!r} is unavailable here: {availability.reason}")
        if not _device_present(self.device):
            pytest.skip(f"no {self.device.type} device here")
        capabilities = self.backend.capabilities
        if self.hardware not in capabilities.quantize_hardware:
            pytest.skip(f"{self.backend.name} does not declare quantize_hardware {self.hardware.value}")
        if inference and self.hardware not in capabilities.inference_hardware:
            pytest.skip(f"{self.backend.name} does not declare inference_hardware {self.hardware.value}")
        if saved and not capabilities.serializable:
            pytest.skip(f"{self.backend.name} declares serializable=False")

    def calibration(self) -> torch.Tensor | None:
        return token_ids(8, 64, vocab=VOCAB, seed=1) if self.backend.capabilities.requires_calibration else None

    def quantize(self, model: nn.Module) -> nn.Module:
        """``quantkit.quantize`` with this case's config, calibration and device."""
        model = quantize(model, self.config, calibration=self.calibration(), device=self.device)
        assert model.quantkit_backend == self.backend.name, (
            f"quantkit.quantize dispatched quant_method={self.config.quant_method!r} to backend "
            f"{model.quantkit_backend!r}, not {self.backend.name!r}"
        )
        return model

    def quantized(self) -> Quantized:
        return self.shared(self)

    def logits(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(probe_ids().to(self.device)).logits

    def assert_same_outputs(self, got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        """Identical logits, or close ones for a config the backend declares non-deterministic."""
        if self.backend.deterministic(self.config):
            assert torch.equal(got, expected), (
                f"{what} gives other logits: max difference {(got - expected).abs().max().item():.3g}"
            )
        else:
            scale = expected.abs().max().item()
            assert (got - expected).abs().max().item() <= 1e-2 * scale, f"{what} gives other logits"


def probe_ids() -> torch.Tensor:
    """The token ids every check's forward pass reads."""
    return token_ids(2, 16, vocab=VOCAB, seed=2)


def build_quantized(case: Case) -> Quantized:
    """Quantize a fresh :func:`tiny_llama`, save it in every layout, then run it once."""
    model = tiny_llama(vocab=VOCAB)
    targets = {name: (m.out_features, m.in_features) for name, m, _ in quantizable_linears(model, case.config)}
    predicted = predicted_storage_bits(case.backend, case.config, model)
    float_config = model.config.to_dict()
    float_bytes = model.lm_head.weight.element_size()
    model = case.quantize(model)
    folder = case.shared_folder()
    saved = {layout: save(model, folder / name) for layout, name in saved_names(case.backend).items()}
    inference = case.hardware in case.backend.capabilities.inference_hardware
    return Quantized(
        model, float_config, targets, float_bytes, predicted, saved, case.logits(model) if inference else None
    )


def saved_names(backend: Backend) -> dict[str, str]:
    """Layout -> the name the suite saves it under: a folder, and one file per suffix."""
    if not backend.capabilities.serializable:
        return {}
    return {FOLDER: "model", **{suffix: f"model{suffix}" for suffix in backend.file_suffixes}}


# -- the checks ------------------------------------------------------------------------


def quantizes_targeted_linears(case: Case) -> None:
    """``quantkit.quantize`` dispatches to this backend and replaces every linear the config
    targets by a module storing fewer bytes than the float weight; the logits are finite."""
    case.require()
    result = case.quantized()
    modules, state = dict(result.model.named_modules()), result.model.state_dict()
    for name, (out_features, in_features) in result.targets.items():
        assert type(modules[name]) is not nn.Linear, f"{name} is still a float nn.Linear"
        stored = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith(f"{name}."))
        assert 0 < stored < out_features * in_features * result.float_bytes, (
            f"{name} ({type(modules[name]).__name__}) holds {stored} bytes of tensors; "
            f"its float weight held {out_features * in_features * result.float_bytes}"
        )
    if result.logits is not None:
        assert torch.isfinite(result.logits).all(), "the quantized model's logits are not finite"


def reload_is_exact(case: Case) -> None:
    """In every layout: saving after a forward writes the same bytes as before it and leaves the
    model's outputs as they were; no temporary files remain; loading gives the same backend,
    config (a single file: the same ``quant_method``, as far as its format records a config),
    module types, tensors (a tied head stored once and tied again) and logits."""
    case.require(inference=True, saved=True)
    result = case.quantized()
    for layout, first in result.saved.items():
        again = save(result.model, case.tmp_path / first.name)
        assert _differing_files(again, first) == [], f"{layout}: saving after a forward wrote other bytes"
        assert not [p.name for p in case.tmp_path.iterdir() if p.name.startswith(".")], "temporary files left"
        case.assert_same_outputs(case.logits(result.model), result.logits, f"{layout}: the model after saving")

        loaded = load(first, device=case.device)
        assert loaded.quantkit_backend == case.backend.name
        if layout == FOLDER:
            assert loaded.quantkit_config == case.config, f"{layout}: reloaded {loaded.quantkit_config}"
        else:
            assert loaded.quantkit_config.quant_method == case.config.quant_method
        assert _module_types(loaded) == _module_types(result.model), f"{layout}: other module types reloaded"
        _assert_same_tensors(loaded, result.model, layout)
        assert _tied(loaded) == _tied(result.model), f"{layout}: the output head's tie to the embedding changed"
        if layout == FOLDER and _tied(result.model):
            head = _module_name(result.model, result.model.get_output_embeddings())
            assert f"{head}.weight" not in _saved_keys(first), f"tied {head}.weight is stored twice"
        case.assert_same_outputs(case.logits(loaded), result.logits, f"{layout}: the reloaded model")


def storage_bits_match_saved_bytes(case: Case) -> None:
    """``storage_bits`` of each targeted linear equals 8 x the bytes of its tensors (``<linear>.*``)
    in the saved safetensors, measured as ``quantkit compare`` measures them (with a
    ``storage_rtol``: their sum, within it); the estimator predicts the same sum."""
    case.require(saved=True)
    result = case.quantized()
    assert_storage_bits_match(result.saved[FOLDER], result.predicted_bits, rtol=case.storage_rtol)
    if get_registry().backends_for_method(case.config.quant_method)[0] is case.backend:
        estimated = estimate(config=case.config, model_config=result.float_config).quantized_bits
        predicted = sum(result.predicted_bits.values())
        assert estimated == predicted, f"the estimator predicts {estimated} bits, storage_bits {predicted}"


def requantization_is_byte_identical(case: Case) -> None:
    """Quantizing the same model with the same config and calibration again writes
    byte-identical files in every layout (configs the backend declares non-deterministic skip)."""
    case.require(saved=True)
    if not case.backend.deterministic(case.config):
        pytest.skip(f"{case.backend.name} declares this config non-deterministic")
    result = case.quantized()
    model = case.quantize(tiny_llama(vocab=VOCAB))
    for layout, first in result.saved.items():
        differing = _differing_files(save(model, case.tmp_path / first.name), first)
        assert differing == [], f"{layout}: quantizing twice wrote different {differing}"


def trainability_is_truthful(case: Case) -> None:
    """With ``capabilities.trainable``, LoRA adapters from ``quantkit.finetune.attach_lora``
    train (finite loss, a gradient reaching every adapter, adapters moving, quantized base
    unchanged); without it, ``attach_lora`` raises ``NotTrainableError``."""
    case.require(inference=True)
    if attach_lora is None:
        pytest.skip("peft is not installed (quantkit.finetune needs it)")
    model = copy.deepcopy(case.quantized().model)
    if case.backend.capabilities.trainable:
        peft_model = attach_lora(model)
        ok, why = lora_trains(peft_model, frozen_tensors(peft_model.get_base_model()))
        assert ok, f"{case.backend.name} declares trainable=True but LoRA does not train on it: {why}"
    else:
        with pytest.raises(NotTrainableError, match=re.escape(repr(case.backend.name))):
            attach_lora(model)


def rejects_non_finite_weights(case: Case) -> None:
    """A NaN or an Inf in a targeted linear's weight raises a ``QuantkitError`` naming that
    weight, before any linear is replaced."""
    case.require()
    for value in (math.nan, math.inf):
        model = tiny_llama(vocab=VOCAB)
        targets = [name for name, _, _ in quantizable_linears(model, case.config)]
        with torch.no_grad():
            model.get_submodule(targets[-1]).weight[1, 2] = value
        with pytest.raises(QuantkitError, match=re.escape(f"{targets[-1]}.weight")):
            case.quantize(model)
        replaced = [name for name in targets if type(model.get_submodule(name)) is not nn.Linear]
        assert not replaced, f"a {value} weight was refused only after replacing {replaced}"


def rejects_model_without_linears(case: Case) -> None:
    """A model without any ``nn.Linear`` raises a ``QuantkitError``."""
    case.require()
    with pytest.raises(QuantkitError):
        case.quantize(nn.Sequential(nn.ReLU()))


def rejects_foreign_config(case: Case) -> None:
    """The backend's ``quantize`` (and ``load_pretrained``) handed another method's config raise
    ``ConfigTypeError`` naming the config class it takes."""
    case.require()
    expected = re.escape(case.backend.config_class.__name__)
    with pytest.raises(ConfigTypeError, match=expected):
        case.backend.quantize(
            tiny_llama(vocab=VOCAB), ForeignConfig(), calibration=case.calibration(), device=case.device
        )
    if FOLDER in case.quantized().saved:
        with pytest.raises(ConfigTypeError, match=expected):
            case.backend.load_pretrained(case.quantized().saved[FOLDER], ForeignConfig(), case.device)


def failed_save_keeps_previous_output(case: Case) -> None:
    """A save interrupted after the backend wrote its files (``KeyboardInterrupt`` injected
    into its ``save_pretrained``/``save_file``) leaves the previous output byte for byte; a
    first save that fails leaves nothing; no temporary files remain."""
    case.require(saved=True)
    result = case.quantized()
    for layout, first in result.saved.items():
        root = case.tmp_path / layout.lstrip(".")
        root.mkdir()
        target = root / first.name
        _copy(first, target)
        before = _files(target)
        method = "save_pretrained" if layout == FOLDER else "save_file"
        original = getattr(case.backend, method)

        def interrupted(*args: Any, _original: Callable = original, **kwargs: Any) -> None:
            _original(*args, **kwargs)
            raise KeyboardInterrupt("conformance check: save interrupted")

        with case.monkeypatch.context() as patch:
            patch.setattr(case.backend, method, interrupted)
            for path in (target, root / f"new-{first.name}"):
                with pytest.raises(KeyboardInterrupt):
                    save(result.model, path)
        assert _files(target) == before, f"{layout}: an interrupted save changed the previous output"
        left = sorted(p.name for p in root.iterdir())
        assert left == [target.name], f"{layout}: after the failed saves the folder holds {left}"


def damaged_checkpoint_is_refused(case: Case) -> None:
    """Loading a checkpoint whose weights (a folder's largest file, or the single file) are
    truncated or garbage, or missing from a folder, raises ``ModelFormatError`` naming the file."""
    case.require(inference=True, saved=True)
    damages: dict[str, Callable[[Path], Any]] = {
        "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "garbage": lambda p: p.write_bytes(b"\x00\x01" * 64),
        "missing": Path.unlink,
    }
    for layout, first in case.quantized().saved.items():
        for damage, apply in damages.items():
            if damage == "missing" and layout != FOLDER:
                continue
            copy_ = case.tmp_path / f"{damage}-{first.name}"
            _copy(first, copy_)
            weights = max(copy_.iterdir(), key=lambda p: p.stat().st_size) if copy_.is_dir() else copy_
            apply(weights)
            with pytest.raises(ModelFormatError, match=re.escape(weights.name)):
                load(copy_, device=case.device)


def unavailable_backend_refuses_quantize(case: Case) -> None:
    """With ``is_available()`` false, ``quantkit.quantize`` raises ``BackendUnavailableError``
    giving the reason, and leaves the model's linears alone."""
    reason = _make_unavailable(case)
    model = tiny_llama(vocab=VOCAB)
    with pytest.raises(BackendUnavailableError, match=re.escape(reason)):
        quantize(model, case.config, calibration=case.calibration(), device=case.device)
    assert all(type(m) is nn.Linear for _, m, _ in quantizable_linears(model, case.config))


def unavailable_backend_refuses_load(case: Case) -> None:
    """With ``is_available()`` false, ``quantkit.load`` of its saved output (every layout)
    raises ``BackendUnavailableError`` giving the reason."""
    case.require(saved=True)
    saved = case.quantized().saved
    reason = _make_unavailable(case)
    for path in saved.values():
        with pytest.raises(BackendUnavailableError, match=re.escape(reason)):
            load(path, device=case.device)


def streaming_is_the_in_memory_save(case: Case) -> None:
    """A backend declaring ``streams_modules`` or ``streams_layers``: ``quantkit.quantize_streaming``
    of the suite's float model, saved by transformers in shards, writes the tensors (names, dtypes,
    shapes, bytes) and ``config.json`` (but the float model's origin: ``_name_or_path``, ``dtype``)
    of the in-memory save; a config its ``check_streaming``
    refuses skips with the reason."""
    case.require(saved=True)
    backend = case.backend
    if not (backend.streams_modules or backend.streams_layers):
        pytest.skip(f"{backend.name} declares neither streams_modules nor streams_layers")
    try:
        backend.check_streaming(case.config)
    except QuantkitError as error:
        pytest.skip(f"{backend.name} does not stream this config: {error}")
    reference = case.quantized().saved[FOLDER]
    source = case.tmp_path / "float"
    tiny_llama(vocab=VOCAB).save_pretrained(source, max_shard_size="100KB")
    streamed = quantize_streaming(
        source, case.config, case.tmp_path / "streamed", calibration=case.calibration(), device=case.device
    )
    got, expected = _saved_tensors(streamed), _saved_tensors(reference)
    assert got.keys() == expected.keys(), (
        f"streamed tensors differ in names: missing {sorted(expected.keys() - got.keys())[:5]}, "
        f"unexpected {sorted(got.keys() - expected.keys())[:5]}"
    )
    differing = [name for name in expected if not _same_bytes(got[name], expected[name])]
    assert not differing, f"streamed tensors differ from the in-memory save's: {differing[:5]}"
    configs = [json.loads((folder / "config.json").read_text()) for folder in (streamed, reference)]
    for config in configs:  # where the float model came from: a folder, or the suite's memory
        for origin in ("_name_or_path", "dtype"):
            config.pop(origin, None)
    assert configs[0] == configs[1], "the streamed config.json differs"


CHECKS: dict[str, Callable[[Case], None]] = {
    check.__name__: check
    for check in (
        quantizes_targeted_linears,
        reload_is_exact,
        storage_bits_match_saved_bytes,
        requantization_is_byte_identical,
        trainability_is_truthful,
        rejects_non_finite_weights,
        rejects_model_without_linears,
        rejects_foreign_config,
        failed_save_keeps_previous_output,
        damaged_checkpoint_is_refused,
        unavailable_backend_refuses_quantize,
        unavailable_backend_refuses_load,
        streaming_is_the_in_memory_save,
    )
}
"""Every check by name (its docstring says what it asserts)."""


# -- the pytest entry point --------------------------------------------------------------


def conformance_tests(
    backend: str,
    configs: Sequence[QuantConfig | Mapping[str, Any] | str] = ({},),
    *,
    checks: Sequence[str] = tuple(CHECKS),
    device: torch.device | str | None = None,
    storage_rtol: float = 0.0,
    xfail: Mapping[str, str] | None = None,
) -> Callable[..., None]:
    """A pytest test running ``checks`` (default: all of :data:`CHECKS`) on backend ``backend``
    (its registered name) with each of ``configs``; assign it to a ``test_*`` name in a test module.

    ``configs``: config objects, preset names, or dicts of fields (``quant_method`` defaults
    to the backend's). ``device``: where to quantize (default: the best one present).
    ``storage_rtol``: relative slack of :func:`storage_bits_match_saved_bytes`, for formats
    storing metadata whose length depends on the weights (keep 0 where storage_bits can be
    exact). ``xfail``: check name -> reason, for known failures (strict: a check that starts
    passing fails until removed from here).
    """
    xfail = dict(xfail or {})
    unknown = sorted({*checks, *xfail} - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown checks {unknown}; the checks are {list(CHECKS)}")
    specs = list(configs)
    if not specs:
        raise ValueError("conformance_tests needs at least one config")
    shared: dict[int, Quantized] = {}
    params = [
        pytest.param(
            index,
            check,
            id=f"{_config_id(spec)}-{check}",
            marks=[pytest.mark.xfail(reason=xfail[check], strict=True)] if check in xfail else [],
        )
        for index, spec in enumerate(specs)
        for check in checks
    ]

    @pytest.mark.parametrize(("index", "check"), params)
    def test_conformance(
        index: int,
        check: str,
        tmp_path: Path,
        tmp_path_factory: pytest.TempPathFactory,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        registered = get_registry().backend_named(backend)

        def quantized(case: Case) -> Quantized:
            if index not in shared:
                shared[index] = build_quantized(case)
            return shared[index]

        def folder() -> Path:
            return tmp_path_factory.mktemp(f"conformance-{backend}-{index}")

        config = _resolve(registered, specs[index])
        CHECKS[check](
            Case(registered, config, resolve_device(device), tmp_path, monkeypatch, storage_rtol, quantized, folder)
        )

    test_conformance.__doc__ = f"The conformance checks of backend {backend!r}."
    return test_conformance


# -- helpers ------------------------------------------------------------------------------


def predicted_storage_bits(backend: Backend, config: QuantConfig, model: nn.Module) -> dict[str, int]:
    """``storage_bits`` of every linear of the float ``model`` that ``config`` targets, asked
    inside the backend's ``storage_context`` (as the estimator asks)."""
    with backend.storage_context(model):
        return {
            name: backend.storage_bits(effective, name, linear.out_features, linear.in_features)
            for name, linear, effective in quantizable_linears(model, config)
        }


def assert_storage_bits_match(folder: Path, predicted: Mapping[str, int], *, rtol: float = 0.0) -> None:
    """The safetensors of ``folder`` hold, for each linear of ``predicted`` (name -> bits), 8 x
    its tensors' bytes (``<name>.*``, as ``quantkit compare`` measures them) = those bits;
    with ``rtol``, their sum within ``rtol`` of the predicted sum."""
    saved = {name: 8 * stored_bytes(folder, [name])["quantized_bytes"] for name in predicted}
    wrong = {name: saved[name] - bits for name, bits in predicted.items() if saved[name] != bits}
    total, measured = sum(predicted.values()), sum(saved.values())
    if wrong if rtol == 0 else abs(measured - total) > rtol * total:
        raise AssertionError(
            f"storage_bits predicts {total} bits, the saved tensors hold {measured}"
            f"{f' (allowed: {rtol:.1e} of it)' if rtol else ''}; saved minus predicted, per linear: {wrong}"
        )


def lora_trains(peft_model: nn.Module, base: dict[str, torch.Tensor]) -> tuple[bool, str]:
    """One backward pass and one optimizer step on ``peft_model``: did LoRA really train?

    ``base`` holds :func:`frozen_tensors` of the model before the adapters; the reason says
    what failed, or gives the loss.
    """
    embedding = peft_model.get_input_embeddings()
    tokens = token_ids(2, 32, vocab=embedding.num_embeddings, seed=2).to(embedding.weight.device)
    adapters = {n: p for n, p in peft_model.named_parameters() if ".lora_" in n}
    if not adapters:
        return False, "no adapter parameters"
    before = {n: p.detach().clone() for n, p in adapters.items()}
    peft_model.train()
    try:
        loss = peft_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
    except Exception as exc:  # a module without a backward is a finding, not an error of the check
        return False, f"forward/backward failed: {type(exc).__name__}: {exc}"
    if not torch.isfinite(loss):
        return False, f"loss {loss.item()}"
    no_grad = [n for n, p in adapters.items() if ".lora_B." in n and (p.grad is None or not p.grad.abs().sum() > 0)]
    if no_grad:
        return False, f"{len(no_grad)} of {len(adapters) // 2} adapters got no gradient, e.g. {no_grad[0]}"
    stray = [n for n, p in peft_model.named_parameters() if p.grad is not None and n not in adapters]
    if stray:
        return False, f"base parameters received gradients: {stray[:3]}"
    torch.optim.AdamW(adapters.values(), lr=1e-3).step()
    unchanged = [n for n, p in adapters.items() if ".lora_B." in n and torch.equal(p, before[n])]
    if unchanged:
        return False, f"adapters did not move: {unchanged[:3]}"
    after = frozen_tensors(peft_model.get_base_model())
    moved = [k for k in base if not torch.equal(base[k], after[k])]
    if moved:
        return False, f"quantized base tensors changed: {moved[:3]}"
    return True, f"loss {loss.item():.3f}"


def frozen_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every state-dict tensor but LoRA adapters', by their names without PEFT's ``.base_layer``."""
    return {
        k.replace(".base_layer", ""): v.detach().clone()
        for k, v in model.state_dict().items()
        if ".lora_" not in k and isinstance(v, torch.Tensor)
    }


def _resolve(backend: Backend, spec: QuantConfig | Mapping[str, Any] | str) -> QuantConfig:
    if isinstance(spec, Mapping):
        spec = {"quant_method": backend.config_class.quant_method, **spec}
    config = as_config(spec)
    if not isinstance(config, backend.config_class):
        raise TypeError(
            f"{spec!r} is a {type(config).__name__}; backend {backend.name!r} takes {backend.config_class.__name__}"
        )
    return config


def _config_id(spec: QuantConfig | Mapping[str, Any] | str) -> str:
    if isinstance(spec, str):
        return spec
    fields = dict(spec.to_diff_dict() if isinstance(spec, QuantConfig) else spec)
    fields.pop("quant_method", None)
    return ",".join(f"{k}={v}" for k, v in fields.items()) or "defaults"


def _device_present(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return True


def _make_unavailable(case: Case) -> str:
    """Make the backend unavailable (unless it already is); return the reason it gives."""
    others = [
        b.name
        for b in get_registry().backends_for_method(case.config.quant_method)
        if b is not case.backend and b.is_available()
    ]
    if others:
        pytest.skip(f"backends {others} also run quant_method={case.config.quant_method!r}")
    availability = case.backend.is_available()
    if not availability:
        return availability.reason
    case.monkeypatch.setattr(case.backend, "is_available", lambda: Availability(False, UNAVAILABLE))
    return UNAVAILABLE


def _files(path: Path) -> dict[str, bytes]:
    """Every file's bytes by its path relative to ``path`` (``""`` when ``path`` is a file)."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _differing_files(a: Path, b: Path) -> list[str]:
    files_a, files_b = _files(a), _files(b)
    return sorted(name for name in files_a.keys() | files_b.keys() if files_a.get(name) != files_b.get(name))


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)


def _saved_keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for path in folder.rglob("*.safetensors"):
        with safe_open(path, "pt") as f:
            keys.update(f.keys())
    return keys


def _saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            names = f.keys()
            tensors.update({name: f.get_tensor(name) for name in names})
    return tensors


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def _module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(module) for name, module in model.named_modules()}


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and getattr(head, "weight", None) is model.get_input_embeddings().weight


def _assert_same_tensors(loaded: nn.Module, model: nn.Module, layout: str) -> None:
    got, expected = unique_state_dict(loaded), unique_state_dict(model)
    assert got.keys() == expected.keys(), (
        f"{layout}: reloaded tensors differ in names: missing {sorted(expected.keys() - got.keys())[:5]}, "
        f"unexpected {sorted(got.keys() - expected.keys())[:5]}"
    )
    differing = [k for k in expected if got[k].dtype != expected[k].dtype or not torch.equal(got[k], expected[k])]
    assert not differing, f"{layout}: reloaded tensors differ: {differing[:5]}"
