"""Attribution backends: each turns what the engine computes into scores and signed values.

A backend has a ``name`` (the ``method=`` users pass) and
``run(engine) -> (scores, signed)``, both dicts of result key -> tensor. Built-ins register through
``atp_register_backends`` like any plugin.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Backend(Protocol):
    name: str

    def run(self, engine) -> tuple[dict[str, torch.Tensor], ...]: ...  # scores, signed[, std_error]
