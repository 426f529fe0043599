"""Plugin manager and the four registries it fills.

Built-in plugins are found through the ``parpkit`` entry-point group, exactly like third-party ones.
A hook implementation that matches no specification is an error (``check_pending``), not silence.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pluggy

from parpkit import hookspecs
from parpkit.errors import PluginError
from parpkit.interfaces import (Backbone, Criterion, Dataset, PluginOptions, PruningCriterion, ReconstructingCriterion, Schedule,
                                StructuredCriterion)

#: what a criterion derives from: each says what the engine asks of it (scores per weight, per unit, or masks)
CRITERION_KINDS = (PruningCriterion, StructuredCriterion, ReconstructingCriterion)

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
    def __init__(self, kind: str, base: type, unavailable: dict[str, str] | None = None):
        self.kind, self.base = kind, base
        self._entries: dict[str, Entry] = {}
        self.unavailable = unavailable if unavailable is not None else {}  # plugin -> why it was not loaded

    def check(self, cls: Any, provider: str) -> str:
        """The recipe name ``cls`` registers under, or a PluginError saying why it cannot."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(f"{provider} registered {cls!r} as a {self.kind}, but it is not a subclass of "
                              f"parpkit.{self.base.__name__}")
        name = getattr(cls, "name", "")
        if not name:
            raise PluginError(f"{provider} registered {cls.__qualname__} as a {self.kind} without a `name`")
        if inspect.isabstract(cls):  # refused now, not with a TypeError when a recipe first names it
            missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
            raise PluginError(f"{provider} registered {cls.__qualname__} as a {self.kind}, but it does not implement {missing}")
        if self.base is Criterion and not issubclass(cls, CRITERION_KINDS):
            raise PluginError(f"{provider} registered {cls.__qualname__} as a criterion, but it derives from none of "
                              f"{', '.join(f'parpkit.{k.__name__}' for k in CRITERION_KINDS)} (which says what it scores)")
        options = getattr(cls, "Options", PluginOptions)
        if not (isinstance(options, type) and issubclass(options, PluginOptions)):
            raise PluginError(f"{provider} registered {cls.__qualname__}, whose Options is not a subclass of "
                              "parpkit.PluginOptions (which refuses unknown keys, booleans as numbers, inf and nan)")
        needs = getattr(cls, "needs", None)
        if self.base is Criterion and needs not in (None, "gradients", "activations"):
            raise PluginError(f"{provider} registered {cls.__qualname__} with needs = {needs!r}; expected None, "
                              "'gradients' or 'activations'")
        if name in self._entries:
            other = self._entries[name]
            raise PluginError(f"two plugins register a {self.kind} named {name!r}: {other.provider} "
                              f"({other.cls.__qualname__}) and {provider} ({cls.__qualname__}); "
                              "uninstall one or rename it")
        return name

    def add(self, cls: Any, provider: str) -> None:
        self._entries[self.check(cls, provider)] = Entry(getattr(cls, "name"), cls, provider)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            missing = (f" (not loaded: {'; '.join(f'{p}: {why}' for p, why in self.unavailable.items())})"
                       if self.unavailable else "")
            raise PluginError(f"unknown {self.kind} {name!r}; known: {known}{missing}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]


#: comma-separated entry-point or distribution names: only these installed plugins load (``parpkit`` is the
#: built-in ones); unset: all of them; empty: none (as simonw/llm's LLM_LOAD_PLUGINS)
LOAD_PLUGINS = "PARPKIT_LOAD_PLUGINS"

_warned: set[str] = set()


def _warn(message: str) -> None:
    """One line on stderr per problem and process (a sweep builds the registries more than once)."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def plugin_name(plugin: object) -> str:
    """How a plugin object passed to ``parpkit.run(plugins=…)`` is known: a module by its name, an object by its
    class (two modules were both "builtins.module")."""
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    if isinstance(plugin, type):
        return f"{plugin.__module__}.{plugin.__qualname__}"
    return f"{type(plugin).__module__}.{type(plugin).__qualname__}"


class Plugins:
    """The loaded plugin manager with one registry per interface.

    An installed plugin that cannot load (its module fails to import, its entry point names nothing, a hook is
    misspelled or raises, it registers something that is not a plugin class) is left out with one warning naming
    it and its distribution; the other plugins work. ``PARPKIT_LOAD_PLUGINS`` loads only the named ones. Plugin
    objects passed in ``extra`` are the caller's: their problems are errors."""

    def __init__(self, extra: Sequence[tuple[object, str]] = (), load_entrypoints: bool = True):
        pm = pluggy.PluginManager("parpkit")
        pm.add_hookspecs(hookspecs)
        self.pm = pm
        self.unavailable: dict[str, str] = {}  # installed plugin -> why it was left out
        self._order: list[object] = []  # plugins in the order they were registered, as their classes are added
        providers: dict[int, str] = {}
        if load_entrypoints:
            providers.update(self._load_entrypoints())
        names = set()
        for plugin, name in extra:
            if pm.is_registered(plugin):  # installed and passed again: one plugin
                continue
            while name in names or pm.has_plugin(name):
                name += "'"
            names.add(name)
            try:
                pm.register(plugin, name=name)
            except pluggy.PluginValidationError as exc:
                if pm.has_plugin(name):  # before pluggy 1.7 the refused plugin stays registered
                    pm.unregister(name=name)
                raise PluginError(f"plugin {name!r}: {_hook_arguments(exc)}") from None
            self._order.append(plugin)
            self._validate(plugin, name, installed=False)
        self.registries = {kind: Registry(kind, base, self.unavailable) for kind, (_, base) in KINDS.items()}
        for plugin in [p for p in self._order if pm.is_registered(p)]:
            name = pm.get_name(plugin) or repr(plugin)
            provider = providers.get(id(plugin), name)
            try:
                self._register_classes(plugin, provider)
            except Exception as exc:  # noqa: BLE001  (a plugin's hook may raise anything)
                if name in names:
                    raise exc if isinstance(exc, PluginError) else PluginError(f"plugin {name}: {_why(exc)}") from None
                self._leave_out(name, provider, _why(exc))

    def _load_entrypoints(self) -> dict[int, str]:
        """The installed plugins (entry-point group ``parpkit``), each loaded on its own."""
        wanted = os.environ.get(LOAD_PLUGINS)
        chosen = None if wanted is None else {w.strip() for w in wanted.split(",") if w.strip()}
        providers, found = {}, set()
        for dist in list(importlib.metadata.distributions()):
            project = dist.metadata["Name"] or "?"
            for ep in dist.entry_points:
                if ep.group != "parpkit":
                    continue
                if chosen is not None and not {ep.name, project} & chosen:
                    continue
                found |= {ep.name, project}
                provider = f"{project} {dist.version}"
                try:
                    plugin = ep.load()
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # noqa: BLE001  (ImportError, SyntaxError, SystemExit: whatever its import raises)
                    self.unavailable[ep.name] = f"{_why(exc)} (entry point {ep.value} of {provider})"
                    _warn(f"the parpkit plugin {ep.name!r} ({provider}) cannot be loaded, left out: {self.unavailable[ep.name]}. "
                          f"Fix or uninstall it; {LOAD_PLUGINS} names the plugins to load")
                    continue
                if self.pm.is_registered(plugin):  # two entry points of one module (or one listed twice): one plugin
                    continue
                # entry-point names are one namespace over every distribution: another package's plugin of the same
                # name is a plugin too, known by its distribution as well
                name = ep.name if not self.pm.has_plugin(ep.name) else f"{ep.name} ({project})"
                while self.pm.has_plugin(name):
                    name += "'"
                try:
                    self.pm.register(plugin, name=name)
                except pluggy.PluginValidationError as exc:  # a hook whose arguments parpkit's hook does not give
                    self._leave_out(name, provider, f"{_hook_arguments(exc)}; entry point {ep.value} of {provider}")
                    continue
                self._order.append(plugin)
                providers[id(plugin)] = provider
                if not self._validate(plugin, name, installed=True, provider=provider):
                    providers.pop(id(plugin))
        for name in sorted((chosen or set()) - found):
            _warn(f"{LOAD_PLUGINS} names {name!r}, but no installed parpkit plugin (entry point or distribution) has that name")
        return providers

    def _validate(self, plugin: object, name: str, *, installed: bool, provider: str = "") -> bool:
        """Every hook implementation of ``plugin`` matches a hook parpkit defines (a misspelled one is not silence)."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            known = ", ".join(hook for hook, _ in KINDS.values())
            why = f"implements a hook parpkit does not define: {exc}; parpkit's hooks are {known} (see parpkit.hookspecs)"
            if not installed:
                self.pm.unregister(plugin)
                raise PluginError(f"plugin {name!r} {why}") from None
            self._leave_out(name, f"{provider}, entry point {name!r}", why)
            return False
        return True

    def _register_classes(self, plugin: object, provider: str) -> None:
        """Call ``plugin``'s hooks; its classes are added only when every one of them registers cleanly."""
        added: list[tuple[Registry, type]] = []
        for kind, (hook_name, _) in KINDS.items():
            registry = self.registries[kind]
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=lambda cls, _r=registry: (_r.check(cls, provider), added.append((_r, cls))))
        pending: dict[int, set[str]] = {}
        for registry, cls in added:  # two classes of one name in one plugin
            if getattr(cls, "name", "") in pending.setdefault(id(registry), set()):
                raise PluginError(f"{provider} registers two {registry.kind}s named {cls.name!r}")
            pending[id(registry)].add(cls.name)
        for registry, cls in added:
            registry.add(cls, provider)

    def _leave_out(self, name: str, provider: str, why: str) -> None:
        """Unregister ``name`` (and, before pluggy 1.7, the hooks a registration it refused half way had added, for
        which every later plugin would be blamed), record why, and warn once."""
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self.unavailable[name] = why
        _warn(f"the parpkit plugin {name!r} ({provider}) is left out: {why}. Fix or uninstall it; {LOAD_PLUGINS} names the "
              "plugins to load")

    def __getitem__(self, kind: str) -> Registry:
        return self.registries[kind]


def _hook_arguments(exc: pluggy.PluginValidationError) -> str:
    """pluggy's refusal of a hook's arguments, on one line."""
    return f"{' '.join(str(exc).split())} (parpkit's hooks take one argument, `register`)"


def _why(exc: BaseException) -> str:
    """An exception in one line: its type and first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
