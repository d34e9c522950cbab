"""A node type of your own: residual-stream components along directions you choose.

Run from a checkout:  python examples/residual_directions.py
The node type lives in the plugin package next to this file (``examples/atp_directions``); install
it (``pip install ./examples/atp_directions``) and atp-plugin finds its registered adapter
``resid_axes`` by name.

A small random model stands in for yours; with a real model pass real prompts and answers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from atp_plugin import attribute, metrics, plugins

# The node type, from the plugin package's source next to this file (the code that
# `pip install ./examples/atp_directions` installs).
sys.path.insert(0, str(Path(__file__).resolve().parent / "atp_directions"))
from atp_directions import ResidualDirections  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16, act_fn="gelu",
        normalization_type="LN", dtype=torch.float64, default_prepend_bos=False)).eval()

    clean = torch.randint(0, 50, (4, 6))           # [pairs, pos]
    corrupt = clean.clone()
    corrupt[:, 1] = torch.randint(0, 50, (4,))     # the pairs differ at position 1
    answer, wrong = torch.randint(0, 50, (4,)), torch.randint(0, 50, (4,))
    metric = metrics.logit_diff(answer, wrong)     # logit(answer) - logit(wrong) at the last position

    # 1. As an instance: directions of your choice, [k, d_model]. Here the unembedding difference of
    #    the first pair's answer and wrong token (what the metric reads), and a random control.
    directions = torch.stack([model.W_U[:, answer[0]] - model.W_U[:, wrong[0]], torch.randn(32, dtype=torch.float64)])
    nodes = ResidualDirections(directions.detach())
    result = attribute(model, clean, corrupt, metric, nodes=[nodes], method="atp")
    print("AtP estimates, top 5:")
    print(result.top(5)[["node", "score", "signed"]].to_string(index=False))
    print("\nVerified by exact patching (estimate beside true effect):")
    print(result.verify(k=5)[["node", "signed_estimate", "effect"]].to_string(index=False))

    # 2. As a plugin: the installed package registered `resid_axes` through its entry point.
    if "resid_axes" in plugins.adapters():
        result = attribute(model, clean, corrupt, metric, nodes="resid_axes", method="atp")
        print("\nresid_axes (from the installed plugin), top 5:")
        print(result.top(5)[["node", "score"]].to_string(index=False))
    else:
        print("\nInstall the plugin to use it by name: pip install ./examples/atp_directions, then "
              "attribute(..., nodes='resid_axes')")


if __name__ == "__main__":
    main()
