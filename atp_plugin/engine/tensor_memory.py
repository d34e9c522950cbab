"""Peak memory of tensors, counted as torch allocates and frees them: what ``estimate()`` measures
its probe runs with, the same on every device (no allocator statistics needed)."""

from __future__ import annotations

import weakref
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorBytes(TorchDispatchMode):
    """Inside ``with PeakTensorBytes() as m``: ``m.peak``, the most bytes of tensor storage alive
    at once among the storages created inside the block (tensors made before it, such as the
    weights, are not counted), and ``m.live``, those alive now. A storage counts from the op that
    creates it until it is freed, also when autograd holds it for the backward pass. With
    ``trace=True``, ``m.trace`` lists the bytes alive after each op, in order."""

    def __init__(self, trace: bool = False) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.trace: list[int] | None = [] if trace else None
        self._refs: dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int, _: object) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in inputs:  # a view of an input, or the input changed in place: no new memory
                continue
            key = id(storage)
            ref = self._refs.get(key)
            if ref is not None and ref() is storage:
                continue
            nbytes = storage.nbytes()
            self.live += nbytes
            self._refs[key] = weakref.ref(storage, partial(self._freed, key, nbytes))
            self.peak = max(self.peak, self.live)
        if self.trace is not None:
            self.trace.append(self.live)
        return out
