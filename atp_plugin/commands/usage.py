"""Checks of command-line arguments shared by the sub-commands, run before any model loads, and
the demo task that ``atp demo`` and ``atp evaluate`` both run on.

Every failure is a :class:`UsageError`: ``atp`` prints it in one line and exits with code 2.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .. import metrics


class UsageError(Exception):
    """A bad argument or input file: reported in one line, exit code 2."""


def check_output(option: str, path: str | Path | None) -> None:
    """An output file must be writable where it is named, checked before any work: not a directory,
    in an existing directory (none is created behind the user's back) where files can be created,
    and, if it exists, writable (it is overwritten)."""
    if not path:
        return
    target = Path(path)
    parent = target.resolve().parent
    if target.is_dir():
        raise UsageError(f"{option} {path}: is a directory; give a file name")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise UsageError(f"{option} {path}: the directory {parent} {what}; create it or write elsewhere")
    if target.exists():
        try:
            with target.open("r+b"):  # opened for writing without truncating or creating it
                pass
        except OSError as e:
            raise UsageError(f"{option} {path}: cannot write to it ({e.strerror or e})") from e
        return
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".atp-write-check-"):  # removed on close
            pass
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot create files in {parent} ({e.strerror or e})") from e


def check_registered(option: str, names: list[str], registered: dict[str, Any], what: str) -> None:
    """Every one of ``names`` (given with ``option``) is a registered backend or adapter; ``what``
    names the kind in the message ("method(s)", "node type(s)")."""
    known = ", ".join(sorted(registered))
    if not names:
        raise UsageError(f"{option} names no {what}; known: {known}")
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise UsageError(f"unknown {what} {unknown} in {option}; known: {known}")


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


def demo_task(n_pairs: int, seed: int) -> tuple[Any, Any, Callable[..., torch.Tensor]]:
    """The bundled IOI model, ``n_pairs`` held-out pairs (``IOIPairs``) and their metric,
    logit(answer) - logit(wrong) at the last token."""
    from ..demo_task import ioi_pairs, load_demo_model
    try:
        task = ioi_pairs(n_pairs, seed=seed, split="test")
    except ValueError as e:  # more pairs than the held-out split holds
        raise UsageError(f"--pairs {n_pairs}: {e}") from e
    try:
        model = load_demo_model()
    except FileNotFoundError as e:
        raise UsageError(f"the bundled demo model is missing ({e}); reinstall atp-plugin") from e
    metric = metrics.logit_diff(metrics.token_ids(model, task.answers), metrics.token_ids(model, task.wrongs))
    return model, task, metric
