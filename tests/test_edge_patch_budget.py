"""Exact edge patching runs through the engine's planner: copies per pass sized from a byte budget
(``max_memory``) give the same effects as a fixed number of copies; on a HookedTransformer
(TransformerLens 3) and a TransformerBridge (both)."""

from __future__ import annotations

import pytest
import torch

from atp_plugin.edges import attribute_edges
from conftest import HOSTS, host_model, logit_diff_metric, make_pairs
from test_patch_budget import forward_sizes

N, T = 4, 6


@pytest.mark.parametrize("host", HOSTS)
def test_edge_verification_honours_the_budget(host: str) -> None:
    model = host_model(host)
    clean, corrupt = make_pairs(N, T)
    result = attribute_edges(model, clean, corrupt, logit_diff_metric(N), progress=False)
    engine = result.context.engine
    runs = {}
    for size, budget in ((1000, None), (None, 1)):  # everything in one pass; one copy a pass
        engine.patch_batch_size, engine.max_memory = size, budget
        with forward_sizes(model) as sizes:
            runs[budget] = result.verify(5), sizes
    (large, large_sizes), (small, small_sizes) = runs[None], runs[1]
    assert large_sizes == [N, N, 5 * N] and small_sizes == [N, N] + [1] * (5 * N)  # noise, clean, patched
    assert large.attrs["forward_passes"] == small.attrs["forward_passes"] == 7 * N
    for column in ("effect", "mean_abs_effect"):
        torch.testing.assert_close(torch.tensor(small[column].to_numpy()), torch.tensor(large[column].to_numpy()),
                                   rtol=0, atol=1e-6)
    assert small["effect"].abs().max() > 1e-3  # the comparison is not of zeros
