"""Tests for the IOI demo task and the shipped demo model, as a HookedTransformer (TransformerLens 3)
and as a TransformerBridge (both)."""

from __future__ import annotations

import collections
import itertools

import pytest
import torch

from atp_plugin.demo_task import (
    NAMES,
    OBJECTS,
    PLACES,
    PROMPT_LENGTH,
    SPLIT_SIZES,
    TEMPLATES,
    _family_split,
    evaluate_demo_model,
    ioi_pairs,
    load_demo_model,
)
from conftest import HOSTS


@pytest.fixture(scope="module", params=HOSTS)
def model(request):
    return load_demo_model(bridge=request.param == "bridge")


def test_tokenizer_round_trips_through_transformer_lens(model) -> None:
    prompt = "When Mary and John went to the store, John gave a drink to"
    tokens = model.to_tokens(prompt)  # [1, pos]
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    assert model.to_str_tokens(prompt)[1:] == [
        "When", "Mary", "and", "John", "went", "to", "the", "store", ",", "John", "gave", "a", "drink", "to",
    ]
    assert model.tokenizer.unk_token_id not in tokens
    assert model.to_string(tokens[0, 1:]) == prompt
    assert model.to_single_token(" Mary") == model.to_single_token("Mary") != model.to_single_token(" John")


def test_every_template_has_the_same_length(model) -> None:
    for template in TEMPLATES:
        prompt = template.format(A="Mary", B="John", C="John", PLACE="store", OBJECT="drink")
        assert model.to_tokens(prompt).shape == (1, 1 + PROMPT_LENGTH), template


def test_pairs_are_token_aligned_and_answers_flip(model) -> None:
    pairs = ioi_pairs(500, seed=3, split="test")
    assert len(pairs) == 500
    clean = model.to_tokens(pairs.clean)  # [batch, pos]
    corrupt = model.to_tokens(pairs.corrupt)  # [batch, pos]
    assert clean.shape == corrupt.shape == (500, 1 + PROMPT_LENGTH)
    assert model.tokenizer.unk_token_id not in clean and model.tokenizer.unk_token_id not in corrupt
    # Exactly one position differs: the repeated name, which changes from wrong to answer.
    differs = clean != corrupt  # [batch, pos]
    assert (differs.sum(1) == 1).all()
    answer_ids = torch.tensor([model.to_single_token(a) for a in pairs.answers])
    wrong_ids = torch.tensor([model.to_single_token(w) for w in pairs.wrongs])
    assert (clean[differs] == wrong_ids).all() and (corrupt[differs] == answer_ids).all()
    # Both names occur once before the repeated one in both prompts.
    for row, answer, wrong in zip(clean.tolist(), answer_ids.tolist(), wrong_ids.tolist()):
        assert row.count(answer) == 1 and row.count(wrong) == 2
    assert {a.strip() for a in pairs.answers} <= set(NAMES) and all(a.startswith(" ") for a in pairs.answers)


def test_pairs_are_deterministic_and_distinct() -> None:
    first, again = ioi_pairs(200, seed=7), ioi_pairs(200, seed=7)
    assert first == again
    assert len(set(first.clean)) == 200
    assert ioi_pairs(200, seed=8).clean != first.clean


def test_train_and_test_splits_are_disjoint() -> None:
    train = ioi_pairs(3000, seed=0, split="train")
    test = ioi_pairs(3000, seed=0, split="test")
    assert not (set(train.clean) | set(train.corrupt)) & (set(test.clean) | set(test.corrupt))
    with pytest.raises(ValueError):
        ioi_pairs(1, split="validation")


def test_asking_for_more_pairs_than_a_split_holds_is_an_error() -> None:
    """Not an endless search for pairs that do not exist: every (first, second) name order, place,
    object, template and repeated name is one pair, and the splits share them out."""
    families = itertools.product(itertools.permutations(NAMES, 2), PLACES, OBJECTS, range(len(TEMPLATES)))
    counted = collections.Counter(_family_split(a, b, place, obj, t) for (a, b), place, obj, t in families)
    assert {split: 2 * n for split, n in counted.items()} == SPLIT_SIZES
    total = 2 * len(NAMES) * (len(NAMES) - 1) * len(PLACES) * len(OBJECTS) * len(TEMPLATES)
    assert SPLIT_SIZES["train"] + SPLIT_SIZES["test"] == total
    with pytest.raises(ValueError, match="the test split holds 121,420 distinct pairs"):
        ioi_pairs(SPLIT_SIZES["test"] + 1)


def test_shipped_model_solves_held_out_ioi(model) -> None:
    # Computed directly from logits, independently of evaluate_demo_model, on the README's 1,000
    # held-out pairs: the figures it prints are held here at the printed precision.
    pairs = ioi_pairs(1000, seed=1234, split="test")
    with torch.no_grad():
        clean_logits = model(model.to_tokens(pairs.clean))[:, -1]  # [batch, vocab]
        corrupt_logits = model(model.to_tokens(pairs.corrupt))[:, -1]  # [batch, vocab]
    rows = torch.arange(len(pairs))
    answer_ids = torch.tensor([model.to_single_token(a) for a in pairs.answers])
    wrong_ids = torch.tensor([model.to_single_token(w) for w in pairs.wrongs])
    name_ids = torch.tensor([model.to_single_token(n) for n in NAMES])
    clean_diff = clean_logits[rows, answer_ids] - clean_logits[rows, wrong_ids]  # [batch]
    corrupt_diff = corrupt_logits[rows, answer_ids] - corrupt_logits[rows, wrong_ids]  # [batch]
    top_name = name_ids[clean_logits[:, name_ids].argmax(1)]  # [batch]

    assert (top_name == answer_ids).all()  # README: accuracy 100%
    assert (clean_diff > 0).all()
    assert round(float(clean_diff.double().mean()), 2) == 10.91  # README: mean logit difference +10.91
    assert round(float(corrupt_diff.double().mean()), 2) == -10.89  # README: -10.89 on the corrupted ones


def test_evaluate_demo_model_reports_held_out_scores(model) -> None:
    scores = evaluate_demo_model(model, n=500, seed=5)
    assert scores["accuracy"] >= 0.95 and scores["pairwise_accuracy"] >= 0.95
    assert scores["logit_diff"] > 2 and scores["corrupt_logit_diff"] < -2
