"""Speed benchmark: AtP, AtP+QK fix and AtP* against the forward/backward floor, naive GradDrop and
exhaustive activation patching, on one random model in one process.

Model: 6 layers, d_model 256, 8 heads of d_head 32, d_mlp 1024, LayerNorm, GELU, float32, random
weights, d_vocab 1000. Batch: 16 prompt pairs of 24 tokens. Nodes: attn_q, attn_k, attn_v, attn_z,
mlp_neurons (every layer, every position). Times are medians of ``--repeats`` runs after one
warm-up, once per ``torch.set_num_threads`` value in ``--threads`` (1 and 2 by default).

- floor: one no-grad forward of the clean prompts plus one forward + backward of the summed metric
  to the residual stream entering layer 0 (``blocks.0.hook_resid_pre``; gradients reach no
  parameter): the least any gradient-based attribution can cost.
- atp, atp+qk, atp*: ``atp_plugin.attribute(...)`` end to end.
- naive GradDrop: for each of the L layers one full forward + backward with that layer's attention
  and MLP outputs detached, gradients taken at every node site (the estimates' arithmetic not
  included, so this baseline is flattered). ``atp*`` is compared with naive GradDrop + floor (the
  plain AtP pass a naive implementation also needs).
- exhaustive patching with ``transformer_lens.patching``: ``get_act_patch_attn_head_out_by_pos``
  (one patched forward of the batch per (layer, pos, head)) is timed; q, k, v by position and
  neurons by position are EXTRAPOLATED from its time per patched forward.

Usage: python benchmarks/bench_atp.py [--repeats 5] [--threads 1 2] [--out docs/benchmark.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, patching

import atp_plugin
from atp_plugin import metrics
from random_inputs import random_model, random_pairs  # this script's folder is on sys.path
from timing import interleaved_times  # this script's folder is on sys.path

REPO_ROOT = Path(__file__).resolve().parent.parent
NODES = ["attn_q", "attn_k", "attn_v", "attn_z", "mlp_neurons"]
SITES = ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "mlp.hook_post"]
N_PAIRS, N_TOKENS, D_VOCAB = 16, 24, 1000
TARGETS = {"atp / floor": 1.3, "atp+qk / atp": 1.2, "atp* / (naive GradDrop + floor)": 0.6}


def build_model(seed: int = 0) -> HookedTransformer:
    """The benchmark model: random float32 weights (attention logits scaled up so patterns are
    not uniform, as in a trained model)."""
    return random_model(n_layers=6, d_model=256, n_heads=8, d_mlp=1024, d_vocab=D_VOCAB, n_ctx=64, seed=seed)


def make_task(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """16 token-aligned pairs of 24 tokens (corrupt differs at about a quarter of the positions)
    and per-pair answer / wrong token ids."""
    g = torch.Generator().manual_seed(seed)
    clean, corrupt = random_pairs(N_PAIRS, N_TOKENS, D_VOCAB, g)
    answer, wrong = torch.randint(0, D_VOCAB, (2, N_PAIRS), generator=g)
    return clean, corrupt, answer, wrong


def floor(model: HookedTransformer, clean: torch.Tensor, metric) -> None:
    """One no-grad forward, then one forward + backward of the summed metric to the residual
    stream entering layer 0."""
    idx = torch.arange(clean.shape[0])
    with torch.no_grad():
        model(clean)
    resid: dict[str, torch.Tensor] = {}

    def leaf(x: torch.Tensor, hook) -> torch.Tensor:
        resid["x"] = x.detach().requires_grad_(True)
        return resid["x"]

    logits = model.run_with_hooks(clean, fwd_hooks=[("blocks.0.hook_resid_pre", leaf)])
    torch.autograd.grad(metric(logits, idx).sum(), resid["x"])


def naive_graddrop(model: HookedTransformer, clean: torch.Tensor, metric) -> None:
    """L forward + backward passes, pass l with layer l's attention and MLP outputs detached;
    gradients at every node site of every layer."""
    idx = torch.arange(clean.shape[0])
    names = [f"blocks.{layer}.{site}" for layer in range(model.cfg.n_layers) for site in SITES]
    for cut in range(model.cfg.n_layers):
        acts: dict[str, torch.Tensor] = {}

        def keep(x: torch.Tensor, hook, acts: dict[str, torch.Tensor] = acts) -> torch.Tensor:
            acts[hook.name] = x
            return x

        hooks = [(name, keep) for name in names]
        hooks += [(f"blocks.{cut}.hook_attn_out", lambda x, hook: x.detach()),
                  (f"blocks.{cut}.hook_mlp_out", lambda x, hook: x.detach())]
        logits = model.run_with_hooks(clean, fwd_hooks=hooks)
        torch.autograd.grad(metric(logits, idx).sum(), [acts[n] for n in names], allow_unused=True)


def exhaustive_head_out(model: HookedTransformer, clean: torch.Tensor, corrupt: torch.Tensor, metric) -> int:
    """TransformerLens's head-output-by-position patching (corrupt activations patched into the clean
    run, as attribute() does); returns the number of patched forward passes."""
    idx = torch.arange(clean.shape[0])
    _, corrupt_cache = model.run_with_cache(corrupt)
    with torch.no_grad():
        out = patching.get_act_patch_attn_head_out_by_pos(model, clean, corrupt_cache,
                                                          lambda logits: metric(logits, idx).mean())
    return out.numel()


def measure(model: HookedTransformer, clean: torch.Tensor, corrupt: torch.Tensor, metric, repeats: int
            ) -> dict[str, float]:
    """Median wall times (s) of everything in the table, at the current thread count."""
    def attribute(method: str) -> Callable[[], object]:
        return lambda: atp_plugin.attribute(model, clean, corrupt, metric, nodes=NODES, method=method,
                                            batch_size=N_PAIRS, progress=False)

    fns = {"floor": lambda: floor(model, clean, metric)}
    fns.update({method: attribute(method) for method in ("atp", "atp+qk", "atp*")})
    fns["naive GradDrop"] = lambda: naive_graddrop(model, clean, metric)
    times = interleaved_times(fns, repeats)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # transformer_lens's progress bar
        runs = exhaustive_head_out(model, clean, corrupt, metric)
    times["patching head out"] = time.perf_counter() - start
    times["per patched run"] = times["patching head out"] / runs
    return times


def table(model: HookedTransformer, times: dict[int, dict[str, float]]
          ) -> tuple[list[tuple[str, list[str], str]], list[tuple[str, list[float], float | None]]]:
    """Rows (what, seconds per thread count, note) and ratios (name, value per thread count, target)."""
    L, n_heads, d_mlp = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_mlp
    head_runs = L * N_TOKENS * n_heads
    extrapolated = {"q, k, v by pos": 3 * L * N_TOKENS * n_heads, "neurons by pos": L * N_TOKENS * d_mlp}
    cols = list(times.values())
    rows = [("floor: no-grad fwd + fwd/bwd", [f"{t['floor']:.3f}" for t in cols], "measured")]
    rows += [(m, [f"{t[m]:.3f}" for t in cols], "measured, atp_plugin.attribute") for m in ("atp", "atp+qk", "atp*")]
    rows += [(f"naive GradDrop: {L} fwd/bwd", [f"{t['naive GradDrop']:.3f}" for t in cols], "measured"),
             (f"patching: attn head out by pos, {head_runs} runs", [f"{t['patching head out']:.1f}" for t in cols],
              "measured, transformer_lens.patching; per run: "
              + ", ".join(f"{t['per patched run'] * 1e3:.1f} ms" for t in cols))]
    for what, n in extrapolated.items():
        rows.append((f"patching: {what}, {n} runs", [f"{n * t['per patched run']:.0f}" for t in cols],
                     "EXTRAPOLATED from the head-out time per run"))
    total = [t["patching head out"] + sum(extrapolated.values()) * t["per patched run"] for t in cols]
    rows.append(("patching: all five node types", [f"{x:.0f}" for x in total], "EXTRAPOLATED"))
    ratios = [("atp / floor", [t["atp"] / t["floor"] for t in cols], TARGETS["atp / floor"]),
              ("atp+qk / atp", [t["atp+qk"] / t["atp"] for t in cols], TARGETS["atp+qk / atp"]),
              ("atp* / (naive GradDrop + floor)", [t["atp*"] / (t["naive GradDrop"] + t["floor"]) for t in cols],
               TARGETS["atp* / (naive GradDrop + floor)"]),
              ("exhaustive patching / atp* (speed-up)", [x / t["atp*"] for x, t in zip(total, cols)], None)]
    return rows, ratios


def markdown(threads: list[int], rows, ratios, setup: str) -> str:
    heads = [f"{n} thread{'s' if n > 1 else ''} (s)" for n in threads]
    lines = ["# Speed benchmark", "", "`python benchmarks/bench_atp.py` (this file is its output).", "", setup, "",
             "| what | " + " | ".join(heads) + " | note |", "|---|" + "---:|" * len(heads) + "---|"]
    lines += [f"| {what} | " + " | ".join(secs) + f" | {note} |" for what, secs, note in rows]
    lines += ["", "| ratio | " + " | ".join(h.replace(" (s)", "") for h in heads) + " | target |",
              "|---|" + "---:|" * len(heads) + "---|"]
    for name, values, target in ratios:
        cells = [f"{v:.2f}" + ("" if target is None else (" (met)" if v <= target else " (MISSED)")) for v in values]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'-' if target is None else f'<= {target}'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement, median taken (default 5)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch.set_num_threads values, one column each (default 1 2)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "benchmark.md",
                        help="where to write the markdown table (default docs/benchmark.md)")
    args = parser.parse_args()

    model = build_model()
    clean, corrupt, answer, wrong = make_task()
    metric = metrics.logit_diff(answer, wrong)
    times: dict[int, dict[str, float]] = {}
    for n in args.threads:
        torch.set_num_threads(n)
        times[n] = measure(model, clean, corrupt, metric, args.repeats)
        print(f"{n} thread(s): " + ", ".join(f"{k} {v:.3f}s" for k, v in times[n].items()), flush=True)
    rows, ratios = table(model, times)

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    setup = (f"Model: 6 layers, d_model 256, 8 heads x d_head 32, d_mlp 1024, LN, GELU, float32, random weights, "
             f"d_vocab {D_VOCAB}. Batch: {N_PAIRS} pairs x {N_TOKENS} tokens. Nodes: {', '.join(NODES)}. "
             f"torch {torch.__version__} on {os.cpu_count()} CPUs (load average {load} at the end); threads set with "
             f"torch.set_num_threads. Times: median of {args.repeats} interleaved rounds after a warm-up (patching: "
             "one run). Floor backward: to blocks.0.hook_resid_pre, no parameter gradients.")
    print(setup)
    width = max(len(r[0]) for r in rows + ratios)
    print(f"{'':<{width}}  " + "  ".join(f"{str(n) + ' thr':>9}" for n in args.threads))
    for what, secs, note in rows:
        print(f"{what:<{width}}  " + "  ".join(f"{x:>9}" for x in secs) + f"  {note}")
    for name, values, target in ratios:
        print(f"{name:<{width}}  " + "  ".join(f"{v:9.2f}" for v in values)
              + ("" if target is None else f"  target <= {target}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(args.threads, rows, ratios, setup))
    print(f"table: {args.out}")


if __name__ == "__main__":
    main()
