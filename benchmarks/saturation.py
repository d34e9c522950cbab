"""Saturation study: AtP misses query/key nodes of saturated attention; the QK fix finds them.

Small float64 random models (``tests/conftest.py`` ``make_model``: 2 layers, d_model 32) have
W_Q and W_K scaled by a factor until attention saturates. For each factor and each prompt pair,
``ap`` (exact patching, the ground truth), ``atp`` and ``atp+qk`` score every ``attn_q``/``attn_k``
node. Pairs are scored one at a time, so each method's score is |I| of that pair and the
aggregation over pairs plays no part. The wrong token never equals the answer, and a pair whose
clean and corrupt prompts are identical (no node has an effect) is skipped. Reported, as means over
pairs and seeds:

- mean max attention probability (query rows t >= 1; row 0 can only attend to itself);
- recall@K: of the true top-K nodes by ``ap``, the fraction a method ranks in its own top-K;
- false-negative rate: of the true top-K nodes, the fraction a method scores below 10% of |I|.

Usage: python benchmarks/saturation.py [--factors 1 2 4 16 64] [--seeds 4] [--pairs 8] [--k 5]
Writes the table to stdout and the figure to docs/saturation.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the test suite's random-model factories

import atp_plugin  # noqa: E402
from atp_plugin import metrics  # noqa: E402
from conftest import make_model, make_pairs  # noqa: E402

NODES = ("attn_q", "attn_k")
METHODS = ("ap", "atp", "atp+qk")
NEAR_ZERO = 0.1  # an estimate below this fraction of the true |I| counts as a false negative
D_VOCAB = 50


def saturated_model(seed: int, factor: float, **overrides) -> HookedTransformer:
    """``make_model(seed)`` with every layer's W_Q and W_K multiplied by ``factor`` (the attention
    logits grow by factor**2; large factors saturate every softmax)."""
    model = make_model(seed, d_vocab=D_VOCAB, **overrides)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.mul_(factor)
            block.attn.W_K.mul_(factor)
    return model


def max_attention(model: HookedTransformer, tokens: torch.Tensor) -> float:
    """Mean over prompts, layers, heads and query rows t >= 1 of the row's largest probability."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    rows = [cache[name][:, :, 1:].amax(-1) for name in cache]  # [batch, head, t - 1] per layer
    return torch.stack(rows).mean().item()


def pair_scores(model: HookedTransformer, clean: torch.Tensor, corrupt: torch.Tensor, answer: torch.Tensor,
                wrong: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores of every q/k node for ONE pair (``clean``/``corrupt`` ``[1, T]``), per method:
    ``[layer, nodes]``, the ``attn_q`` then the ``attn_k`` scores ``[pos, head]`` flattened per layer."""
    metric = metrics.logit_diff(answer, wrong)
    out = {}
    for method in METHODS:
        res = atp_plugin.attribute(model, clean, corrupt, metric, nodes=list(NODES), method=method, progress=False)
        out[method] = torch.cat([res.scores[n].flatten(1) for n in NODES], dim=1)  # [layer, nodes]
    return out


def recall_at_k(truth: torch.Tensor, estimate: torch.Tensor, k: int) -> float:
    """Fraction of the true top-``k`` nodes that ``estimate`` also ranks in its top ``k``."""
    true_top = set(truth.topk(k).indices.tolist())
    return len(true_top & set(estimate.topk(k).indices.tolist())) / k


def false_negative_rate(truth: torch.Tensor, estimate: torch.Tensor, k: int) -> float:
    """Fraction of the true top-``k`` nodes whose estimate is below NEAR_ZERO of their true |I|."""
    top = truth.topk(k).indices
    return (estimate[top] < NEAR_ZERO * truth[top]).double().mean().item()


@dataclass
class Row:
    factor: float
    max_prob: float
    recall: dict[str, float]       # method -> recall@K over the q/k nodes of all layers
    false_neg: dict[str, float]    # method -> false-negative rate over the same
    recall_last: dict[str, float]  # method -> recall@K over the last layer's q/k nodes only


def study(factor: float, seeds: list[int], n_pairs: int = 8, t: int = 6, k: int = 5, **overrides) -> Row:
    """Means over ``seeds`` x ``n_pairs`` pairs of recall@``k`` and the false-negative rate of
    ``atp`` and ``atp+qk`` against ``ap``, on models with W_Q, W_K scaled by ``factor``."""
    stats: dict[str, dict[str, list[float]]] = {s: {m: [] for m in METHODS[1:]} for s in ("recall", "fn", "last")}
    probs = []
    for seed in seeds:
        model = saturated_model(seed, factor, **overrides)
        clean, corrupt = make_pairs(n_pairs, t, d_vocab=D_VOCAB, seed=seed + 1)
        g = torch.Generator().manual_seed(seed + 2)
        answer = torch.randint(0, D_VOCAB, (n_pairs,), generator=g)
        wrong = (answer + torch.randint(1, D_VOCAB, (n_pairs,), generator=g)) % D_VOCAB  # never the answer
        probs.append(max_attention(model, clean))
        for i in range(n_pairs):
            if torch.equal(clean[i], corrupt[i]):  # no node has an effect, so there is nothing to find
                continue
            scores = pair_scores(model, clean[i:i + 1], corrupt[i:i + 1], answer[i:i + 1], wrong[i:i + 1])
            truth = scores["ap"]
            for m in METHODS[1:]:
                stats["recall"][m].append(recall_at_k(truth.flatten(), scores[m].flatten(), k))
                stats["fn"][m].append(false_negative_rate(truth.flatten(), scores[m].flatten(), k))
                stats["last"][m].append(recall_at_k(truth[-1], scores[m][-1], k))
    mean = {s: {m: sum(v) / len(v) for m, v in per.items()} for s, per in stats.items()}
    return Row(factor, sum(probs) / len(probs), mean["recall"], mean["fn"], mean["last"])


def plot(rows: list[Row], k: int, path: Path) -> None:
    """Recall@K and the false-negative rate against the scale factor, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = [r.factor for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m, style in (("atp", "o--"), ("atp+qk", "s-")):
        axes[0].plot(factors, [r.recall[m] for r in rows], style, label=m)
        axes[1].plot(factors, [r.false_neg[m] for r in rows], style, label=m)
    axes[0].set_ylabel(f"recall@{k} of the true top-{k} q/k nodes")
    axes[1].set_ylabel(f"true top-{k} nodes scored < {NEAR_ZERO:.0%} of |I|")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(factors, [f"{f:g}\n({r.max_prob:.3f})" for f, r in zip(factors, rows)])
        ax.set_xlabel("W_Q, W_K scale factor\n(mean max attention probability)")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Attention saturation: AtP's false negatives on query/key nodes, and the QK fix")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", type=float, nargs="+", default=[1, 2, 4, 16, 64])
    parser.add_argument("--seeds", type=int, default=4, help="random models per factor")
    parser.add_argument("--pairs", type=int, default=8, help="prompt pairs per model")
    parser.add_argument("--tokens", type=int, default=6, help="tokens per prompt")
    parser.add_argument("--k", type=int, default=5, help="K of recall@K")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "saturation.png")
    args = parser.parse_args()

    torch.set_num_threads(2)
    start = time.perf_counter()
    seeds = list(range(args.seeds))
    print(f"2-layer d_model-32 float64 models, {args.seeds} seeds x {args.pairs} pairs x {args.tokens} tokens, "
          f"attn_q + attn_k nodes, K = {args.k}, false negative = estimate < {NEAR_ZERO:.0%} of |I|")
    header = ("factor", "max attn p", "recall atp", "recall atp+qk", "FN atp", "FN atp+qk", "  last layer only:",
              "recall atp", "recall atp+qk")
    print(" | ".join(header))
    rows = []
    for factor in args.factors:
        row = study(factor, seeds, args.pairs, args.tokens, args.k)
        rows.append(row)
        print(f"{factor:6g} | {row.max_prob:10.4f} | {row.recall['atp']:10.2f} | {row.recall['atp+qk']:13.2f} | "
              f"{row.false_neg['atp']:6.2f} | {row.false_neg['atp+qk']:9.2f} | {'':17} | "
              f"{row.recall_last['atp']:10.2f} | {row.recall_last['atp+qk']:13.2f}")
    plot(rows, args.k, args.out)
    print(f"figure: {args.out} ({time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
    main()
