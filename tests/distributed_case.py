"""The case tests/test_distributed.py runs on 1 and on 2 ranks: a float64 GPT-2 Bridge and 5 pairs
of strings of different lengths (left-padded)."""

from __future__ import annotations

from pathlib import Path

import torch

from atp_plugin import PairStream, metrics
from hf_models import load_bridge

METHODS = ("atp", "atp+qk", "atp*", "ap", "subsampling")
NODES = ("attn_q", "attn_k", "attn_z")  # q and k: the QK fix; few enough nodes for exhaustive ap
CLEAN = ["w1 w2 w3 w4 w5", "w6 w7 w8", "w9 w10 w11 w12", "w2 w4 w6 w8 w10", "w3 w5 w7"]
CORRUPT = ["w1 w9 w3 w4 w7", "w6 w1 w8", "w9 w2 w11 w5", "w2 w4 w1 w8 w11", "w3 w8 w7"]


def stream_case(path: Path):
    """The same pairs as a labelled PairStream (labels [answer, wrong]) with its metric."""
    model, clean, corrupt, metric = case(path)
    items = [(c, k, [5 + 2 * i, 25 + 2 * i]) for i, (c, k) in enumerate(zip(clean, corrupt))]
    return model, PairStream(items), metrics.logit_diff_labels()


def case(path: Path):
    model = load_bridge(path)
    answers = torch.tensor([5, 7, 9, 11, 13])
    return model, CLEAN, CORRUPT, metrics.logit_diff(answers, answers + 20)
