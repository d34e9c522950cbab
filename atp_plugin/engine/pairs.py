"""Prompt pairs as token tensors: validated, left-padded so position -1 is every last token."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import AtpError
from ..hosts import Host


@dataclass
class Pairs:
    """N token-aligned prompt pairs.

    ``clean``/``corrupt``: ``[N, T]`` token ids; ``mask``: ``[N, T]`` bool, False at left padding.
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    mask: torch.Tensor

    @property
    def n(self) -> int:
        return self.clean.shape[0]

    @property
    def padded(self) -> bool:
        return not bool(self.mask.all())

    @property
    def alignment(self) -> str:
        return ("left-padded: position -1 is every prompt's last token; pad positions have no nodes"
                if self.padded else "unpadded: every prompt has the same length")


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
        try:
            ta, tb = host.tokenize(a), host.tokenize(b)
        except ValueError as e:  # e.g. a word the tokenizer does not know: say which pair
            raise AtpError(f"pair {i}: {e}") from e
        for what, text, toks in (("clean", a, ta), ("corrupt", b, tb)):
            if len(toks) <= base:
                raise AtpError(f"pair {i}: the {what} prompt {text!r} has no tokens (besides BOS); give every "
                                 "pair a non-empty prompt or drop the pair")
        if len(ta) != len(tb):
            raise AtpError(
                f"pair {i} is not token-aligned: clean {a!r} has {len(ta)} tokens, corrupt {b!r} has {len(tb)}; "
                "AtP needs the same length within a pair (change the corrupt prompt so its tokens line up)")
        rows_c.append(ta)
        rows_n.append(tb)
    width = max(len(r) for r in rows_c)
    pad = host.pad_id()

    def padded(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)

    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows_c])
    return _warn_identical(Pairs(padded(rows_c).to(host.device), padded(rows_n).to(host.device), mask.to(host.device)))


def _warn_identical(pairs: Pairs) -> Pairs:
    """``pairs``, with a warning naming the pairs whose corrupt prompt equals the clean one: every
    effect there is 0, so they only pull the means towards 0 (all of them: every score is 0)."""
    same = (pairs.clean == pairs.corrupt).all(1).nonzero().flatten().tolist()
    if len(same) == pairs.n:
        warnings.warn("every pair's corrupt prompt equals its clean prompt: patching changes nothing and every "
                      "score will be 0; corrupt the prompts (e.g. swap the names)", stacklevel=3)
    elif same:
        warnings.warn(f"pair(s) {same[:10]} have a corrupt prompt equal to the clean one: every effect there is 0, "
                      "which pulls the means over pairs towards 0; drop or corrupt them", stacklevel=3)
    return pairs
