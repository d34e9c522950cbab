"""Speed and memory of feature edges on the bundled IOI demo model (4 layers, d_model 128, float32)
with its four bundled top-k transcoders (512 features each, one per MLP), 32 held-out pairs.

- node atp: ``attribute(..., nodes=[the four TranscoderFeatures], method="atp")`` (what picks the
  kept features) against the feature graph's edge atp with 20 kept features per transcoder
  (``attribute_edges(..., features=..., keep={...})``, the kept set fixed so that only the edge
  run is timed), medians of interleaved rounds; target <= 2x.
- kept 10 / 20 / 50 / 100 per transcoder: edges, time of edge atp (one run) and its peak tensor
  memory (``PeakTensorBytes`` over a second run: tensors created during it, weights excluded).

Usage: python benchmarks/bench_features.py [--repeats 5] [--pairs 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from atp_plugin import attribute, metrics
from atp_plugin.adapters import TranscoderFeatures
from atp_plugin.demo_task import ioi_pairs, load_demo_model, load_demo_transcoders
from atp_plugin.edges import attribute_edges
from atp_plugin.engine.tensor_memory import PeakTensorBytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_times  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=32)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    model = load_demo_model()
    task = ioi_pairs(args.pairs, seed=0, split="test")
    metric = metrics.logit_diff(metrics.token_ids(model, task.answers), metrics.token_ids(model, task.wrongs))
    adapters = [TranscoderFeatures(tc) for tc in load_demo_transcoders()]
    node = attribute(model, task.clean, task.corrupt, metric, nodes=adapters, method="atp", progress=False)
    order = {a.name: torch.argsort(node.scores[a.name].sum(0), descending=True, stable=True).tolist()
             for a in adapters}

    def edges(k: int):
        keep = {name: ranked[:k] for name, ranked in order.items()}
        return attribute_edges(model, task.clean, task.corrupt, metric, method="atp", features=adapters, keep=keep,
                               progress=False)

    times = interleaved_times({
        "node atp": lambda: attribute(model, task.clean, task.corrupt, metric, nodes=adapters, method="atp",
                                      progress=False),
        "edge atp (20 kept)": lambda: edges(20)}, args.repeats)
    print(f"{args.pairs} IOI pairs, 4 transcoders x 512 features; medians of {args.repeats} interleaved rounds\n")
    print("| run | time (s) | x node atp |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.3f} | {t / times['node atp']:.2f} |")
    print("\n| kept per transcoder | edges | edge atp (s) | peak tensor memory (MB) |\n|---|---|---|---|")
    for k in (10, 20, 50, 100):
        start = time.perf_counter()
        result = edges(k)
        took = time.perf_counter() - start
        with PeakTensorBytes() as mem:  # a second run: counting every op's tensors slows it down
            edges(k)
        print(f"| {k} | {result.graph.n_edges} | {took:.3f} | {mem.peak / 2**20:.1f} |")


if __name__ == "__main__":
    main()
