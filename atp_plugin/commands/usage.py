"""Checks of command-line arguments shared by the sub-commands, run before any model loads.

Every failure is a :class:`UsageError`: ``atp`` prints it in one line and exits with code 2.
"""

from __future__ import annotations

from pathlib import Path

import torch


class UsageError(Exception):
    """A bad argument or input file: reported in one line, exit code 2."""


def check_output(option: str, path: str | None) -> None:
    """An output file must go into an existing directory (no directory is created behind the user's back)."""
    if path and not Path(path).resolve().parent.is_dir():
        raise UsageError(f"{option} {path}: the directory {Path(path).resolve().parent} does not exist; create it "
                         "or write elsewhere")


def check_device(device: str) -> str:
    """``device`` if torch knows it and this machine has it."""
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device!r} is not a torch device; use e.g. cpu, cuda, cuda:1 or mps") from e
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
                             "use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    return device


def check_at_least(least: int, **values: int) -> None:
    """Each named option (``top_k=3`` for ``--top-k``) must be at least ``least``."""
    for name, value in values.items():
        if value < least:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
