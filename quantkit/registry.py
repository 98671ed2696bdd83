"""Backends and datasets collected from the plugins, and dispatch of configs to backends."""

from __future__ import annotations

from .backend import Backend
from .calibration import Dataset
from .configs import QuantConfig
from .errors import (
    BackendUnavailableError,
    QuantkitError,
    UnknownMethodError,
    UnsupportedHardwareError,
)
from .hardware import Hardware
from .plugins import PluginHost


class Registry:
    """What the plugins registered: backends by name, datasets by name."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host
        self.backends: dict[str, Backend] = {}
        self.datasets: dict[str, Dataset] = {}
        host.call_each("quantkit_register_backends", register=self.register_backend)
        host.call_each("quantkit_register_datasets", register=self.register_dataset)

    def register_backend(self, backend: Backend) -> None:
        """Add a backend (what the ``register`` callback of the hook does)."""
        if not isinstance(backend, Backend):
            raise QuantkitError(f"register() takes a quantkit.Backend, got {type(backend).__name__}")
        if backend.name in self.backends:
            raise QuantkitError(f"backend name {backend.name!r} is registered twice")
        self.backends[backend.name] = backend

    def register_dataset(self, dataset: Dataset) -> None:
        """Add a dataset (what the ``register`` callback of the hook does)."""
        if dataset.name in self.datasets:
            raise QuantkitError(f"dataset name {dataset.name!r} is registered twice")
        self.datasets[dataset.name] = dataset

    def config_classes(self) -> dict[str, type[QuantConfig]]:
        return {b.config_class.quant_method: b.config_class for b in self.backends.values()}

    def backends_for_method(self, method: str) -> list[Backend]:
        return [b for b in self.backends.values() if b.config_class.quant_method == method]

    def backend_for(self, config: QuantConfig, hardware: Hardware, *, purpose: str = "quantize") -> Backend:
        """The first available backend for ``config`` that declares ``hardware``.

        ``purpose`` is ``"quantize"`` or ``"inference"``. Raises
        :class:`UnknownMethodError`, :class:`BackendUnavailableError` or
        :class:`UnsupportedHardwareError`; never falls back silently.
        """
        candidates = self.backends_for_method(config.quant_method)
        if not candidates:
            failed = "".join(f"; plugin {f.name!r} failed: {f.reason}" for f in self.host.failures)
            raise UnknownMethodError(config.quant_method, self.config_classes()) from (
                QuantkitError(failed) if failed else None
            )
        available = [b for b in candidates if b.is_available()]
        if not available:
            reasons = "; ".join(f"{b.name}: {b.is_available().reason}" for b in candidates)
            raise BackendUnavailableError(
                f"no backend for quant_method={config.quant_method!r} can run here ({reasons})"
            )
        attr = f"{purpose}_hardware"
        for backend in available:
            if hardware in getattr(backend.capabilities, attr):
                return backend
        declared = ", ".join(
            f"{b.name} ({', '.join(sorted(h.value for h in getattr(b.capabilities, attr)))})"
            for b in available
        )
        able = sorted(
            b.name for b in self.backends.values()
            if hardware in getattr(b.capabilities, attr) and b.is_available()
        )
        raise UnsupportedHardwareError(
            f"quant_method={config.quant_method!r} cannot {purpose} on {hardware.value}: "
            f"its backends declare {declared}. Backends that {purpose} on {hardware.value}: "
            f"{', '.join(able) or '(none)'}"
        )

    def backend_for_suffix(self, suffix: str) -> Backend | None:
        for backend in self.backends.values():
            if suffix.lower() in backend.file_suffixes:
                return backend
        return None


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    if _registry is None:
        _registry = Registry(PluginHost())
    return _registry


def reset_registry() -> None:
    """Forget loaded plugins (tests; after installing a plugin at run time)."""
    global _registry
    _registry = None
