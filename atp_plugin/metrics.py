"""Built-in metrics: one scalar per pair from the logits, called as ``metric(logits, indices)``
with ``indices`` the pair indices of the current batch (``[batch]`` LongTensor)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def _ids(ids: Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(ids)
    if t.ndim != 1 or t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what} must be a 1-D sequence of token ids (one per pair), got {t.dtype} of shape {tuple(t.shape)}")
    return t.long()


def token_ids(model, tokens: Sequence[str]) -> torch.Tensor:
    """Token ids of single-token strings such as ``" Mary"`` (a clear error otherwise)."""
    return torch.tensor([model.to_single_token(t) for t in tokens], dtype=torch.long)


def logit_diff(answer: Sequence[int] | torch.Tensor, wrong: Sequence[int] | torch.Tensor, *,
               position: int = -1) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """logit(answer) - logit(wrong) at ``position``, with per-pair token ids."""
    answer, wrong = _ids(answer, "answer"), _ids(wrong, "wrong")
    if answer.shape != wrong.shape:
        raise ValueError(f"answer has {len(answer)} ids but wrong has {len(wrong)}; give one of each per pair")

    def metric(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        at = logits[:, position]  # [batch, vocab]
        rows = torch.arange(at.shape[0], device=at.device)
        idx = indices.to(answer.device)
        return at[rows, answer[idx].to(at.device)] - at[rows, wrong[idx].to(at.device)]

    metric.n_pairs = len(answer)
    return metric


def log_prob(answer: Sequence[int] | torch.Tensor, *, position: int = -1
             ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """log P(answer) at ``position``, with per-pair token ids."""
    answer = _ids(answer, "answer")

    def metric(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits[:, position], dim=-1)  # [batch, vocab]
        rows = torch.arange(logp.shape[0], device=logp.device)
        return logp[rows, answer[indices.to(answer.device)].to(logp.device)]

    metric.n_pairs = len(answer)
    return metric
