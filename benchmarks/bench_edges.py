"""Speed benchmark for edges, on bench_atp.py's model and pairs (6 layers, d_model 256, 8 heads,
d_mlp 1024, float32; 16 pairs of 24 tokens), in one process, medians of interleaved rounds.

- edges atp / atp+qk: ``attribute_edges`` for every edge of the model (per position), end to end;
  compared with node ``atp+qk`` over q, k, v, z and neurons (``attribute``), target <= 1.5x.
- edges ig (``--ig-steps``, default 5): compared with one forward + backward of the bare model,
  target <= (steps + 1)x.
- TransformerLens's own EAP (``attribution_patch(..., granularity="edge")``, TransformerLens >= 4.3
  with a TransformerBridge): run with ``--tl4`` in an environment that has it; the same weights are
  saved as a GPT-2 checkpoint and booted as a Bridge, and both are timed on it.

- ``--demo``: the edge methods on the bundled IOI model by faithfulness at fixed circuit sizes,
  MIB's CPR and CMD, and cost; and their cost of verification (``evaluate_edges``).

Usage: python benchmarks/bench_edges.py [--repeats 5] [--ig-steps 5] [--tl4 | --demo]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import atp_plugin
from atp_plugin import metrics
from atp_plugin.edges import attribute_edges

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_times  # noqa: E402

N_PAIRS, N_TOKENS, D_VOCAB = 16, 24, 1000  # as bench_atp.py, which needs HookedTransformer to import


def task(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random pairs of random tokens, a quarter of the positions changed, and answer / wrong ids."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, D_VOCAB, (N_PAIRS, N_TOKENS), generator=g)
    corrupt = torch.where(torch.rand(N_PAIRS, N_TOKENS, generator=g) < 0.25,
                          torch.randint(0, D_VOCAB, (N_PAIRS, N_TOKENS), generator=g), clean)
    answer, wrong = torch.randint(0, D_VOCAB, (2, N_PAIRS), generator=g)
    return clean, corrupt, answer, wrong


def forward_backward(model, clean: torch.Tensor, metric) -> None:
    """One forward + backward of the summed metric to the residual entering layer 0."""
    idx = torch.arange(clean.shape[0])
    resid: dict[str, torch.Tensor] = {}

    def leaf(x, hook):
        resid["x"] = x.detach().requires_grad_(True)
        return resid["x"]

    logits = model.run_with_hooks(clean, fwd_hooks=[("blocks.0.hook_resid_pre", leaf)])
    torch.autograd.grad(metric(logits, idx).sum(), resid["x"])


def hooked_rows(repeats: int, steps: int) -> list[tuple[str, float]]:
    from bench_atp import NODES, build_model
    model = build_model()
    clean, corrupt, answer, wrong = task()
    metric = metrics.logit_diff(answer, wrong)
    n_edges = attribute_edges(model, clean[:1], corrupt[:1], metrics.logit_diff(answer[:1], wrong[:1])).graph.n_edges

    def edges(method: str):
        return lambda: attribute_edges(model, clean, corrupt, metric, method=method, ig_steps=steps,
                                       per_position=True, batch_size=N_PAIRS, progress=False)

    fns = {"one forward + backward": lambda: forward_backward(model, clean, metric),
           "node atp+qk (q, k, v, z, neurons)": lambda: atp_plugin.attribute(
               model, clean, corrupt, metric, nodes=NODES, method="atp+qk", batch_size=N_PAIRS, progress=False),
           f"edges atp ({n_edges} edges x {N_TOKENS} positions)": edges("atp"),
           "edges atp+qk": edges("atp+qk"),
           f"edges ig ({steps} steps)": edges("ig")}
    times = interleaved_times(fns, repeats)
    names = list(times)
    rows = [(name, times[name]) for name in names]
    rows += [("edges atp / node atp+qk", times[names[2]] / times[names[1]]),
             ("edges atp+qk / node atp+qk (target <= 1.5)", times[names[3]] / times[names[1]]),
             (f"edges ig / one forward + backward (target <= {steps + 1})", times[names[4]] / times[names[0]])]
    return rows


def tl4_rows(repeats: int) -> list[tuple[str, float]]:
    """TransformerLens 4.3's edge EAP and ours on one Bridge (a GPT-2 with the benchmark's sizes)."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=6, n_embd=256, n_head=8, n_inner=1024, vocab_size=1000, n_positions=64)
    path = Path(tempfile.mkdtemp()) / "bench-gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    bridge = TransformerBridge.boot_transformers(str(path), hf_model=transformers.GPT2LMHeadModel.from_pretrained(path),
                                                 tokenizer=None)
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    clean, corrupt, answer, wrong = task()
    metric = metrics.logit_diff(answer, wrong)
    ours = lambda: attribute_edges(bridge, clean, corrupt, metric, per_position=True, batch_size=N_PAIRS,  # noqa: E731
                                   progress=False)
    one = [0]

    def theirs():  # one pair per call of TransformerLens's per-pair loop, its metric a scalar of one prompt's logits
        i = one[0] % N_PAIRS
        one[0] += 1
        attribution_patch(bridge, clean[i:i + 1], corrupt[i:i + 1],
                          lambda logits: logits[0, -1, answer[i]] - logits[0, -1, wrong[i]],
                          EdgeAttributionConfig(granularity="edge"))

    times = interleaved_times({"ours, 16 pairs": ours, "TransformerLens 4.3, 1 pair": theirs}, repeats)
    per_pair = times["TransformerLens 4.3, 1 pair"]
    return [("edges atp on a Bridge, 16 pairs (ours)", times["ours, 16 pairs"]),
            ("TransformerLens 4.3 edge EAP, 16 pairs (1 pair timed x 16)", 16 * per_pair),
            ("TransformerLens 4.3 / ours", 16 * per_pair / times["ours, 16 pairs"])]


def demo_rows(n_pairs: int = 32) -> list[tuple[str, ...]]:
    """The bundled IOI model: each edge method's faithfulness at fixed circuit sizes (top N, pruned),
    MIB's CPR / CMD, its cost in passes of one prompt, and the exact effect of its top edge."""
    from atp_plugin.commands.usage import demo_task
    from atp_plugin.edges import faithfulness_curve, faithfulness_of, top_circuit
    model, pairs, metric = demo_task(n_pairs, 0)
    rows = [("method", "f(top 20)", "f(top 40)", "f(top 80)", "CPR", "CMD", "forward", "backward", "seconds")]
    for method, steps in (("atp", 1), ("atp+qk", 1), ("ig", 5), ("ig", 10)):
        start = time.perf_counter()
        result = attribute_edges(model, pairs.clean, pairs.corrupt, metric, method=method, ig_steps=steps,
                                 progress=False)
        seconds = time.perf_counter() - start
        f = faithfulness_of(result, [top_circuit(result, n) for n in (20, 40, 80)])
        curve = faithfulness_curve(result)
        name = f"ig ({steps} steps)" if method == "ig" else method
        rows.append((name, *(f"{v:.3f}" for v in f), f"{curve.cpr:.3f}", f"{curve.cmd:.3f}",
                     str(result.forward_passes), str(result.backward_passes), f"{seconds:.2f}"))
    return rows


def verification_rows(n_pairs: int = 16) -> list[tuple[str, ...]]:
    """Cost of verification on the bundled IOI model: forward passes of one prompt (a backward pass
    counting 2) to have verified the true top-x edges by exhaustive edge patching."""
    from atp_plugin.commands.usage import demo_task
    from atp_plugin.edges import evaluate_edges
    model, pairs, metric = demo_task(n_pairs, 0)
    curves, truth = evaluate_edges(model, pairs.clean, pairs.corrupt, metric, methods=("atp", "atp+qk", "ig"),
                                   ig_steps=5, top_x=20)
    ig10, _ = evaluate_edges(model, pairs.clean, pairs.corrupt, metric, methods=("ig",), ig_steps=10, top_x=20)
    columns = [curves["atp"], curves["atp+qk"], curves["ig"], ig10["ig"], curves["oracle"]]
    rows = [("true top-x found", "atp", "atp+qk", "ig (5 steps)", "ig (10 steps)", "oracle")]
    for x in (0, 1, 5, 10, 15, 20):
        rows.append((str(x) if x else "0 (own cost)", *(f"{c.loc[x]:,.0f}" for c in columns)))
    rows.append((f"exhaustive: {truth.forward_passes:,}", "", "", "", "", ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--tl4", action="store_true", help="time TransformerLens 4.3's edge EAP instead (needs TL 4.3)")
    parser.add_argument("--demo", action="store_true", help="compare the edge methods on the bundled IOI model instead")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.demo:
        for rows in (demo_rows(), verification_rows()):
            print("| " + " | ".join(rows[0]) + " |\n|---|" + "---:|" * (len(rows[0]) - 1))
            for row in rows[1:]:
                print("| " + " | ".join(row) + " |")
            print()
        return
    rows = tl4_rows(args.repeats) if args.tl4 else hooked_rows(args.repeats, args.ig_steps)
    print("| what | seconds or ratio |\n|---|---:|")
    for what, value in rows:
        print(f"| {what} | {value:.3f} |")


if __name__ == "__main__":
    main()
