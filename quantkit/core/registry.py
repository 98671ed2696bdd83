"""What the plugins registered (backends with their configs and presets, kernels, datasets, commands),
the lookup of every name a user writes, and dispatch of a config to the backend that runs it."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .backend import Backend
from .commands import Command
from .config import QuantConfig
from .errors import (
    BackendUnavailableError,
    QuantkitError,
    UnknownMethodError,
    UnknownNameError,
    UnsupportedHardwareError,
)
from .hardware import Hardware
from .kernels import DEQUANTIZE, Kernel
from .plugin_host import PluginFailure, PluginHost
from .presets import Preset
from .text import Dataset

log = logging.getLogger("quantkit")

WIDTH_NAME = re.compile(r"(?:u?int|w)?(\d+)(?:[-_ ]?bits?)?", re.IGNORECASE)
"""``int4``, ``4bit``, ``4-bit``: a code width, which several methods' presets share."""


@dataclass(frozen=True)
class RegisteredPreset:
    """A preset with the ``quant_method`` of the backend that declared it."""

    preset: Preset
    quant_method: str
    backend: str


class Registry:
    """Everything the plugins registered, checked for clashes as it arrives.

    Names are unique across methods, aliases and presets, ignoring case; the first to
    register a name keeps it (quantkit's own plugins register first). A plugin that fails
    in any hook, a refused clash included, loses everything it registered.
    """

    def __init__(self, host: PluginHost) -> None:
        self.host = host
        self.backends: dict[str, Backend] = {}
        self.datasets: dict[str, Dataset] = {}
        self.presets: dict[str, RegisteredPreset] = {}
        self.commands: dict[str, Command] = {}
        self.kernels: list[Kernel] = [DEQUANTIZE]
        """Every kernel, quantkit's reference first, in registration order."""
        self._configs: dict[str, type[QuantConfig]] = {}
        self._aliases: dict[str, str] = {}
        self._owners: dict[tuple[str, str], str | None] = {}
        """(``"backend"``, ``"kernel"``, ``"dataset"`` or ``"command"``, name) -> the plugin that
        registered it; a kernel's name is its :attr:`~Kernel.label`."""
        self._claims: dict[str | None, list[str]] = {}
        """Plugin -> every name it asked for (the refused ones too)."""
        self._lost: dict[str, PluginFailure] = {}
        """A name a failed plugin asked for -> its failure, for the error that name gets."""
        for hook, register in (
            ("quantkit_register_backends", self.register_backend),
            ("quantkit_register_kernels", self.register_kernel),
            ("quantkit_register_datasets", self.register_dataset),
            ("quantkit_register_commands", self.register_command),
        ):
            for failure in host.call_each(hook, register):
                self._forget(failure)
        for failure in host.failures:
            log.warning("quantkit: plugin %r failed (%s): %s", failure.name, failure.stage, failure.reason)

    # -- registration (the ``register`` callbacks of the hooks) ----------------------------

    def register_backend(self, backend: Backend, *, plugin: str | None = None) -> None:
        """Add a backend, its config class, aliases and presets; refuse any clash.

        A second backend for a registered ``quant_method`` must take that method's config
        class; a config class of its own under a taken ``quant_method`` is refused.
        """
        if not isinstance(backend, Backend):
            raise QuantkitError(f"register() takes a quantkit.Backend, got {type(backend).__name__}")
        cls = backend.config_class
        method = cls.quant_method
        presets = [p.name for p in backend.presets]
        self._claims.setdefault(plugin, []).extend([backend.name, str(method), *backend.aliases, *presets])
        if backend.name in self.backends:
            raise QuantkitError(
                f"backend name {backend.name!r} is registered twice (first by {self._by('backend', backend.name)})"
            )
        if not isinstance(method, str) or not method:
            raise QuantkitError(f"backend {backend.name!r}: {cls.__name__}.quant_method must be a non-empty str")
        known = self._configs.get(method)
        if known is not None and known is not cls:
            owner = next(b.name for b in self.backends.values() if b.config_class is known)
            raise QuantkitError(
                f"backend {backend.name!r} declares quant_method={method!r} with {cls.__module__}.{cls.__name__}, "
                f"but backend {owner!r} ({self._by('backend', owner)}) already registered "
                f"{known.__module__}.{known.__name__} for it: a plugin must choose its own quant_method"
            )
        wanted = [*([method] if known is None else []), *backend.aliases, *presets]
        taken = self._taken()
        clashes = [f"{n!r} ({taken[n.lower()]})" for n in wanted if n.lower() in taken]
        folded = [n.lower() for n in wanted]
        clashes += [f"{n!r} (declared twice)" for i, n in enumerate(wanted) if n.lower() in folded[:i]]
        if clashes:
            raise QuantkitError(
                f"backend {backend.name!r} registers names already taken: {', '.join(clashes)}; "
                "names are unique across methods, aliases and presets, ignoring case"
            )
        for p in backend.presets:
            cls(**dict(p.fields))  # a preset must be a valid config: fail at registration, not at use
        self.backends[backend.name] = backend
        self._owners[("backend", backend.name)] = plugin
        self._configs[method] = cls
        self._aliases.update(dict.fromkeys(backend.aliases, method))
        self.presets.update({p.name: RegisteredPreset(p, method, backend.name) for p in backend.presets})

    def register_kernel(self, kernel: Kernel, *, plugin: str | None = None) -> None:
        """Add a kernel (what the ``register`` callback of the hook does); refuse a name already
        registered for one of its layer classes, or one serving no layer class."""
        if not isinstance(kernel, Kernel):
            raise QuantkitError(f"register() takes a quantkit.Kernel, got {type(kernel).__name__}")
        self._claims.setdefault(plugin, []).append(kernel.name)
        if not kernel.layers:
            raise QuantkitError(f"kernel {kernel.name!r} must declare the layer classes it serves")
        for other in self.kernels:
            shared = [c.__name__ for c in kernel.layers if not other.layers or c in other.layers]
            if other.name == kernel.name and shared:
                raise QuantkitError(
                    f"kernel {kernel.name!r} for {', '.join(shared)} is registered twice "
                    f"(first by {'quantkit itself' if other is DEQUANTIZE else self._by('kernel', other.label)}): "
                    "a plugin must choose another name"
                )
        self.kernels.append(kernel)
        self._owners[("kernel", kernel.label)] = plugin

    def register_dataset(self, dataset: Dataset, *, plugin: str | None = None) -> None:
        """Add a dataset (what the ``register`` callback of the hook does)."""
        if not isinstance(dataset, Dataset):
            raise QuantkitError(f"register() takes a quantkit.Dataset, got {type(dataset).__name__}")
        self._claims.setdefault(plugin, []).append(dataset.name)
        if dataset.name in self.datasets:
            raise QuantkitError(
                f"dataset name {dataset.name!r} is registered twice (first by {self._by('dataset', dataset.name)})"
            )
        self.datasets[dataset.name] = dataset
        self._owners[("dataset", dataset.name)] = plugin

    def register_command(self, command: Command, *, plugin: str | None = None) -> None:
        """Add a ``quantkit`` subcommand (what the ``register`` callback of the hook does)."""
        if not isinstance(command, Command):
            raise QuantkitError(f"register() takes a quantkit.Command, got {type(command).__name__}")
        self._claims.setdefault(plugin, []).append(command.name)
        if command.name in self.commands:
            raise QuantkitError(
                f"command {command.name!r} is registered twice (first by {self._by('command', command.name)}): "
                "a plugin must choose another name"
            )
        self.commands[command.name] = command
        self._owners[("command", command.name)] = plugin

    def _by(self, kind: str, name: str) -> str:
        plugin = self._owners.get((kind, name))
        if plugin is None:
            return "a direct register call"
        return f"quantkit's own plugin {plugin!r}" if self.host.is_builtin(plugin) else f"plugin {plugin!r}"

    def _taken(self) -> dict[str, str]:
        """Every method, alias and preset name, lower-cased -> what holds it."""
        taken = {}
        for b in self.backends.values():
            taken[b.config_class.quant_method.lower()] = f"quant_method of backend {b.name!r}"
            taken.update({a.lower(): f"alias of backend {b.name!r}" for a in b.aliases})
            taken.update({p.name.lower(): f"preset of backend {b.name!r}" for p in b.presets})
        return taken

    def _forget(self, failure: PluginFailure) -> None:
        """Drop everything the failed plugin registered; remember the names it asked for."""
        for name in self._claims.pop(failure.name, []):
            self._lost.setdefault(name, failure)
        for kind, name in [key for key, owner in self._owners.items() if owner == failure.name]:
            del self._owners[(kind, name)]
            if kind == "dataset":
                del self.datasets[name]
            elif kind == "kernel":
                self.kernels = [k for k in self.kernels if k.label != name]
            elif kind == "command":
                del self.commands[name]
            else:
                backend = self.backends.pop(name)
                self.presets = {k: p for k, p in self.presets.items() if p.backend != name}
                for alias in backend.aliases:
                    del self._aliases[alias]
                if not self.backends_for_method(backend.config_class.quant_method):
                    del self._configs[backend.config_class.quant_method]

    # -- lookups ---------------------------------------------------------------------------

    def config_classes(self) -> dict[str, type[QuantConfig]]:
        return dict(self._configs)

    def builtin_backends(self) -> dict[str, Backend]:
        """The backends quantkit's own plugins registered (a third party's left out)."""
        return {n: b for n, b in self.backends.items() if self.host.is_builtin(self._owners.get(("backend", n)))}

    def method_name(self, name: Any) -> str:
        """The ``quant_method`` that ``name`` (a method or an alias, case ignored) stands for.

        Raises :class:`UnknownMethodError` with the closest name, or the presets of the
        width ``name`` gives (``int4``), and the plugins that failed.
        """
        found = _find(name, [*self._configs, *self._aliases])
        if found is None:
            raise self._unknown_method(name, presets=False)
        return self._aliases.get(found, found)

    def lookup(self, name: Any) -> tuple[str, dict[str, Any]]:
        """``(quant_method, fields)`` of a preset, method or alias name (case ignored); the
        fields are the preset's (none for a method or an alias)."""
        found = _find(name, [*self.presets, *self._configs, *self._aliases])
        if found is None:
            raise self._unknown_method(name, presets=True)
        if found in self.presets:
            return self.presets[found].quant_method, dict(self.presets[found].preset.fields)
        return self._aliases.get(found, found), {}

    def dataset(self, name: str) -> Dataset:
        """The dataset registered as ``name`` (case ignored)."""
        found = _find(name, self.datasets)
        if found is None:
            raise UnknownNameError(
                "dataset",
                name,
                self.datasets,
                listing="registered datasets (a text file's path works too)",
                note=self._failure_note(name),
            )
        return self.datasets[found]

    def command(self, name: str) -> Command:
        """The ``quantkit`` subcommand ``name``."""
        if name not in self.commands:
            raise UnknownNameError("command", name, self.commands, listing="commands", note=self._failure_note(name))
        return self.commands[name]

    def _unknown_method(self, name: Any, *, presets: bool) -> UnknownMethodError:
        known = [*self._configs, *self._aliases, *(self.presets if presets else ())]
        listing = "registered methods, aliases and presets" if presets else "registered methods and aliases"
        preset = None if presets else self.presets.get(_find(name, self.presets) or "")
        if preset is not None:
            hint = (
                f"; {name!r} is a preset, not a quant_method: pass the name itself where a config is asked for, "
                f"or quant_method={preset.quant_method!r} with its fields {dict(preset.preset.fields)}"
            )
        else:
            hint = self._width_hint(name)
        return UnknownMethodError(name, known, listing=listing, hint=hint, note=self._failure_note(name))

    def _width_hint(self, name: Any) -> str | None:
        """For ``int4``-like names: the presets and methods of that width (no one method owns it)."""
        match = WIDTH_NAME.fullmatch(name.strip()) if isinstance(name, str) else None
        if match is None:
            return None
        bits = match.group(1)
        presets = sorted(
            n
            for n, p in self.presets.items()
            if self._configs[p.quant_method](**dict(p.preset.fields)).code_bits == float(bits)
        )
        methods = sorted(m for m, cls in self._configs.items() if float(bits) in cls.bit_widths())
        return (
            f"; {name!r} names a width, not a method: choose a {bits}-bit preset "
            f"({', '.join(presets) or 'none registered'}) or a method that takes {bits} bits "
            f"({', '.join(methods) or 'none registered'}) and set its width field"
        )

    def _failure_note(self, name: Any) -> str:
        lost = self._lost.get(name) if isinstance(name, str) else None
        if lost is not None:
            return f"; {name!r} comes from plugin {lost.name!r}, which failed ({lost.stage}): {lost.reason}"
        if not self.host.failures:
            return ""
        failed = "; ".join(f"{f.name!r} ({f.stage}): {f.reason}" for f in self.host.failures)
        return f"; plugins that failed, one of which may provide it: {failed}"

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

    def kernels_for(self, module: Any) -> list[Kernel]:
        """The kernels serving ``module``'s class, highest priority first."""
        return sorted((k for k in self.kernels if k.serves(module)), key=lambda k: -k.priority)

    def kernels_of(self, backend: Backend) -> list[Kernel]:
        """The kernels serving the backend's ``layer_classes``, the ``dequantize`` reference aside."""
        return [
            k
            for k in self.kernels
            if k is not DEQUANTIZE and any(issubclass(c, k.layers) for c in backend.layer_classes)
        ]

    def kernel_name(self, name: Any) -> str:
        """The registered kernel name ``name`` stands for (case ignored); :class:`UnknownNameError` if none."""
        found = _find(name, dict.fromkeys(k.name for k in self.kernels))
        if found is None:
            known = {k.name for k in self.kernels}
            raise UnknownNameError("kernel", name, known, listing="registered kernels", note=self._failure_note(name))
        return found

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
            f"{b.name} ({', '.join(sorted(h.value for h in getattr(b.capabilities, attr)))})" for b in available
        )
        able = sorted(
            b.name for b in self.backends.values() if hardware in getattr(b.capabilities, attr) and b.is_available()
        )
        raise UnsupportedHardwareError(
            f"quant_method={config.quant_method!r} cannot {purpose} on {hardware.value}: "
            f"its backends declare {declared}. Backends that {purpose} on {hardware.value}: "
            f"{', '.join(able) or '(none)'}"
        )

    def backend_named(self, name: str) -> Backend:
        found = _find(name, self.backends)
        if found is None:
            raise UnknownNameError(
                "backend", name, self.backends, listing="registered backends", note=self._failure_note(name)
            )
        return self.backends[found]

    def backend_for_suffix(self, suffix: str, hardware: Hardware | None = None) -> Backend | None:
        """The backend owning ``suffix`` files (``None``: no backend does). With ``hardware``, for
        loading one there: raises :class:`BackendUnavailableError` or :class:`UnsupportedHardwareError`
        when that backend cannot run inference on it."""
        for backend in self.backends.values():
            if suffix.lower() not in backend.file_suffixes:
                continue
            if hardware is None:
                return backend
            availability = backend.is_available()
            if not availability:
                raise BackendUnavailableError(
                    f"backend {backend.name!r} reads {suffix} files but cannot run here: {availability.reason}"
                )
            declared = backend.capabilities.inference_hardware
            if hardware not in declared:
                raise UnsupportedHardwareError(
                    f"backend {backend.name!r} reads {suffix} files but runs inference on "
                    f"{', '.join(sorted(h.value for h in declared))}, not {hardware.value}"
                )
            return backend
        return None


def _find(name: Any, names: Iterable[str]) -> str | None:
    """``name`` among ``names``: exactly, else ignoring case and surrounding blanks."""
    if not isinstance(name, str):
        return None
    names = list(names)
    if name in names:
        return name
    folded = name.strip().lower()
    return next((n for n in names if n.lower() == folded), None)


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
