"""The plugin manager: built-ins first, then the entry points of group ``atp_plugin``.

Set ``ATP_PLUGINS`` to a comma-separated list of entry-point names to load only those external
plugins (an empty value loads none); built-ins always load.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError

GROUP = "atp_plugin"
ENV_VAR = "ATP_PLUGINS"
BUILTINS = (
    "atp_plugin.adapters.builtin",
    "atp_plugin.backends.builtin",
    "atp_plugin.backends.baselines",
    "atp_plugin.backends.ig",
    "atp_plugin.hosts.hooked",
    "atp_plugin.hosts.bridge",
    "atp_plugin.edges.methods",
)
SKIP = f"fix or uninstall the plugin, or leave it out with {ENV_VAR}=<the plugins to load>"
KINDS = {"backends": "atp_register_backends", "edge_methods": "atp_register_edge_methods",
         "adapters": "atp_register_adapters", "hosts": "atp_register_hosts"}


@dataclass
class Registry:
    """Named objects of one kind, with the plugin that registered each."""

    kind: str
    items: dict[str, Any] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)

    def add(self, obj: Any, plugin: str) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.kind[:-1]} without a string `name`: {obj!r}")
        if name in self.items:
            raise PluginError(
                f"plugin {plugin!r} registers {self.kind[:-1]} {name!r}, "
                f"which plugin {self.owners[name]!r} already registered; rename one of them ({SKIP})"
            )
        self.items[name] = obj
        self.owners[name] = plugin


def _selected(names: list[str]) -> list[str]:
    """The installed entry-point ``names`` that ``ATP_PLUGINS`` lets load (a warning names any it
    lists that is not installed: a typo would otherwise load nothing, silently)."""
    wanted = os.environ.get(ENV_VAR)
    if wanted is None:
        return names
    allowed = {n.strip() for n in wanted.split(",") if n.strip()}
    absent = sorted(allowed - set(names))
    if absent:
        warnings.warn(f"{ENV_VAR} names plugin(s) {absent} that are not installed; installed entry points of group "
                      f"{GROUP!r}: {', '.join(names) or 'none'}", stacklevel=3)
    return [n for n in names if n in allowed]


def make_manager() -> pluggy.PluginManager:
    """A fresh plugin manager with the built-ins and the selected entry-point plugins loaded."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    for module in BUILTINS:
        pm.register(importlib.import_module(module), name=module)
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    for name in _selected(sorted(eps)):
        try:
            plugin = eps[name].load()
        except Exception as e:  # noqa: BLE001 - re-raised as what it is, naming the plugin
            raise PluginError(f"plugin {name!r} ({eps[name].value}) failed to import ({type(e).__name__}: {e}); "
                              f"{SKIP}") from e
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as e:
            raise PluginError(f"plugin {name!r} ({eps[name].value}) is invalid: {e}; {SKIP}") from e
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        known = ", ".join(KINDS.values())
        raise PluginError(
            f"plugin {pm.get_name(e.plugin)!r} implements a hook that no spec defines ({e}); known hooks: {known}; "
            f"{SKIP}"
        ) from e
    return pm


def collect(pm: pluggy.PluginManager) -> dict[str, Registry]:
    """Call every plugin's register hooks, one plugin at a time, so each name has an owner."""
    registries = {kind: Registry(kind) for kind in KINDS}
    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            impl.function(register=lambda obj, _p=impl.plugin_name, _r=registries[kind]: _r.add(obj, _p))
    return registries


_registries: dict[str, Registry] | None = None


def registries(reload: bool = False) -> dict[str, Registry]:
    """The loaded registries (cached; ``reload=True`` rereads entry points and ``ATP_PLUGINS``)."""
    global _registries
    if _registries is None or reload:
        _registries = None  # a failed reload leaves nothing stale behind: the next call tries again
        _registries = collect(make_manager())
    return _registries


def backends() -> dict[str, Any]:
    """Registered attribution backends by name."""
    return registries()["backends"].items


def edge_methods() -> dict[str, Any]:
    """Registered edge attribution methods by name."""
    return registries()["edge_methods"].items


def adapters() -> dict[str, Any]:
    """Registered node adapters by name."""
    return registries()["adapters"].items


def hosts() -> dict[str, Any]:
    """Registered model hosts by name."""
    return registries()["hosts"].items
