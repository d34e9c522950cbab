"""The plugin contract: the hooks through which backends, edge methods, node adapters and hosts register.

Built-ins register through these same hooks; third-party packages declare an entry point in
the group ``atp_plugin`` pointing at a module that implements some of them with ``@hookimpl``.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("atp_plugin")
hookimpl = pluggy.HookimplMarker("atp_plugin")


@hookspec
def atp_register_backends(register: Callable[[Any], None]) -> None:
    """Register attribution backends: call ``register(backend)`` for each.

    A backend has a ``name`` (what users pass as ``method=``) and
    ``run(engine) -> (scores, signed)`` (see ``atp_plugin.backends``).
    """


@hookspec
def atp_register_adapters(register: Callable[[Any], None]) -> None:
    """Register node adapters: call ``register(adapter)`` for each.

    An adapter follows the ``atp_plugin.NodeAdapter`` protocol; its ``name`` is what users pass
    in ``nodes=``.
    """


@hookspec
def atp_register_hosts(register: Callable[[Any], None]) -> None:
    """Register model hosts: call ``register(host_class)`` for each.

    A host class has a ``name``, ``accepts(model) -> bool`` and wraps a model for the engine
    (see ``atp_plugin.hosts.Host``).
    """


@hookspec
def atp_register_edge_methods(register: Callable[[Any], None]) -> None:
    """Register edge attribution methods: call ``register(method)`` for each.

    An edge method has a ``name`` (what users pass as ``attribute_edges(method=...)``), a one-line
    ``description`` and ``run(ctx, per_position) -> (scores, signed)`` (see ``atp_plugin.edges.methods``).
    """
