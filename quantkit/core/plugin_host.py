"""The pluggy plugin manager: entry points, allow/deny lists, isolated failures."""

from __future__ import annotations

import importlib.metadata
import os
import traceback
from dataclasses import dataclass

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "quantkit"
ALLOW_ENV = "QUANTKIT_PLUGINS"
DENY_ENV = "QUANTKIT_DISABLE_PLUGINS"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be imported or failed in one of its hooks."""

    name: str
    stage: str
    reason: str


@dataclass(frozen=True)
class PluginInfo:
    name: str
    version: str | None
    hooks: tuple[str, ...]
    source: str


class PluginHost:
    """Owns the plugin manager and records every plugin that failed."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.manager.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._versions: dict[str, tuple[str | None, str]] = {}
        self._load_entry_points()

    def _load_entry_points(self) -> None:
        """Load every entry point of the ``quantkit`` group. quantkit's own (built-in) plugins
        load unless ``QUANTKIT_DISABLE_PLUGINS`` names them; ``QUANTKIT_PLUGINS`` limits the
        third-party ones, and a name it lists that is not installed is a recorded failure."""
        allow = _env_list(ALLOW_ENV)
        deny = set(_env_list(DENY_ENV) or ())
        entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        installed = {ep.name for ep in entry_points}
        for name in sorted(set(allow or ()) - installed):
            self.failures.append(PluginFailure(name, "import", f"{ALLOW_ENV} names it but no such plugin is installed"))
        for ep in entry_points:
            builtin = ep.value.split(".")[0] == "quantkit"
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
            dist = ep.dist
            self._versions[ep.name] = (dist.version if dist else None, ep.value)

    def call_each(self, hook_name: str, **kwargs) -> None:
        """Call one hook plugin by plugin, so one failing plugin is recorded, not fatal."""
        for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
            try:
                impl.function(**kwargs)
            except Exception as exc:
                self.failures.append(PluginFailure(impl.plugin_name, hook_name, _describe(exc)))

    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin with its version and the hooks it implements."""
        infos = []
        for name, plugin in self.manager.list_name_plugin():
            hooks = tuple(
                sorted(h.name for h in self.manager.get_hookcallers(plugin) or ())
            )
            version, source = self._versions.get(name, (None, repr(plugin)))
            infos.append(PluginInfo(name, version, hooks, source))
        return sorted(infos, key=lambda p: p.name)


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]


def _describe(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{at}"


def distributiondistribution_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
