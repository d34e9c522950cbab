"""Streams of prompt pairs: read, tokenized and run a batch at a time, so memory stays flat in
the number of pairs (a JSONL file of 100k pairs, a generator over a dataset).

A stream is read more than once: a first pass tokenizes every pair only to learn the count,
the longest pair (every batch is left-padded to it, so that scores of all batches share one
position grid, position -1 being every last token) and how many pairs reach each position;
then each method reads it again per pass over the pairs (and ``verify`` again). So the source
must be re-iterable: a list, a ``PairStream.jsonl`` file, or a function returning a fresh
iterator each time it is called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..errors import AtpError
from ..hosts import Host
from .pairs import Batch, Pairs, PairSource, left_padded, tokenize_pair, warn_identical

#: one item of a stream: ``(clean, corrupt)``, ``(clean, corrupt, label)`` or a dict with the keys
#: ``clean``, ``corrupt`` and optionally ``label``; prompts as strings or 1-D token ids.
Item = Any
HEAD = 16  # pairs kept from the first pass, for per-pair views (the report's prompts)


class PairStream:
    """Prompt pairs read lazily, for ``attribute(model, PairStream(...), metric=...)``.

    ``source``: a re-iterable of items (each time it is iterated it starts again from the first
    pair) or a function returning a new iterator of items. Items are ``(clean, corrupt)`` or
    ``(clean, corrupt, label)`` tuples, or dicts with those keys; prompts are strings or token ids.
    ``label`` is per-pair data for the metric (e.g. ``[answer_id, wrong_id]``); on a labelled
    stream the metric is called as ``metric(logits, labels)`` with the rows' labels ``[batch, ...]``
    in place of pair numbers (``metrics.logit_diff_labels()`` reads ``[answer, wrong]`` labels).
    """

    def __init__(self, source: Iterable[Item] | Callable[[], Iterator[Item]], *, name: str = "pair"):
        if callable(source) and not hasattr(source, "__iter__"):
            self._open: Callable[[], Iterator[tuple[str, Item]]] = lambda: (
                (f"{name} {i}", item) for i, item in enumerate(source()))
        elif isinstance(source, Iterator):
            raise TypeError("a PairStream is read more than once (its length and longest pair first, then once per "
                            "pass over the pairs), and a generator or iterator can be read only once: pass the "
                            "function that creates it, PairStream(lambda: my_pairs()), or a list")
        elif isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
            self._open = lambda: ((f"{name} {i}", item) for i, item in enumerate(source))
        else:
            raise TypeError(f"PairStream takes a re-iterable of pairs or a function returning an iterator of pairs, "
                            f"got {type(source).__name__}")

    @classmethod
    def jsonl(cls, path: str | Path) -> PairStream:
        """The pairs of a JSONL file (one JSON object per line with ``clean``, ``corrupt`` and
        optionally ``label``), read a line at a time; errors name the line."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no pairs file {path}")
        return cls.named(lambda: _jsonl_items(path))

    @classmethod
    def named(cls, source: Callable[[], Iterator[tuple[str, Item]]]) -> PairStream:
        """A stream of ``(where, item)`` from ``source()``, ``where`` naming the item in errors
        (e.g. ``"pairs.jsonl line 3"``)."""
        stream = cls([])
        stream._open = source
        return stream

    def items(self) -> Iterator[tuple[str, Item]]:
        """(where, item) for every pair, from the first; ``where`` names the pair in errors."""
        return self._open()


def _jsonl_items(path: Path) -> Iterator[tuple[str, Item]]:
    with path.open(encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first line
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise AtpError(f"{path} line {n} is not JSON ({e.msg}); write one JSON object per line") from e
            yield f"{path} line {n}", record


class BoundStream(PairSource):
    """A ``PairStream`` tokenized for one model: ``n``, ``width`` and ``counts`` from a first,
    tokenize-only pass, then ``batches`` of pairs left-padded to ``width``."""

    def __init__(self, host: Host, stream: PairStream):
        self.host, self.stream = host, stream
        self._base = len(host.tokenize(""))  # what tokenizing adds to any prompt (a BOS token, or nothing)
        lengths: list[int] = []
        identical: list[str] = []  # the first few names
        n_identical = 0
        low, high = float("inf"), float("-inf")
        self._head: list[tuple[list[int], list[int], torch.Tensor | None]] = []  # the first pairs, for select()
        for n, (where, (clean, corrupt, label)) in enumerate(self._pairs()):
            if n < HEAD:
                self._head.append((clean, corrupt, label))
            lengths.append(len(clean))
            if clean == corrupt:
                n_identical += 1
                if len(identical) < 10:
                    identical.append(where)
            shape = None if label is None else tuple(label.shape)
            if label is not None and label.numel():
                low, high = min(low, float(label.min())), max(high, float(label.max()))
            if n == 0:
                self.label_shape = shape
            elif shape != self.label_shape:
                first = "none" if self.label_shape is None else f"one of shape {self.label_shape}"
                raise AtpError(f"{where} has {'no label' if shape is None else f'a label of shape {shape}'} but the "
                               f"first pair {first}; give every pair a label of the same shape, or none")
        if not lengths:
            raise AtpError("no prompt pairs given: the stream is empty")
        self.lengths = torch.tensor(lengths)  # [n]: N ints are all a stream keeps per pair
        self.label_range = (low, high) if high >= low else None
        self._width = max(lengths)
        warn_identical(identical, n_identical, self.n)

    @property
    def n(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self._width

    @property
    def mask(self) -> torch.Tensor:
        return self._mask_of(self.lengths)  # [n, width]

    def _mask_of(self, lengths: torch.Tensor) -> torch.Tensor:
        """``[len(lengths), width]``: the real positions of pairs of these lengths, left-padded."""
        return (torch.arange(self.width) >= self.width - lengths[:, None]).to(self.host.device)

    def _in_memory(self, rows: list[tuple[list[int], list[int], torch.Tensor | None]]) -> Pairs:
        """Checked pairs (clean ids, corrupt ids, label or None) left-padded to ``width``, labels stacked."""
        padded = left_padded(self.host, [r[0] for r in rows], [r[1] for r in rows], self.width)
        if self.label_shape is None:
            return padded
        labels = torch.stack([r[2] for r in rows if r[2] is not None]).to(self.host.device)
        return Pairs(padded.clean, padded.corrupt, padded.mask, labels)

    def select(self, indices: torch.Tensor) -> Pairs:
        """As ``PairSource.select``: the first ``HEAD`` pairs are kept from the first pass (the
        report's prompts), others are found by one more pass keeping only them."""
        wanted = [int(i) for i in indices]
        if not wanted or min(wanted) < 0 or max(wanted) >= self.n:
            raise IndexError(f"select() takes pair numbers in [0, {self.n}), got {wanted[:10]}")
        found = {i: self._head[i] for i in wanted if i < len(self._head)}
        missing = set(wanted) - set(found)
        if missing:
            found.update((n, pair) for n, (_, pair) in enumerate(self._pairs()) if n in missing)
        return self._in_memory([found[i] for i in wanted])

    def masks(self, batch_size: int, numbers: Sequence[int]) -> Iterator[torch.Tensor]:
        for b in numbers:  # from the lengths: the stream is not read
            yield self._mask_of(self.lengths[b * batch_size:(b + 1) * batch_size])  # [batch, width]

    @property
    def counts(self) -> torch.Tensor:
        per_length = torch.bincount(self.lengths, minlength=self.width + 1)  # [width + 1]
        # position p is real in the pairs of at least width - p tokens
        return per_length.flip(0).cumsum(0)[:-1].to(self.host.device)  # [width]

    def _pairs(self) -> Iterator[tuple[str, tuple[list[int], list[int], torch.Tensor | None]]]:
        """(where, (clean ids, corrupt ids, label or None)) for every pair, checked."""
        for where, item in self.stream.items():
            clean, corrupt, label = _fields(where, item)
            if isinstance(clean, str) and isinstance(corrupt, str):
                ids = tokenize_pair(self.host, clean, corrupt, self._base, where)
            else:
                ids = (_token_ids(clean, where, "clean", self.host.d_vocab),
                       _token_ids(corrupt, where, "corrupt", self.host.d_vocab))
                if len(ids[0]) != len(ids[1]) or not ids[0]:
                    raise AtpError(f"{where}: clean has {len(ids[0])} tokens and corrupt {len(ids[1])}; a pair must "
                                   "be token-aligned and not empty")
            yield where, (ids[0], ids[1], None if label is None else torch.as_tensor(label))

    def batches(self, batch_size: int, numbers: Sequence[int] | None = None) -> Iterator[Batch]:
        """As ``PairSource.batches``, each batch left-padded to ``width``; the batches not in
        ``numbers`` are read and dropped."""
        wanted = None if numbers is None else set(numbers)
        rows: list[tuple[list[int], list[int], torch.Tensor | None]] = []
        seen = 0
        for where, pair in self._pairs():
            if seen >= self.n or len(pair[0]) != self.lengths[seen]:
                found = "no pair" if seen >= self.n else f"{int(self.lengths[seen])} tokens"
                raise AtpError(f"{where} has {len(pair[0])} tokens but the stream's first pass found {found} there: "
                               "the source changed between passes; give a source that yields the same pairs in the "
                               "same order each time")
            rows.append(pair)
            seen += 1
            if len(rows) == batch_size:
                yield from self._batch(rows, seen, batch_size, wanted)
                rows = []
        if rows:
            yield from self._batch(rows, seen, batch_size, wanted)
        if seen != self.n:
            raise AtpError(f"the stream gave {seen} pairs on this pass but {self.n} on its first: the source changed "
                           "between passes; give a source that yields the same pairs each time")

    def _batch(self, rows: list, seen: int, batch_size: int, wanted: set[int] | None) -> Iterator[Batch]:
        if wanted is not None and (seen - 1) // batch_size not in wanted:
            return
        pairs = self._in_memory(rows)
        idx = torch.arange(seen - len(rows), seen, device=self.host.device)
        yield Batch(idx, pairs.clean, pairs.corrupt, pairs.mask, pairs.labels)


def _fields(where: str, item: Item) -> tuple[Any, Any, Any]:
    """(clean, corrupt, label or None) of one stream item, or a clear error."""
    if isinstance(item, dict):
        missing = [k for k in ("clean", "corrupt") if k not in item]
        if missing:
            raise AtpError(f"{where} lacks the field(s) {missing}; give clean, corrupt and optionally label")
        return item["clean"], item["corrupt"], item.get("label")
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else None
    raise AtpError(f"{where} is {item!r}; a stream item is (clean, corrupt), (clean, corrupt, label) or a dict "
                   "with those keys")


def _token_ids(x: Any, where: str, what: str, d_vocab: int) -> list[int]:
    if isinstance(x, str):
        raise AtpError(f"{where}: give both prompts as strings or both as token ids")
    ids = torch.as_tensor(x)
    if ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise AtpError(f"{where}: the {what} prompt must be a string or 1-D integer token ids, got {ids.dtype} "
                       f"of shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= d_vocab):
        raise AtpError(f"{where}: the {what} prompt holds token ids outside the model's vocabulary [0, {d_vocab})")
    return ids.tolist()
