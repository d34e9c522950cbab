"""Each score's standard error over pairs (running moments, merged a batch at a time) equals the
two-pass formula std(per-pair scores, ddof=1) / sqrt(n) in float64, with left padding (fewer pairs
at early positions) and batches of every size, on a HookedTransformer (TransformerLens 3) and a
TransformerBridge (both)."""

from __future__ import annotations

import math

import pytest
import torch

from atp_plugin import attribute
from atp_plugin.engine.moments import Moments
from helpers import string_pairs, words_model


def test_moments_equal_the_two_pass_formula():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(11, 5, 3, generator=g, dtype=torch.float64) * 1e3 + 1e6  # a large mean: cancellation
    mask = torch.rand(11, 5, generator=g) < 0.7
    mask[:2] = True
    moments = Moments()
    for chunk in torch.arange(11).split(4):
        moments.add(values[chunk], mask[chunk])
    se = moments.std_error()
    for pos in range(5):
        rows = values[mask[:, pos], pos]  # [n, 3]
        expected = rows.std(0, correction=1) / math.sqrt(len(rows)) if len(rows) >= 2 else torch.full((3,), math.nan)
        torch.testing.assert_close(se[pos], expected, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("method", ["atp", "atp+qk", "atp*"])
def test_result_std_error_equals_per_pair_scores(host, method):
    model = words_model(host)
    clean, corrupt = string_pairs([6, 4, 6, 5, 3], n_words=48)  # the Bridge's tokenizer knows w0..w47
    metric = lambda logits, idx: logits[:, -1, 3] - logits[:, -1, 7]  # noqa: E731
    nodes = ["attn_q", "attn_k", "attn_z"]
    result = attribute(model, clean, corrupt, metric, method=method, nodes=nodes, batch_size=2)
    # per pair alone: its score is that pair's |I| (c_gd with GradDrop), right-aligned in the padded grid
    width = result.scores["attn_z"].shape[1]
    per_pair = {key: [] for key in result.scores}
    for c, n in zip(clean, corrupt):
        one = attribute(model, [c], [n], metric, method=method, nodes=nodes)
        for key, v in one.scores.items():
            per_pair[key].append((v.shape[1], v))
    for key, runs in per_pair.items():
        values = torch.full((len(runs), *result.scores[key].shape), math.nan, dtype=torch.float64)
        for i, (t, v) in enumerate(runs):
            values[i, :, width - t:] = v
        real = ~values.isnan()
        n = real.sum(0)
        mean = values.nan_to_num().sum(0) / n
        var = ((values - mean).nan_to_num() ** 2).sum(0) / (n - 1)
        expected = torch.where(n >= 2, (var / n).sqrt(), torch.full_like(var, math.nan))
        torch.testing.assert_close(result.scores[key].double(), mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result.std_error[key].double(), expected, rtol=1e-9, atol=1e-12, equal_nan=True)
    assert "std_error" in result.top(3).columns
