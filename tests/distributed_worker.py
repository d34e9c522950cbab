"""Run under torchrun by tests/test_distributed.py: attribute every method on a saved GPT-2 and save
each rank's scores, the exact effects of the top nodes, a PairStream's scores and every edge method's
results (``distributed_case.edge_runs``) to ``<out>/rank<r>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from atp_plugin import attribute

sys.path.insert(0, str(Path(__file__).parent))
from distributed_case import METHODS, NODES, case, edge_runs, stream_case  # noqa: E402


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    model, clean, corrupt, metric = case(Path(model_dir))
    saved = {}
    for method in METHODS:
        result = attribute(model, clean, corrupt, metric, method=method, nodes=NODES, batch_size=2,
                           patch_batch_size=7)
        saved[method] = {key: v.clone() for key, v in result.scores.items()}
        if method == "atp":
            saved["verify"] = torch.tensor(result.verify(5)[["effect", "mean_abs_effect"]].to_numpy())
    saved["edges"] = edge_runs(model, clean, corrupt, metric)
    model, stream, labelled = stream_case(Path(model_dir))
    saved["stream"] = attribute(model, stream, metric=labelled, method="atp*", nodes=NODES, batch_size=2).scores
    torch.save(saved, Path(out) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
