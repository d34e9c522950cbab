"""Prompt pairs as token tensors: validated, left-padded so position -1 is every last token."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..errors import AtpError
from ..hosts import Host


@dataclass(frozen=True)
class Batch:
    """A batch of pairs as the engine runs them: ``clean``/``corrupt`` ``[batch, T]`` token ids,
    ``mask`` ``[batch, T]`` (False at left padding), ``idx`` ``[batch]`` the pairs' numbers and
    ``labels`` (a labelled stream's per-pair data ``[batch, ...]``, else None)."""

    idx: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor | None = None

    def rows(self, rows: torch.Tensor) -> Batch:
        """The batch of rows ``rows`` (local numbers, repeats allowed: patched copies of a pair)."""
        rows = rows.to(self.clean.device)
        return Batch(self.idx[rows], self.clean[rows], self.corrupt[rows], self.mask[rows],
                     None if self.labels is None else self.labels[rows.to(self.labels.device)])

    @property
    def key(self) -> torch.Tensor:
        """What the metric gets as its second argument for these rows: their labels on a labelled
        stream, else their pair numbers."""
        return self.idx if self.labels is None else self.labels


class PairSource:
    """Where the engine reads pairs from, a batch at a time: ``Pairs`` in memory or a stream.
    ``n`` pairs, every batch left-padded to ``width`` tokens; ``mask`` ``[n, width]`` (False at
    left padding) and ``counts`` ``[width]`` the number of pairs in which each position is real."""

    @property
    def n(self) -> int:
        raise NotImplementedError

    @property
    def width(self) -> int:
        raise NotImplementedError

    @property
    def mask(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def counts(self) -> torch.Tensor:
        return self.mask.sum(0)

    def batches(self, batch_size: int, numbers: Sequence[int] | None = None) -> Iterator[Batch]:
        """The pairs in order, ``batch_size`` at a time; only the batches ``numbers`` where given
        (a rank's share of them)."""
        raise NotImplementedError

    def n_batches(self, batch_size: int) -> int:
        return -(-self.n // batch_size)

    #: shape of each pair's label (None: unlabelled), and the smallest and largest label value
    label_shape: tuple[int, ...] | None = None
    label_range: tuple[float, float] | None = None

    def masks(self, batch_size: int, numbers: Sequence[int]) -> Iterator[torch.Tensor]:
        """The ``mask`` of each of the batches ``numbers``, without reading the pairs."""
        for b in numbers:
            yield self.mask[b * batch_size:(b + 1) * batch_size]

    def select(self, indices: torch.Tensor) -> Pairs:
        """The pairs ``indices`` (in that order) in memory, padded to ``width``."""
        raise NotImplementedError

    @property
    def padded(self) -> bool:
        return bool((self.counts < self.n).any())

    @property
    def alignment(self) -> str:
        return ("left-padded: position -1 is every prompt's last token; pad positions have no nodes"
                if self.padded else "unpadded: every prompt has the same length")


class Pairs(PairSource):
    """N token-aligned prompt pairs, held in memory.

    ``clean``/``corrupt``: ``[N, T]`` token ids; ``mask``: ``[N, T]`` bool, False at left padding;
    ``labels``: per-pair data for the metric ``[N, ...]`` (pairs selected from a labelled stream).
    """

    def __init__(self, clean: torch.Tensor, corrupt: torch.Tensor, mask: torch.Tensor,
                 labels: torch.Tensor | None = None):
        self.clean, self.corrupt, self._mask, self.labels = clean, corrupt, mask, labels
        self._all = Batch(torch.arange(len(clean), device=clean.device), clean, corrupt, mask, labels)
        if labels is not None:
            self.label_shape = tuple(labels.shape[1:])
            self.label_range = (float(labels.min()), float(labels.max())) if labels.numel() else None

    @property
    def n(self) -> int:
        return self.clean.shape[0]

    @property
    def width(self) -> int:
        return self.clean.shape[1]

    @property
    def mask(self) -> torch.Tensor:
        return self._mask

    def batches(self, batch_size: int, numbers: Sequence[int] | None = None) -> Iterator[Batch]:
        idx = self._all.idx.split(batch_size)
        for b in (range(len(idx)) if numbers is None else numbers):
            yield self._all.rows(idx[b])

    def select(self, indices: torch.Tensor) -> Pairs:
        rows = self._all.rows(indices)
        return Pairs(rows.clean, rows.corrupt, rows.mask, rows.labels)


def _as_tokens(x: torch.Tensor, what: str, d_vocab: int) -> torch.Tensor:
    if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{what} must hold integer token ids, got dtype {x.dtype}")
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise AtpError(f"{what} must be token ids of shape [N, T], got shape {tuple(x.shape)}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= d_vocab):
        raise AtpError(f"{what} holds token ids outside the model's vocabulary [0, {d_vocab})")
    return x.long()


def make_pairs(host: Host, clean: torch.Tensor | Sequence[str], corrupt: torch.Tensor | Sequence[str]) -> Pairs:
    """Validate and tokenize ``clean``/``corrupt`` (token tensors or lists of strings)."""
    if isinstance(clean, str) or isinstance(corrupt, str):
        raise TypeError("clean and corrupt must be lists of strings (one per pair), not a single string")
    if len(clean) == 0:
        raise AtpError("no prompt pairs given: clean is empty")
    if len(clean) != len(corrupt):
        raise AtpError(f"clean has {len(clean)} prompts but corrupt has {len(corrupt)}; "
                         "give one corrupt prompt per clean prompt")
    if isinstance(clean, torch.Tensor) != isinstance(corrupt, torch.Tensor):
        raise TypeError("clean and corrupt must both be token tensors or both be lists of strings")
    if isinstance(clean, torch.Tensor) and isinstance(corrupt, torch.Tensor):  # both or neither, checked above
        c = _as_tokens(clean, "clean", host.d_vocab)
        n = _as_tokens(corrupt, "corrupt", host.d_vocab)
        if c.shape != n.shape:
            raise AtpError(f"clean tokens have shape {tuple(c.shape)} but corrupt tokens {tuple(n.shape)}; "
                             "each pair must be token-aligned (same length)")
        if c.shape[1] == 0:
            raise AtpError("the prompts are empty (zero tokens)")
        mask = torch.ones_like(c, dtype=torch.bool)
        return _warn_identical(Pairs(c.to(host.device), n.to(host.device), mask.to(host.device)))
    rows_c, rows_n = [], []
    base = len(host.tokenize(""))  # what tokenizing adds to any prompt (a BOS token, or nothing)
    for i, (a, b) in enumerate(zip(clean, corrupt)):
        ta, tb = tokenize_pair(host, a, b, base, f"pair {i}")
        rows_c.append(ta)
        rows_n.append(tb)
    return _warn_identical(left_padded(host, rows_c, rows_n, max(len(r) for r in rows_c)))


def tokenize_pair(host: Host, clean: str, corrupt: str, base: int, where: str) -> tuple[list[int], list[int]]:
    """The token ids of one pair of prompts, checked non-empty and token-aligned; ``base``: the
    number of tokens tokenizing adds to any prompt, ``where``: the pair's name in errors."""
    try:
        ta, tb = host.tokenize(clean), host.tokenize(corrupt)
    except ValueError as e:  # e.g. a word the tokenizer does not know: say which pair
        raise AtpError(f"{where}: {e}") from e
    for what, text, toks in (("clean", clean, ta), ("corrupt", corrupt, tb)):
        if len(toks) <= base:
            raise AtpError(f"{where}: the {what} prompt {text!r} has no tokens (besides BOS); give every "
                           "pair a non-empty prompt or drop the pair")
    if len(ta) != len(tb):
        raise AtpError(
            f"{where} is not token-aligned: clean {clean!r} has {len(ta)} tokens, corrupt {corrupt!r} has {len(tb)}; "
            "AtP needs the same length within a pair (change the corrupt prompt so its tokens line up)")
    return ta, tb


def left_padded(host: Host, rows_c: list[list[int]], rows_n: list[list[int]], width: int) -> Pairs:
    """Token-aligned rows left-padded to ``width`` tokens, on the model's device."""
    pad = host.pad_id()

    def padded(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)

    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows_c], dtype=torch.bool)
    return Pairs(padded(rows_c).to(host.device), padded(rows_n).to(host.device), mask.to(host.device))


def _warn_identical(pairs: Pairs) -> Pairs:
    """``pairs``, warned about where a corrupt prompt equals its clean one (``warn_identical``)."""
    same = (pairs.clean == pairs.corrupt).all(1).nonzero().flatten().tolist()
    warn_identical([f"pair {i}" for i in same[:10]], len(same), pairs.n)
    return pairs


def warn_identical(names: list[str], n_same: int, n: int) -> None:
    """Warn that ``n_same`` of the ``n`` pairs (the first of them ``names``) have a corrupt prompt
    equal to the clean one: every effect there is 0, so they only pull the means towards 0 (all of
    them: every score is 0)."""
    if n_same == n:
        warnings.warn("every pair's corrupt prompt equals its clean prompt: patching changes nothing and every "
                      "score will be 0; corrupt the prompts (e.g. swap the names)", stacklevel=4)
    elif n_same:
        more = f" and {n_same - len(names)} more" if n_same > len(names) else ""
        verb = "has" if n_same == 1 else "have"
        warnings.warn(f"{', '.join(names)}{more} {verb} a corrupt prompt equal to the clean one: every effect there "
                      "is 0, which pulls the means over pairs towards 0; drop or corrupt them", stacklevel=4)
