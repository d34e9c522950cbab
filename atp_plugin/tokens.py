"""Text the tokenizer does not know: an error naming the words, never a silent ``<unk>``.

A word-level tokenizer (such as the demo model's) maps every word outside its vocabulary to one
unknown token, so a typo in a prompt or an answer would silently become a different prompt or
answer. Byte-level tokenizers (GPT-2 and most others) have no such token, or share it with BOS/EOS,
and are never flagged.
"""

from __future__ import annotations

from typing import Any

SMALL_VOCAB = 300  # a vocabulary this small is listed in the error (the demo model's has 69 words)


def unknown_id(tokenizer: Any) -> int | None:
    """The tokenizer's dedicated unknown-token id, or None when it has none (or shares it with
    BOS, EOS or padding, as GPT-2's ``<|endoftext|>`` does)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    shared = {getattr(tokenizer, f"{t}_token_id", None) for t in ("bos", "eos", "pad")}
    return None if unk is None or unk in shared else int(unk)


def check_known(tokenizer: Any, text: str, ids: list[int], what: str) -> None:
    """Raise a ValueError naming the words of ``text`` that became the unknown token in ``ids``."""
    unk = unknown_id(tokenizer)
    if unk is None or unk not in ids:
        return
    words: list[str] = []
    if getattr(tokenizer, "is_fast", False):  # offsets say which words became <unk>
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        words = [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
    named = f" {sorted(set(words))}" if words else ""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    known = sorted(w for w in vocab if w not in special)
    listed = f": {' '.join(known)}" if 0 < len(known) <= SMALL_VOCAB else ""
    raise ValueError(f"{what} {text!r} holds word(s){named} the model's tokenizer does not know (they would become "
                     f"{tokenizer.unk_token!r}); use words in its vocabulary{listed}")
