"""Rank heads and neurons of the bundled IOI model with AtP*, verify the top ones, draw a heatmap.

With ``--sae``: rank the features (and error nodes) of the bundled SAE on ``blocks.2.hook_resid_pre``
instead, and verify the top ones the same way (no heatmap).

Runs offline on the model the project trained itself (atp_plugin/data): held-out pairs such as
"When Mary and John went to the store, John gave a drink to" -> " Mary", corrupted by repeating
the other name so the answer flips.
"""

from __future__ import annotations

import argparse
import time

import torch

from .. import attribute, plugins
from ..demo_task import load_demo_sae
from ..plots import layer_heatmap
from .usage import check_at_least, check_output, check_registered, demo_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, default=32, help="held-out IOI pairs to attribute (default 32)")
    parser.add_argument("--method", default="atp*", help="attribution method (default atp*)")
    parser.add_argument("--top", type=int, default=10, help="top nodes to verify by exact patching (default 10)")
    parser.add_argument("--heatmap", default="atp_demo_heads.png",
                        help="where to write the layer x head PNG (default atp_demo_heads.png)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out pair sample (default 0)")
    parser.add_argument("--sae", action="store_true",
                        help="rank the bundled SAE's features on blocks.2.hook_resid_pre instead of heads and neurons")
    parser.add_argument("--features", action="store_true",
                        help="find the IOI feature circuit instead: edges between the features of the bundled "
                             "transcoders of the four MLPs, heads and the logits (atp_demo_features.svg/.html)")
    parser.add_argument("--circuit", action="store_true",
                        help="find the IOI circuit instead (edge scores, top 40 edges, faithfulness, "
                             "atp_demo_circuit.svg)")


def run(args: argparse.Namespace) -> int:
    if args.features:
        from .circuit import demo_features
        check_at_least(1, pairs=args.pairs)
        return demo_features(args)
    if args.circuit:
        from .circuit import demo
        check_at_least(1, pairs=args.pairs)
        return demo(args)
    check_registered("--method", [args.method], plugins.backends(), "method(s)")
    check_at_least(1, pairs=args.pairs, top=args.top)
    if not args.sae:
        check_output("--heatmap", args.heatmap)
    torch.set_grad_enabled(True)
    start = time.perf_counter()
    model, task, metric = demo_task(args.pairs, args.seed)
    if args.sae:
        # imported here: it imports SAE-Lens, which would slow down every other command
        from ..adapters import SAEFeatures
        nodes = [SAEFeatures(load_demo_sae())]
    else:
        nodes = ["attn_z", "mlp_neurons"]
    result = attribute(model, task.clean, task.corrupt, metric, nodes=nodes, method=args.method)
    ranked = time.perf_counter() - start
    table = result.verify(args.top)
    total = time.perf_counter() - start
    print(f"atp demo: {args.pairs} held-out IOI pairs, e.g. {task.clean[0]!r} -> {task.answers[0]!r}")
    print(f"method {result.method}; metric: logit({task.answers[0]!r}) - logit({task.wrongs[0]!r}) at the last token\n")
    shown = table[["node", "estimate", "mean_abs_effect", "effect"]].rename(
        columns={"mean_abs_effect": "exact mean |I|", "effect": "exact mean I"})
    print(shown.to_string(index=False, float_format=lambda v: f"{v:9.4f}"))
    print(f"estimate: the {result.method} score, a mean over pairs of estimated |I|. "
          "exact mean |I| / mean I: the true\n"
          "per-pair effect I of patching the node, by exact patching, averaged as magnitudes / signed")
    if args.sae:
        print(f"\nranked {sum(v.numel() for v in result.scores.values())} SAE features and error nodes in "
              f"{ranked:.1f}s; verified the top {args.top} by exact patching; total {total:.1f}s")
        return 0
    path = layer_heatmap(result, "attn_z", args.heatmap, title=f"attention heads (attn_z), {result.method}")
    print(f"\nranked {sum(v.numel() for v in result.scores.values())} nodes in {ranked:.1f}s; "
          f"verified the top {args.top} by exact patching; total {total:.1f}s")
    print(f"heatmap: {path}")
    return 0
