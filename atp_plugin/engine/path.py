"""The integrated-gradients path shared by node IG (``backends.ig``) and edge IG (``edges``):
clean + (k/m)(noise - clean) at the embedding, k = 1..m (the right-endpoint rule)."""

from __future__ import annotations

import dataclasses
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

DEFAULT_STEPS = 10


def check_steps(steps: object) -> int:
    """``steps`` if it is a positive int (the number of gradient points along the path), else a clear error."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"ig_steps must be a positive int (gradient points along the path), got {steps!r}")
    return steps


def path_points(steps: int) -> list[float]:
    """The interpolation weights k/m, k = 1..m, of the right-endpoint rule."""
    return [k / steps for k in range(1, steps + 1)]


def interpolate(noise: torch.Tensor, alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A patch setting a site to clean + alpha (noise - clean), the clean value being what flows there."""
    def patch(x: torch.Tensor) -> torch.Tensor:
        return x + alpha * (noise.to(x.dtype) - x)
    return patch


def with_steps(method: T, steps: int | None) -> T:
    """``method`` with ``steps`` gradient points where ``steps`` is given and ``method`` has a
    ``steps`` field (an IG method, a frozen dataclass); else ``method`` itself. Node and edge IG take
    their steps this one way (``ig_steps=``), checked before any run."""
    if steps is None:
        return method
    check_steps(steps)
    if dataclasses.is_dataclass(method) and any(f.name == "steps" for f in dataclasses.fields(method)):
        return dataclasses.replace(method, steps=steps)  # type: ignore[type-var]
    return method
