"""Verification: the ``effect`` column against exact patches written here with TransformerLens hooks,
one unpadded prompt at a time (float64), for every built-in node type and for left-padded pairs, on
a HookedTransformer (TransformerLens 3) and a TransformerBridge (both)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import atp_plugin
from atp_plugin import attribute
from conftest import host_model, make_bridge, make_model, make_pairs

HOOKS = {"attn_q": "blocks.{}.attn.hook_q", "attn_k": "blocks.{}.attn.hook_k", "attn_v": "blocks.{}.attn.hook_v",
         "attn_z": "blocks.{}.attn.hook_z", "mlp_neurons": "blocks.{}.mlp.hook_post",
         "resid_pre": "blocks.{}.hook_resid_pre"}


def reference_effect(model, clean: list[torch.Tensor], corrupt: list[torch.Tensor], answers, wrongs, row,
                     width: int) -> np.ndarray:
    """Per pair where the node exists, L(clean | node <- corrupt value) - L(clean), each prompt run
    alone and unpadded; ``row.pos`` counts from the left of the padded width."""
    hook = HOOKS[row.node_type].format(int(row.layer))
    inner = tuple(int(getattr(row, c)) for c in ("head", "neuron") if c in row._fields and not pd.isna(getattr(row, c)))
    effects = []
    for c, x, a, w in zip(clean, corrupt, answers, wrongs):
        t = int(row.pos) - (width - len(c))  # position in this unpadded prompt
        if t < 0:
            continue  # padding in this pair: the node does not exist
        _, cache = model.run_with_cache(x[None], names_filter=hook)

        def patch(act, hook, t=t, cache=cache):
            act = act.clone()
            act[(0, t) + inner] = cache[hook.name][(0, t) + inner]
            return act

        with torch.no_grad():
            base = model(c[None])[0, -1]
            patched = model.run_with_hooks(c[None], fwd_hooks=[(hook, patch)])[0, -1]
        effects.append(float((patched[a] - patched[w]) - (base[a] - base[w])))
    return np.array(effects)


def ids(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (n,), generator=g), torch.randint(0, 50, (n,), generator=g)


@pytest.mark.parametrize("node_type", sorted(HOOKS))
def test_effect_equals_an_independent_patch(host, node_type):
    model = host_model(host, 0, n_layers=2)
    clean, corrupt = make_pairs(3, 6)
    answers, wrongs = ids(3, 2)
    metric = atp_plugin.metrics.logit_diff(answers, wrongs)
    result = attribute(model, clean, corrupt, metric, nodes=[node_type], method="atp", batch_size=2,
                       patch_batch_size=3)  # pairs in 2 batches, patched copies in chunks of 3
    table = atp_plugin.verify(result, 4)
    assert len(table) == 4 and list(table["node"]) == list(result.top(4)["node"])
    np.testing.assert_allclose(table["estimate"], result.top(4)["score"])
    per_pair = [reference_effect(model, list(clean), list(corrupt), answers, wrongs, row, 6)
                for row in table.itertuples(index=False)]
    reference = [e.mean() for e in per_pair]
    np.testing.assert_allclose(table["effect"], reference, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(table["abs_effect"], np.abs(reference), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(table["mean_abs_effect"], [np.abs(e).mean() for e in per_pair], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.verify(4)["effect"], table["effect"], rtol=0, atol=0)


def word_model(host: str):
    """A float64 model with a word-level tokenizer, no BOS ("w0".."w48", pad "<pad>", padding on the
    left; on the Bridge the tokenizer of ``hf_models``)."""
    if host == "bridge":
        return make_bridge(1, 2)
    words = ["<pad>"] + [f"w{i}" for i in range(49)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model = make_model(1, n_layers=2)
    model.set_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<pad>"),
                        default_padding_side="left")
    return model


def test_effect_with_left_padding(host):
    """Pairs of lengths 3, 5 and 4: a node at a position that is padding in some pairs averages
    over the pairs where it exists. Checked: every resid_pre node, and the attn_z nodes at the
    positions that are padding in some pairs and at the last position."""
    model = word_model(host)
    clean = ["w1 w2 w3", "w4 w5 w6 w7 w8", "w9 w10 w11 w12"]
    corrupt = ["w20 w2 w3", "w24 w5 w21 w7 w8", "w9 w22 w11 w23"]
    answers, wrongs = ids(3, 5)
    metric = atp_plugin.metrics.logit_diff(answers, wrongs)
    result = attribute(model, clean, corrupt, metric, nodes=["attn_z", "resid_pre"], method="atp", batch_size=2,
                       patch_batch_size=3)  # the longest pair alone in the second batch
    assert result.alignment.startswith("left-padded")
    n_nodes = len(result.to_frame())
    table = atp_plugin.verify(result, n_nodes)
    assert len(table) == n_nodes  # no position is padding in every pair
    assert table["pairs"].tolist() == table["pos"].map({0: 1, 1: 2, 2: 3, 3: 3, 4: 3}).tolist()  # lengths 3, 5, 4
    tokens = [model.to_tokens(s, prepend_bos=False)[0] for s in (clean + corrupt)]
    checked = table[(table["node_type"] == "resid_pre") | table["pos"].isin([0, 1, 4])]
    per_pair = [reference_effect(model, tokens[:3], tokens[3:], answers, wrongs, row, 5)
                for row in checked.itertuples(index=False)]
    np.testing.assert_allclose(checked["effect"], [e.mean() for e in per_pair], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(checked["mean_abs_effect"], [np.abs(e).mean() for e in per_pair], rtol=1e-9,
                               atol=1e-12)  # over the pairs where the node is not padding
    assert (checked.loc[checked["pos"] == 0, "effect"].abs() > 1e-3).any()  # real in one pair only


def test_progress_bar(host, capsys):
    model = host_model(host, 0, n_layers=2)
    clean, corrupt = make_pairs(3, 6)
    metric = atp_plugin.metrics.logit_diff(*ids(3, 2))
    for progress, shown in ((True, True), (False, False)):
        result = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp", progress=progress,
                           patch_batch_size=4)
        capsys.readouterr()
        atp_plugin.verify(result, 20)
        assert ("verifying" in capsys.readouterr().err) is shown


def test_bad_input(host):
    model = host_model(host, 0, n_layers=1)
    clean, corrupt = make_pairs(2, 4)
    result = attribute(model, clean, corrupt, atp_plugin.metrics.logit_diff(*ids(2, 2)), nodes=["attn_z"],
                       method="atp")
    with pytest.raises(ValueError, match="k must be at least 1"):
        atp_plugin.verify(result, 0)
    with pytest.raises(ValueError, match="summed-over-positions"):
        atp_plugin.verify(result.sum_over_positions(), 3)
