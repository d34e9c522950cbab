"""The errors atp-plugin raises on purpose, one base class to catch them all.

Every condition raises the same type on every host: a model variant the engine cannot compute
exactly is an ``UnsupportedModelError`` on a ``HookedTransformer`` and on a ``TransformerBridge``
alike. Anything else that escapes the library is a bug, not a usage error.
"""

from __future__ import annotations


class AtpError(ValueError):
    """Base class: the input or the model cannot be used as given; the message says how to fix it."""


class UnsupportedModelError(AtpError):
    """The model (or one of its hooks) uses a variant the engine cannot handle exactly."""


class MetricError(AtpError):
    """The metric cannot be used: wrong shape, no gradient, non-finite values, or nothing to attribute."""


class PluginError(AtpError):
    """A plugin could not be loaded or registered something invalid."""


class MissingDependencyError(AtpError, ImportError):
    """A feature needs a package that is not installed (the message names what to install)."""
