"""Built-in metrics: one scalar per pair from the logits, called as ``metric(logits, indices)``
with ``indices`` the pair indices of the current batch (``[batch]`` LongTensor). Each carries
``n_pairs``, ``token_ids`` and ``position`` so that ``attribute()`` can check them against the
prompts and the model before running anything (``check_metric``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol, Sequence, cast

import torch

from .errors import MetricError
from .tokens import check_known

if TYPE_CHECKING:
    from .engine.pairs import PairSource


class PairMetric(Protocol):
    """A built-in metric: ``metric(logits, indices)`` -> ``[batch]``, with what ``check_metric`` reads."""

    n_pairs: int
    token_ids: torch.Tensor
    position: int

    def __call__(self, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor: ...


def _described(metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n_pairs: int,
               token_ids: torch.Tensor, position: int) -> PairMetric:
    """``metric`` with ``n_pairs``, ``token_ids`` and ``position`` set on it."""
    out = cast(PairMetric, metric)
    out.n_pairs, out.token_ids, out.position = n_pairs, token_ids, position
    return out


def _ids(ids: Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) and any(isinstance(i, str) for i in ids):
        raise TypeError(f"{what} holds strings; the metric takes token ids: "
                        f"metrics.token_ids(model, {list(ids)[:2]!r})")
    t = torch.as_tensor(ids)
    if t.ndim != 1 or t.dtype not in (torch.int64, torch.int32):
        raise MetricError(f"{what} must be a 1-D sequence of token ids (one per pair), "
                         f"got {t.dtype} of shape {tuple(t.shape)}")
    if t.numel() and int(t.min()) < 0:
        bad = (t < 0).nonzero().flatten().tolist()
        raise MetricError(f"{what} holds negative token ids (pairs {bad[:10]}); token ids count from 0 "
                         "(get them with token_ids(model, [...]) or model.to_single_token)")
    return t.long()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _position(position: int) -> int:
    if not isinstance(position, int) or isinstance(position, bool):
        raise TypeError(f"position must be an int (a token position, -1 for the last), got {position!r}")
    return position


def check_metric(metric, pairs: PairSource, d_vocab: int) -> None:
    """Check what a built-in metric holds against the prompts and the model, before any run:
    one answer per pair (``metric.n_pairs``), token ids in ``[0, d_vocab)`` (``metric.token_ids``)
    and a ``metric.position`` that is a real token of every prompt. A metric without these
    attributes (a user's own function) is not checked here."""
    n_pairs, n_tokens = pairs.n, pairs.width
    _check_labels(metric, pairs, d_vocab)
    n_metric = getattr(metric, "n_pairs", None)
    if n_metric is not None and n_metric != n_pairs:
        raise MetricError(f"the metric holds answers for {_count(n_metric, 'pair')} but {_count(n_pairs, 'pair')} "
                         "were given; give one answer per pair")
    ids = getattr(metric, "token_ids", None)
    if ids is not None and ids.numel() and int(ids.max()) >= d_vocab:
        raise MetricError(f"the metric's answer ids include {int(ids.max())}, outside the model's vocabulary "
                         f"[0, {d_vocab}); take them from this model's tokenizer (token_ids(model, [...]))")
    position = getattr(metric, "position", None)
    if position is not None and not -n_tokens <= position < n_tokens:
        raise MetricError(f"the metric reads position {position} but the prompts have {n_tokens} tokens "
                         f"(valid positions: {-n_tokens} to {n_tokens - 1}; -1 is every prompt's last token)")
    shortest = int((pairs.counts == n_pairs).sum())  # prompts are right-aligned
    if position is not None and position % n_tokens < n_tokens - shortest:
        raise MetricError(f"the metric reads position {position}, which is left padding in the prompts shorter than "
                         f"{n_tokens} tokens (the shortest has {shortest}); prompts are aligned on their last token, "
                         f"so give a position from the end, -1 to {-shortest}")


def _check_labels(metric, pairs: PairSource, d_vocab: int) -> None:
    """A metric that reads labels (``metric.label_shape``) gets pairs with labels of that shape and
    token ids in the vocabulary; one that indexes answers by pair number gets no labels."""
    wants, has = getattr(metric, "label_shape", None), pairs.label_shape
    if wants is not None and has is None:
        raise MetricError(f"the metric reads each pair's label of shape {wants} (e.g. [answer id, wrong id]), and the "
                          "pairs have none: give a PairStream of (clean, corrupt, label) items, or for lists use "
                          "metrics.logit_diff(answer, wrong)")
    if wants is not None and wants != has:
        raise MetricError(f"the metric reads labels of shape {wants} but the pairs' labels have shape {has}")
    if wants is not None and pairs.label_range is not None and not 0 <= pairs.label_range[0] <= \
            pairs.label_range[1] < d_vocab:
        raise MetricError(f"the pairs' labels hold token ids from {pairs.label_range[0]:g} to "
                          f"{pairs.label_range[1]:g}, outside the model's vocabulary [0, {d_vocab})")
    if getattr(metric, "n_pairs", None) is not None and has is not None:
        raise MetricError("the metric looks answers up by pair number, but a labelled PairStream gives the metric each "
                          "row's label instead: use metrics.logit_diff_labels() (labels [answer id, wrong id])")


def token_ids(model, tokens: Sequence[str], *, what: str = "the answer token") -> torch.Tensor:
    """Token ids of single-token strings such as ``" Mary"`` (a clear error otherwise, also for a
    word the tokenizer does not know, which would silently become its unknown token); ``what``
    names the strings in the error."""
    if isinstance(tokens, str):
        raise TypeError(f"token_ids takes a list of strings, got the string {tokens!r} (it would be read character "
                        f"by character): token_ids(model, [{tokens!r}])")
    ids = []
    for text in tokens:
        tokenized = model.to_tokens(text, prepend_bos=False)[0].tolist()
        check_known(model.tokenizer, text, tokenized, what)
        if len(tokenized) != 1:
            raise MetricError(f"{what} {text!r} is {len(tokenized)} tokens; it must be exactly one token "
                             "(e.g. with a leading space, ' Mary')")
        ids += tokenized
    return torch.tensor(ids, dtype=torch.long)


def logit_diff(answer: Sequence[int] | torch.Tensor, wrong: Sequence[int] | torch.Tensor, *,
               position: int = -1) -> PairMetric:
    """logit(answer) - logit(wrong) at ``position``, with per-pair token ids."""
    answer, wrong, position = _ids(answer, "answer"), _ids(wrong, "wrong"), _position(position)
    if answer.shape != wrong.shape:
        raise MetricError(f"answer has {len(answer)} ids but wrong has {len(wrong)}; give one of each per pair")

    def metric(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.to(answer.device)
        return _logit_diff_at(logits, position, answer[idx], wrong[idx])

    return _described(metric, len(answer), torch.cat([answer, wrong]), position)


def _logit_diff_at(logits: torch.Tensor, position: int, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """logit(answer) - logit(wrong) at ``position`` per row, with the rows' token ids ``[batch]``."""
    at = logits[:, position]  # [batch, vocab]
    rows = torch.arange(at.shape[0], device=at.device)
    return at[rows, answer.to(at.device)] - at[rows, wrong.to(at.device)]


def logit_diff_labels(*, position: int = -1) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """logit(answer) - logit(wrong) at ``position`` for a labelled ``PairStream`` whose labels are
    ``[answer_id, wrong_id]``: called as ``metric(logits, labels)`` with ``labels`` ``[batch, 2]``."""
    position = _position(position)

    def metric(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.ndim != 2 or labels.shape[1] != 2 or labels.dtype.is_floating_point:
            raise MetricError(f"logit_diff_labels() reads labels [answer_id, wrong_id] per pair, got labels of dtype "
                              f"{labels.dtype} and shape {tuple(labels.shape)}; label each pair with two token ids")
        if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]:
            raise MetricError(f"the labels hold token ids outside the model's vocabulary [0, {logits.shape[-1]})")
        return _logit_diff_at(logits, position, labels[:, 0].long(), labels[:, 1].long())

    metric.position = position  # type: ignore[attr-defined]  # checked against the prompts by check_metric
    metric.label_shape = (2,)  # type: ignore[attr-defined]
    return metric


def log_prob(answer: Sequence[int] | torch.Tensor, *, position: int = -1) -> PairMetric:
    """log P(answer) at ``position``, with per-pair token ids."""
    answer, position = _ids(answer, "answer"), _position(position)

    def metric(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits[:, position], dim=-1)  # [batch, vocab]
        rows = torch.arange(logp.shape[0], device=logp.device)
        return logp[rows, answer[indices.to(answer.device)].to(logp.device)]

    return _described(metric, len(answer), answer, position)
