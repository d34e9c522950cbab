"""Two ranks under torchrun (gloo, CPU) give what one process gives, to 1e-12 in float64: every
method (a baseline too), an odd number of pairs split unevenly, left padding, verify() and a
PairStream; for edges every method, verify() and a circuit's faithfulness, each rank counting only
the forward passes it ran itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atp_plugin import attribute
from distributed_case import EDGE_METHODS, METHODS, NODES, case, edge_runs, stream_case
from hf_models import save_gpt2

HERE = Path(__file__).parent


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_ranks_equal_one(tmp_path):
    model_dir = save_gpt2(tmp_path / "gpt2")
    model, clean, corrupt, metric = case(model_dir)
    alone = {}
    for method in METHODS:
        result = attribute(model, clean, corrupt, metric, method=method, nodes=NODES, batch_size=2,
                           patch_batch_size=7)
        alone[method] = result.scores
        if method == "atp":
            alone["verify"] = torch.tensor(result.verify(5)[["effect", "mean_abs_effect"]].to_numpy())
    edges = edge_runs(model, clean, corrupt, metric)
    model, stream, labelled = stream_case(model_dir)
    alone["stream"] = attribute(model, stream, metric=labelled, method="atp*", nodes=NODES, batch_size=2).scores
    for key, value in alone["stream"].items():  # the stream gives what the lists give
        torch.testing.assert_close(value, alone["atp*"][key], rtol=0, atol=1e-12)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(HERE / "distributed_worker.py"), str(model_dir), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["verify"], alone["verify"], rtol=0, atol=1e-12)
        for method in (*METHODS, "stream"):
            assert set(got[method]) == set(alone[method])
            for key, value in alone[method].items():
                torch.testing.assert_close(got[method][key], value, rtol=0, atol=1e-12, msg=f"{method} {key}")
        for key in ("verify", "faithfulness", *EDGE_METHODS):
            torch.testing.assert_close(got["edges"][key], edges[key], rtol=0, atol=1e-12, msg=f"edges {key}")
    for method in EDGE_METHODS:  # each rank ran (and counted) its own share of the pairs
        key = f"{method} forward passes"
        shares = [int(torch.load(tmp_path / f"rank{rank}.pt")["edges"][key]) for rank in (0, 1)]
        assert sum(shares) == int(edges[key]) and min(shares) > 0, (key, shares, int(edges[key]))


@pytest.mark.parametrize("size", [2, 3, 4, 6, 7])
def test_every_rank_gets_a_batch_and_every_pair_one_rank(monkeypatch, size):
    from atp_plugin.engine import distributed
    for n in range(size, 40):
        for batch_size in (1, 2, 3, 5, 16):
            taken = []
            for rank in range(size):
                monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, size))
                b = distributed.batch_for_ranks(batch_size, n)
                mine = distributed.share(range(-(-n // b)))
                assert mine, (n, size, batch_size, rank)
                taken += [p for i in mine for p in range(i * b, min((i + 1) * b, n))]
            assert sorted(taken) == list(range(n)), (n, size, batch_size)
