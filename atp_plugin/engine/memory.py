"""How many patched prompts fit in one forward pass: a per-prompt estimate of a no-grad forward
pass's peak memory, and the byte budget the patched copies are sized against (``max_memory=``,
or by default a share of the memory free on the model's device)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ..hosts import Host

MAX_COPIES = 1024  # patched prompts per forward pass at most: more adds memory, not speed
CUDA_SHARE = 2  # the default budget on a GPU: 1/2 of its free memory
CPU_SHARE = 4  # on the CPU: 1/4 of MemAvailable (other processes and the unpatched runs need the rest)
FALLBACK_BUDGET = 2 * 2**30  # bytes, where the free memory cannot be read (no /proc/meminfo)


def forward_bytes(host: Host, n_tokens: int, held: int = 0) -> int:
    """Estimated peak bytes one prompt of ``n_tokens`` tokens adds to a no-grad forward pass:
    the logits ``[T, d_vocab]``, one layer's attention scores and pattern ``[2, n_heads, T, T]``,
    its MLP activations before and after the nonlinearity ``[2, T, d_mlp]`` and about eight
    vectors of the residual width per position (residual stream, normalized input, q, k, v, z,
    attention and MLP outputs), in the model's element size (layers run one after another, so
    only one layer's temporaries are alive at a time); plus ``held`` bytes the caller keeps per
    prompt (a patched copy's corrupt values and masks)."""
    t = n_tokens
    elements = t * host.d_vocab + 2 * host.n_heads * t * t + 2 * t * _width(host, "blocks.0.mlp.hook_post") \
        + 8 * t * _width(host, "blocks.0.hook_resid_pre")
    return elements * torch.empty((), dtype=host.dtype).element_size() + held


def _width(host: Host, hook: str) -> int:
    """The number of values per position at ``hook`` (0 where the model has no such hook, e.g.
    the MLP of an attention-only model, or its shape is unknown before a run)."""
    shape = host.act_shape(hook) if host.has_hook(hook) else None
    return math.prod(shape) if shape is not None else 0


def copies_per_pass(per_copy: int, budget: int) -> int:
    """Patched prompts per forward pass within ``budget`` bytes at ``per_copy`` bytes each: at
    least 1 (a single prompt always runs), at most ``MAX_COPIES``."""
    return max(1, min(MAX_COPIES, budget // max(per_copy, 1)))


def default_budget(device: torch.device) -> int:
    """Bytes the patched copies may use when ``max_memory`` is not given: half the free memory of
    a CUDA device, a quarter of the CPU's MemAvailable (``/proc/meminfo``), else 2 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // CUDA_SHARE
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // CPU_SHARE  # the file counts kB
    except (OSError, ValueError, IndexError):
        pass
    return FALLBACK_BUDGET


def check_max_memory(value: Any) -> int | None:
    """``max_memory`` as a whole number of bytes (None: the default budget); a clear error for
    anything that is not a positive finite number of bytes."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"max_memory must be a number of bytes (e.g. 8e9 for 8 GB), got {value!r} "
                        f"({type(value).__name__})")
    budget = float(value)
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"max_memory must be a positive number of bytes (e.g. 8e9 for 8 GB), got {value}")
    return int(budget)
