"""Plugin manager and the four registries it fills.

Built-in plugins are found through the ``parpkit`` entry-point group, exactly like third-party ones.
A hook implementation that matches no specification is an error (``check_pending``), not silence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pluggy

from parpkit import hookspecs
from parpkit.errors import PluginError
from parpkit.interfaces import Backbone, Criterion, Dataset, Schedule

#: registry kind -> (hook name, base class every registered class must derive from)
KINDS: dict[str, tuple[str, type]] = {
    "backbone": ("register_backbones", Backbone),
    "criterion": ("register_criteria", Criterion),
    "schedule": ("register_schedules", Schedule),
    "dataset": ("register_datasets", Dataset),
}


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    provider: str  # distribution (package) or plugin name that registered it


class Registry:
    def __init__(self, kind: str, base: type):
        self.kind, self.base = kind, base
        self._entries: dict[str, Entry] = {}

    def add(self, cls: Any, provider: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(f"{provider} registered {cls!r} as a {self.kind}, but it is not a subclass of "
                              f"parpkit.{self.base.__name__}")
        name = getattr(cls, "name", "")
        if not name:
            raise PluginError(f"{provider} registered {cls.__qualname__} as a {self.kind} without a `name`")
        if name in self._entries:
            other = self._entries[name]
            raise PluginError(f"two plugins register a {self.kind} named {name!r}: {other.provider} "
                              f"({other.cls.__qualname__}) and {provider} ({cls.__qualname__}); "
                              "uninstall one or rename it")
        self._entries[name] = Entry(name, cls, provider)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise PluginError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]


class Plugins:
    """The loaded plugin manager with one registry per interface."""

    def __init__(self, extra: list[tuple[object, str]] = (), load_entrypoints: bool = True):
        pm = pluggy.PluginManager("parpkit")
        pm.add_hookspecs(hookspecs)
        if load_entrypoints:
            pm.load_setuptools_entrypoints("parpkit")
        for plugin, name in extra:
            pm.register(plugin, name=name)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            known = ", ".join(hook for hook, _ in KINDS.values())
            raise PluginError(f"plugin {exc.plugin!r} implements a hook parpkit does not define: {exc}; parpkit's hooks "
                              f"are {known} (see parpkit.hookspecs)") from None
        self.pm = pm
        providers = {id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()}
        self.registries = {kind: Registry(kind, base) for kind, (_, base) in KINDS.items()}
        for kind, (hook_name, _) in KINDS.items():
            registry = self.registries[kind]
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                provider = providers.get(id(impl.plugin), impl.plugin_name)
                impl.function(register=lambda cls, _p=provider, _r=registry: _r.add(cls, _p))

    def __getitem__(self, kind: str) -> Registry:
        return self.registries[kind]
