"""The pluggy plugin manager: entry points, allow/deny lists, isolated failures."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .errors import QuantkitError, did_you_mean

ENTRY_POINT_GROUP = "quantkit"
ALLOW_ENV = "QUANTKIT_PLUGINS"
DENY_ENV = "QUANTKIT_DISABLE_PLUGINS"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be imported or failed in one of its hooks (``stage``), or a
    name in ``QUANTKIT_PLUGINS``/``QUANTKIT_DISABLE_PLUGINS`` that no plugin has."""

    name: str
    stage: str
    reason: str


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin; ``builtin`` for quantkit's own (entry points into ``quantkit.``)."""

    name: str
    version: str | None
    hooks: tuple[str, ...]
    source: str
    builtin: bool


class PluginHost:
    """Owns the plugin manager and records every plugin that failed.

    quantkit's own plugins load first, then third-party ones by name, and every hook is
    called in that order: a third party can never take a name a built-in registers.
    """

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.manager.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._sources: dict[str, tuple[str | None, str, bool]] = {}
        self._load_entry_points()

    def _load_entry_points(self) -> None:
        """Load every entry point of the ``quantkit`` group. quantkit's own (built-in) plugins
        load unless ``QUANTKIT_DISABLE_PLUGINS`` names them; ``QUANTKIT_PLUGINS`` limits the
        third-party ones. A name either lists that no plugin has is a recorded failure."""
        allow = _env_list(ALLOW_ENV)
        deny = _env_list(DENY_ENV) or []
        entry_points = sorted(
            importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (not _is_builtin(ep), ep.name)
        )
        installed = [ep.name for ep in entry_points]
        for env, names in ((ALLOW_ENV, allow or []), (DENY_ENV, deny)):
            for name in sorted(set(names) - set(installed)):
                reason = (
                    f"{env} names it, but no such plugin is installed{did_you_mean(name, installed)}; "
                    f"installed plugins: {', '.join(installed) or '(none)'}"
                )
                self.failures.append(PluginFailure(name, "environment", reason))
        for ep in entry_points:
            builtin = _is_builtin(ep)
            if ep.name in deny or (allow is not None and not builtin and ep.name not in allow):
                continue
            if self.manager.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must never break the others
                self.failures.append(PluginFailure(ep.name, "import", _describe(exc)))
                continue
            try:
                self.manager.register(plugin, name=ep.name)
                self.manager.check_pending()  # a misspelt hook name fails this plugin alone
            except Exception as exc:
                if self.manager.has_plugin(ep.name):
                    self.manager.unregister(name=ep.name)
                self.failures.append(PluginFailure(ep.name, "register", _describe(exc)))
                continue
            self._sources[ep.name] = (ep.dist.version if ep.dist else None, ep.value, builtin)

    def call_each(self, hook_name: str, register: Callable[..., None]) -> list[PluginFailure]:
        """Call one ``register``-taking hook plugin by plugin, in load order.

        Each plugin's call receives ``register`` bound to ``plugin=<its name>``. A plugin
        that raises is recorded, unregistered (none of its other hooks runs) and returned,
        so that the caller can drop what it registered before failing.
        """
        impls = {impl.plugin_name: impl for impl in getattr(self.manager.hook, hook_name).get_hookimpls()}
        failed = []
        for name, _ in self.manager.list_name_plugin():
            if name not in impls:
                continue
            kwargs = {"register": functools.partial(register, plugin=name)}
            try:
                impls[name].function(*(kwargs[arg] for arg in impls[name].argnames))  # as pluggy calls it
            except Exception as exc:
                failed.append(PluginFailure(name, hook_name, _describe(exc)))
        for failure in failed:
            self.manager.unregister(name=failure.name)
        self.failures += failed
        return failed

    def is_builtin(self, plugin: str | None) -> bool:
        """Whether ``plugin`` is one of quantkit's own (``None``: registered at run time, not)."""
        return plugin is not None and self._sources.get(plugin, (None, "", False))[2]

    def plugins(self) -> list[PluginInfo]:
        """Every loaded plugin (failed ones are in :attr:`failures` only), by name."""
        infos = []
        for name, plugin in self.manager.list_name_plugin():
            hooks = tuple(sorted(h.name for h in self.manager.get_hookcallers(plugin) or ()))
            version, source, builtin = self._sources.get(name, (None, repr(plugin), False))
            infos.append(PluginInfo(name, version, hooks, source, builtin))
        return sorted(infos, key=lambda p: p.name)


def _is_builtin(ep: importlib.metadata.EntryPoint) -> bool:
    return ep.value.split(".")[0].split(":")[0] == "quantkit"


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _describe(exc: BaseException) -> str:
    """The exception and where it was raised; a :class:`QuantkitError` (a refusal, e.g. a name
    clash) says it all, without the line in quantkit that raised it."""
    if isinstance(exc, QuantkitError):
        return f"{type(exc).__name__}: {exc}"
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{at}"


def distribution_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or ``None``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
