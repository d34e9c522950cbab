"""Time ``AttributionResult.top(10)`` and ``to_frame()`` on a result of many nodes.

    python benchmarks/bench_result.py [--nodes 10000000]

The scores are random (selection cost does not depend on their values); the result has the shape of
neuron scores ``[layers, pos, neuron]``, 12 layers x 3072 neurons and as many positions as it takes.
"""

from __future__ import annotations

import argparse
import time

import torch

from atp_plugin.result import AttributionResult


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10_000_000, help="about how many nodes (default 10M)")
    args = parser.parse_args()
    pos = max(1, args.nodes // (12 * 3072))
    scores = torch.rand(12, pos, 3072, generator=torch.Generator().manual_seed(0))  # [layer, pos, neuron]
    result = AttributionResult("atp", {"mlp_neurons": scores}, {"mlp_neurons": scores},
                               {"mlp_neurons": ("layer", "pos", "neuron")}, torch.ones(pos, dtype=torch.long),
                               "unpadded", 1)
    start = time.perf_counter()
    top = result.top(10)
    t_top = time.perf_counter() - start
    start = time.perf_counter()
    result.to_frame()
    t_frame = time.perf_counter() - start
    assert top["score"].iloc[0] == float(scores.max())
    print(f"| nodes | top(10) (s) | to_frame() (s) |\n|---:|---:|---:|\n| {scores.numel():,} | {t_top:.3f} | "
          f"{t_frame:.1f} |")


if __name__ == "__main__":
    main()
