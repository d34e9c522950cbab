"""Several processes with ``torch.distributed``: pairs split across ranks, sums reduced.

Under ``torchrun --nproc_per_node N`` (or any initialized default process group) every rank
holds all the pairs, runs only its share of the batches, and the engine sums over pairs are
all-reduced, so every rank ends with the same result. Without a process group (or with one
rank) nothing changes. Tensors stay on the model's device: NCCL reduces CUDA tensors, gloo CPU
ones.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..errors import AtpError

T = TypeVar("T")


def join_from_env() -> None:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1), once:
    NCCL where CUDA is available, gloo otherwise. What ``atp`` does first; a script calls
    ``torch.distributed.init_process_group`` itself."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


_alone = False  # inside alone(): this process works by itself


@contextmanager
def alone() -> Iterator[None]:
    """Work in this process only, as if there were no process group (``estimate()``'s probes)."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def world() -> tuple[int, int]:
    """(rank, number of ranks) of the default process group; (0, 1) without one or ``alone()``."""
    if not _alone and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every ``size``-th one from its rank (round robin, so
    ranks get equal shares of batches of equal size)."""
    rank, size = world()
    return list(items[rank::size])


def batch_for_ranks(batch_size: int, n_pairs: int) -> int:
    """``batch_size``, lowered where needed so that every rank gets at least one batch; a clear
    error where there are fewer pairs than ranks."""
    size = world()[1]
    if n_pairs < size:
        raise AtpError(f"{n_pairs} pair(s) cannot be split across {size} ranks: give at least {size} pairs or "
                       f"run on at most {n_pairs} rank(s)")
    return min(batch_size, n_pairs // size)  # then there are at least as many batches as ranks


def all_min(value: int, device: torch.device) -> int:
    """The smallest of ``value`` over the ranks (what every rank then uses)."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks (in place; returned for convenience)."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
