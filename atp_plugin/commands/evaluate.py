"""Cost-of-verification curves of attribution methods on the bundled IOI model, against exhaustive patching.

For each method: rank the nodes, verify them by exact patching in that order, and count the forward
passes (the method's own included; a backward pass counts as 2) spent until the true top-x nodes
have all been verified. Prints the table and writes a PNG (x = true top nodes found, y = cost, log).
"""

from __future__ import annotations

import argparse
import time

import torch

from .. import plugins
from ..attribution import host_for
from ..evaluate import evaluate
from .usage import UsageError, check_at_least, check_output, check_registered, demo_task

DEFAULT_METHODS = "atp,atp+qk,atp*,subsampling,hierarchical,blocks"
DEFAULT_NODES = "attn_q,attn_k,attn_v,attn_z"


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, default=16, help="held-out IOI pairs (default 16)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated backends (default {DEFAULT_METHODS})")
    parser.add_argument("--nodes", default=DEFAULT_NODES, help=f"comma-separated node types (default {DEFAULT_NODES})")
    parser.add_argument("--top-x", type=int, default=20, help="true top nodes to find (default 20)")
    parser.add_argument("--plot", default="atp_evaluate.png", help="where to write the PNG (default atp_evaluate.png)")
    parser.add_argument("--csv", default=None, help="also write the table as CSV here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair sample and of tie-breaking")


def run(args: argparse.Namespace) -> int:
    methods, nodes = _names(args.methods), _names(args.nodes)
    check_registered("--methods", methods, plugins.backends(), "method(s)")
    check_registered("--nodes", nodes, plugins.adapters(), "node type(s)")
    check_at_least(1, pairs=args.pairs, top_x=args.top_x)
    check_output("--plot", args.plot)
    check_output("--csv", args.csv)
    model, task, metric = demo_task(args.pairs, args.seed)
    torch.set_grad_enabled(True)
    start = time.perf_counter()
    try:
        result = evaluate(model, task.clean, task.corrupt, metric, nodes=nodes, methods=methods,
                          top_x=args.top_x, seed=args.seed)
    except ValueError as e:  # e.g. --top-x above the number of nodes, found before the slow ground truth
        raise UsageError(str(e)) from e
    elapsed = time.perf_counter() - start
    table = result.table()
    print(f"atp evaluate: {args.pairs} held-out IOI pairs, {result.n_nodes} nodes ({', '.join(nodes)}), "
          f"{host_for(model).n_layers} layers; ground truth: exhaustive patching (ap)")
    print("forward passes to verify the true top-x nodes in each method's order "
          "(row x=0: the method's own cost; a backward pass counts as 2):\n")
    print(table.to_string(float_format=lambda v: f"{v:.0f}"))
    path = result.plot(args.plot, title=f"IOI demo model: {', '.join(nodes)} ({result.n_nodes} nodes, "
                                         f"{args.pairs} pairs)")
    if args.csv:
        table.to_csv(args.csv)
        print(f"\ntable: {args.csv}")
    print(f"\nplot: {path}  ({elapsed:.1f}s)")
    return 0
