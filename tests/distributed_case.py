"""The case tests/test_distributed.py runs on 1 and on 2 ranks: a float64 GPT-2 Bridge and 5 pairs
of strings of different lengths (left-padded)."""

from __future__ import annotations

from pathlib import Path

import torch

from atp_plugin import PairStream, metrics
from atp_plugin.edges import attribute_edges, faithfulness_of, top_circuit
from hf_models import load_bridge

METHODS = ("atp", "atp+qk", "atp*", "ap", "subsampling")
EDGE_METHODS = ("atp", "atp+qk", "ig", "ap")
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


def edge_runs(model, clean, corrupt, metric) -> dict[str, torch.Tensor]:
    """Every edge method's scores and signed means, the exact effects of ``atp``'s top 4 edges, the
    faithfulness of its top-6 circuit, and each method's forward passes (this rank's own)."""
    out: dict[str, torch.Tensor] = {}
    for method in EDGE_METHODS:
        result = attribute_edges(model, clean, corrupt, metric, method=method, ig_steps=2, batch_size=2,
                                 patch_batch_size=7)
        out[method] = torch.stack([result.scores, result.signed])
        out[f"{method} forward passes"] = torch.tensor(result.forward_passes)
        if method == "atp":
            out["verify"] = torch.tensor(result.verify(4)[["effect", "mean_abs_effect"]].to_numpy())
            out["faithfulness"] = torch.tensor(faithfulness_of(result, [top_circuit(result, 6)]))
    return out
