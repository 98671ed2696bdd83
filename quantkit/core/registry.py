"""What the plugins registered (backends with their configs and presets, datasets, commands),
and dispatch of a config to the backend that runs it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .backend import Backend
from .commands import Command
from .config import QuantConfig
from .errors import BackendUnavailableError, QuantkitError, UnknownMethodError, UnsupportedHardwareError
from .hardware import Hardware
from .plugin_host import PluginHost
from .presets import Preset
from .text import Dataset


@dataclass(frozen=True)
class RegisteredPreset:
    """A preset with the ``quant_method`` of the backend that declared it."""

    preset: Preset
    quant_method: str
    backend: str


class Registry:
    """Everything the plugins registered, checked for clashes as it arrives."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host
        self.backends: dict[str, Backend] = {}
        self.datasets: dict[str, Dataset] = {}
        self.presets: dict[str, RegisteredPreset] = {}
        self.commands: dict[str, Command] = {}
        self._configs: dict[str, type[QuantConfig]] = {}
        self._aliases: dict[str, str] = {}
        host.call_each("quantkit_register_backends", register=self.register_backend)
        host.call_each("quantkit_register_datasets", register=self.register_dataset)
        host.call_each("quantkit_register_commands", register=self.register_command)

    # -- registration (the ``register`` callbacks of the hooks) ----------------------------

    def register_backend(self, backend: Backend) -> None:
        """Add a backend, its config class, aliases and presets; refuse any clash."""
        if not isinstance(backend, Backend):
            raise QuantkitError(f"register() takes a quantkit.Backend, got {type(backend).__name__}")
        if backend.name in self.backends:
            raise QuantkitError(f"backend name {backend.name!r} is registered twice")
        cls = backend.config_class
        method = cls.quant_method
        if not isinstance(method, str) or not method:
            raise QuantkitError(f"backend {backend.name!r}: {cls.__name__}.quant_method must be a non-empty str")
        known = self._configs.get(method)
        if known is not None and known is not cls:
            owner = next(b.name for b in self.backends.values() if b.config_class is known)
            raise QuantkitError(
                f"backend {backend.name!r} declares quant_method={method!r} with {cls.__module__}.{cls.__name__}, "
                f"but backend {owner!r} already registered {known.__module__}.{known.__name__} for it: "
                "a plugin must choose its own quant_method"
            )
        names = self._names()
        clashes = [a for a in backend.aliases if a in names or a == method]
        clashes += [p.name for p in backend.presets if p.name in names or p.name in backend.aliases]
        if method in names and known is None:
            clashes.append(method)
        if clashes:
            raise QuantkitError(f"backend {backend.name!r} registers names already taken: {', '.join(clashes)}")
        for p in backend.presets:
            cls(**dict(p.fields))  # a preset must be a valid config: fail at registration, not at use
        self.backends[backend.name] = backend
        self._configs[method] = cls
        self._aliases.update(dict.fromkeys(backend.aliases, method))
        self.presets.update({p.name: RegisteredPreset(p, method, backend.name) for p in backend.presets})

    def register_dataset(self, dataset: Dataset) -> None:
        """Add a dataset (what the ``register`` callback of the hook does)."""
        if dataset.name in self.datasets:
            raise QuantkitError(f"dataset name {dataset.name!r} is registered twice")
        self.datasets[dataset.name] = dataset

    def register_command(self, command: Command) -> None:
        """Add a ``quantkit`` subcommand (what the ``register`` callback of the hook does)."""
        if not isinstance(command, Command):
            raise QuantkitError(f"register() takes a quantkit.Command, got {type(command).__name__}")
        if command.name in self.commands:
            raise QuantkitError(f"command {command.name!r} is registered twice")
        self.commands[command.name] = command

    def _names(self) -> set[str]:
        return {*self._configs, *self._aliases, *self.presets}

    # -- lookups ---------------------------------------------------------------------------

    def config_classes(self) -> dict[str, type[QuantConfig]]:
        return dict(self._configs)

    def aliases(self) -> dict[str, str]:
        """Alias -> ``quant_method`` (``bnb`` -> ``bitsandbytes``)."""
        return dict(self._aliases)

    def method_name(self, name: Any, *, presets: bool = False) -> str:
        """The ``quant_method`` that ``name`` (a method or an alias) stands for.

        Raises :class:`UnknownMethodError` with the closest known name; ``presets`` adds
        the preset names to the candidates the message suggests.
        """
        if isinstance(name, str):
            if name in self._configs:
                return name
            if name in self._aliases:
                return self._aliases[name]
        known = [*self._configs, *self._aliases, *(self.presets if presets else ())]
        failed = "".join(f"; plugin {f.name!r} failed ({f.stage}): {f.reason}" for f in self.host.failures)
        raise UnknownMethodError(name, known, note=failed)

    def config_class(self, method: str) -> type[QuantConfig]:
        return self._configs[self.method_name(method)]

    def config_class_for_hf(self, hf_method: str, block: Mapping[str, Any]) -> type[QuantConfig] | None:
        """The config class that reads transformers' ``quantization_config`` block ``block``
        (``hf_method`` is its ``quant_method``; legacy bitsandbytes blocks have none)."""
        for cls in self._configs.values():
            if cls.hf_quant_method is not None and cls.hf_quant_method == hf_method:
                return cls
            if not hf_method and cls.hf_quant_method is not None and cls.hf_reads_legacy(block):
                return cls
        return None

    def backends_for_method(self, method: str) -> list[Backend]:
        return [b for b in self.backends.values() if b.config_class.quant_method == method]

    def backend_for(self, config: QuantConfig, hardware: Hardware, *, purpose: str = "quantize") -> Backend:
        """The first available backend for ``config`` that declares ``hardware``.

        ``purpose`` is ``"quantize"`` or ``"inference"``. Raises
        :class:`UnknownMethodError`, :class:`BackendUnavailableError` or
        :class:`UnsupportedHardwareError`; never falls back silently.
        """
        candidates = self.backends_for_method(self.method_name(config.quant_method))
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

    def backend_named(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            raise QuantkitError(f"no backend named {name!r}; registered: {', '.join(sorted(self.backends))}") from None

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
