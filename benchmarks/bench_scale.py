"""Scale benchmark: AtP, AtP+QK fix and AtP* on the GPT-2-small shape
at long contexts, time and peak memory against the forward/backward floor; ``verify(10)``'s time
and added peak; and (``--low-precision``) bfloat16 / float16 scores against float32.

Model: 12 layers, d_model 768, 12 heads x d_head 64, d_mlp 3072, d_vocab 50257, LayerNorm, GELU,
float32, random weights (W_Q, W_K doubled so attention is not uniform, as in bench_atp.py), built
with HookedTransformerConfig (nothing downloaded). Pairs: ``--pairs`` random token pairs of T tokens
(corrupt differs at a quarter of the positions). Metric: logit difference of two fixed tokens at
the last position (``metrics.logit_diff``). Nodes: attn_q, attn_k, attn_v, attn_z, mlp_neurons.

Every measurement runs in a fresh subprocess (this script with ``--child``), one per (T, what):
- floor: one no-grad forward of the clean prompts plus one forward + backward of the summed metric
  to ``blocks.0.hook_resid_pre`` (bench_atp.floor);
- atp, atp+qk, atp*: ``atp_plugin.attribute(...)`` end to end, all pairs in one batch;
- naive GradDrop: bench_atp.naive_graddrop, L forward + backward passes, one per dropped layer
  (atp*'s time target is <= 0.6x naive GradDrop + floor);
- verify: ``attribute(method="atp")`` then ``result.verify(10)`` in one process;
- with ``--edges`` instead: edges atp, edges atp+qk: ``atp_plugin.attribute_edges(...)`` with
  ``per_position=True`` (every edge at every position), all pairs in one batch.
A child first runs its job once on 16-token prompts (one-time costs; negligible memory), then
``--repeats`` times at T (median CPU time, time.process_time: with one torch thread it is the
work done, little disturbed by other jobs on the machine; wall time is reported beside it).
Peak = the child's VmHWM from /proc/self/status, the whole process (interpreter, torch, model,
run), nothing subtracted; ratios divide by the floor child's. For verify, the peak is reset
(``/proc/self/clear_refs``) after ``attribute()``: "added" is verify's own peak minus the
resident memory it started from.

Usage:
  python benchmarks/bench_scale.py [--T 128 512] [--pairs 1] [--repeats N] [--threads 1]
      [--device cpu] [--out docs/benchmark_scale.md --section NAME]
  python benchmarks/bench_scale.py --low-precision [--out docs/benchmark_scale.md --section low-precision]
  python benchmarks/bench_scale.py --edges --T 512 [--out docs/benchmark_scale.md --section edges]
With ``--out``, the markdown (command, date, code measured, table) replaces the part of the file
between ``<!-- bench_scale:NAME -->`` and ``<!-- /bench_scale:NAME -->`` (appended if absent).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

import atp_plugin
from atp_plugin import metrics, plugins
from atp_plugin.adapters import resolve
from atp_plugin.edges import attribute_edges
from atp_plugin.estimate import PROBE_LENGTHS, node_probe, profile
from bench_atp import build_model as build_bench_model  # this script's folder is on sys.path
from bench_atp import floor, make_task, naive_graddrop
from random_inputs import random_model, random_pairs  # this script's folder is on sys.path
from timing import peak_kb, status_kb, write_section

REPO_ROOT = Path(__file__).resolve().parent.parent
NODES = ["attn_q", "attn_k", "attn_v", "attn_z", "mlp_neurons"]
METHODS = ("atp", "atp+qk", "atp*")
EDGE_METHODS = ("edges atp", "edges atp+qk")  # attribute_edges, every edge at every position (--edges)
NAIVE = "naive GradDrop"  # bench_atp.naive_graddrop: L forward/backward passes, one per dropped layer
D_VOCAB, WARMUP_T = 50257, 16
ANSWER, WRONG = 318, 373  # the two fixed tokens of the metric
Results = dict[str, dict[str, float]]  # what ("floor", a method, "verify") -> its child's answer
LOW_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TOP_K = 50


def build_model(seed: int = 0) -> HookedTransformer:
    """GPT-2-small shape with random float32 weights (W_Q, W_K doubled)."""
    return random_model(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, d_vocab=D_VOCAB, n_ctx=1024, seed=seed)


def make_pairs(n: int, t: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` token-aligned pairs of ``t`` tokens; corrupt differs at about a quarter of the positions."""
    return random_pairs(n, t, D_VOCAB, torch.Generator().manual_seed(seed))


def job(model: HookedTransformer, what: str, n_pairs: int, t: int) -> Callable[[], object]:
    """The work measured as ``what`` (floor or a method) on ``n_pairs`` pairs of ``t`` tokens."""
    clean, corrupt = make_pairs(n_pairs, t)
    metric = metrics.logit_diff(torch.full((n_pairs,), ANSWER), torch.full((n_pairs,), WRONG))
    if what == "floor":
        return lambda: floor(model, clean, metric)
    if what == NAIVE:
        return lambda: naive_graddrop(model, clean, metric)
    if what in EDGE_METHODS:
        return lambda: attribute_edges(model, clean, corrupt, metric, method=what.split()[1], batch_size=n_pairs,
                                       per_position=True, progress=False)
    return lambda: atp_plugin.attribute(model, clean, corrupt, metric, nodes=NODES, method=what,
                                        batch_size=n_pairs, progress=False)


def child(what: str, n_pairs: int, t: int, repeats: int) -> dict[str, float]:
    """Run in a fresh process: CPU time (``seconds``) and wall time (``wall``), medians of
    ``repeats`` runs, and peak of ``what`` at T=``t``; for ``verify``, attribute with atp, then
    verify(10): its time, the peak before it, the resident memory at its start and its own peak
    (VmHWM reset after attribute())."""
    model = build_model()
    out: dict[str, float] = {"model_kb": status_kb("VmRSS")}
    if what == "verify":
        job(model, "atp", n_pairs, WARMUP_T)().verify(10)
        result = job(model, "atp", n_pairs, t)()
        out["before_kb"] = peak_kb()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current VmRSS
        out["start_kb"] = status_kb("VmRSS")
        wall, cpu = time.perf_counter(), time.process_time()
        result.verify(10)
        out["wall"], out["seconds"] = time.perf_counter() - wall, time.process_time() - cpu
        out["peak_kb"] = peak_kb()
        return out
    job(model, what, n_pairs, WARMUP_T)()
    run = job(model, what, n_pairs, t)
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    out["wall"], out["seconds"] = statistics.median(walls), statistics.median(cpus)
    out["peak_kb"] = peak_kb()
    if what in METHODS:  # after the measurement: the estimate's probes do not touch its peak
        out["estimate_kb"] = atp_plugin.estimate(model, t, NODES, what, batch_size=n_pairs).peak_bytes / 1024
    return out


def spawn(what: str, args: argparse.Namespace, t: int, repeats: int) -> dict[str, float]:
    """``child(...)`` in a fresh Python process; its JSON answer."""
    cmd = [sys.executable, __file__, "--child", what, "--T", str(t), "--pairs", str(args.pairs),
           "--repeats", str(repeats), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gb(kb: float) -> str:
    """kB as GB with two decimals."""
    return f"{kb / 2**20:.2f}"


def above(x: dict[str, float], fl: dict[str, float]) -> float:
    """(peak - resident memory after building the model) of ``x`` over the floor's: the runs' own memory."""
    return (x["peak_kb"] - x["model_kb"]) / (fl["peak_kb"] - fl["model_kb"])


def verify_added(v: dict[str, float]) -> float:
    """kB verify(10) added: its own peak minus the resident memory it started from."""
    return max(0.0, v["peak_kb"] - v["start_kb"])


#: the targets at one T: name -> (the ratio, from that T's results; its upper bound)
TARGETS: dict[str, tuple[Callable[[Results], float], float]] = {
    "atp+qk / atp time": (lambda r: r["atp+qk"]["seconds"] / r["atp"]["seconds"], 1.3),
    "atp+qk peak / floor peak": (lambda r: r["atp+qk"]["peak_kb"] / r["floor"]["peak_kb"], 1.3),
    "atp* peak / floor peak": (lambda r: r["atp*"]["peak_kb"] / r["floor"]["peak_kb"], 1.5),
    "atp* time / (naive GradDrop + floor)": (
        lambda r: r["atp*"]["seconds"] / (r[NAIVE]["seconds"] + r["floor"]["seconds"]), 0.6),
    "verify(10) added / floor peak": (lambda r: verify_added(r["verify"]) / r["floor"]["peak_kb"], 1.0),
    **{f"{m} estimate error": (lambda r, m=m: estimate_error(r[m]), 0.25) for m in METHODS},
}


def estimate_error(x: dict[str, float]) -> float:
    """|estimate() / measured - 1| for the peak above the model (its resident memory before the run)."""
    return abs(x["estimate_kb"] / (x["peak_kb"] - x["model_kb"]) - 1)


def scale_table(results: dict[int, Results], n_pairs: int) -> str:
    """Markdown: per T, times and peaks of floor and methods with ratios, verify, and the targets."""
    lines = ["| T | what | CPU time (s) | wall (s) | time / floor | peak (GB) | peak / floor peak "
             "| above the model: / floor's | above the model (GB): measured / estimate() |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t, r in results.items():
        fl = r["floor"]
        for what in ("floor", *METHODS, NAIVE):
            x = r[what]
            lines.append(f"| {t} | {what} | {x['seconds']:.2f} | {x['wall']:.2f} | "
                         f"{x['seconds'] / fl['seconds']:.2f} | "
                         f"{gb(x['peak_kb'])} | {x['peak_kb'] / fl['peak_kb']:.2f} | {above(x, fl):.2f} | "
                         f"{gb(x['peak_kb'] - x['model_kb'])} / "
                         f"{gb(x['estimate_kb']) if 'estimate_kb' in x else '-'} |")
        v = r["verify"]
        lines.append(f"| {t} | verify(10) after atp | {v['seconds']:.2f} | {v['wall']:.2f} | "
                     f"{v['seconds'] / fl['seconds']:.2f} | "
                     f"{gb(v['before_kb'])} before, {gb(max(v['before_kb'], v['peak_kb']))} after | "
                     f"{max(v['before_kb'], v['peak_kb']) / fl['peak_kb']:.2f} | - | - |")
    lines += ["", "| T | " + " | ".join(f"{name} (<= {bound})" for name, (_, bound) in TARGETS.items())
              + " | atp* / atp time | verify(10) added (GB) |", "|---:|" + "---:|" * (len(TARGETS) + 2)]
    for t, r in results.items():
        cells = [f"{ratio(r):.2f} ({'met' if ratio(r) <= bound else 'MISSED'})" for ratio, bound in TARGETS.values()]
        cells += [f"{r['atp*']['seconds'] / r['atp']['seconds']:.2f}", gb(verify_added(r["verify"]))]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    model_gb = statistics.median(x["model_kb"] for r in results.values() for x in r.values())
    lines += ["", f"{n_pairs} pair{'s' if n_pairs > 1 else ''} of T tokens per run. Times: CPU time of the process "
              "(time.process_time, one torch thread), which other jobs on the machine disturb far less than wall "
              "time; ratios and targets use it. Peaks are whole-process VmHWM "
              f"(each process holds about {gb(model_gb)} GB after building the model, before any run). "
              "verify: peak before = attribute(method='atp')'s; after = the larger of that and verify's own; "
              "added = verify's own peak minus the resident memory it started from. 'above the model': "
              "(peak - the process's resident memory after building the model) over the floor's, the runs' own "
              "memory without the interpreter, torch and the weights. estimate(): atp_plugin.estimate(model, T, nodes, "
              "method, batch_size) run in the same process after the measurement (its probes at T = 32, 64, 96); its "
              "error is |estimate / measured - 1| for the peak above the model."]
    return "\n".join(lines)


def edge_table(results: dict[int, Results], n_pairs: int) -> str:
    """Markdown: per T, the floor and the edge methods, time and peak (whole process, and above the model)."""
    lines = ["| T | what | CPU time (s) | wall (s) | time / floor | peak (GB) | above the model: / floor's |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for t, r in results.items():
        fl = r["floor"]
        for what in ("floor", *EDGE_METHODS):
            x = r[what]
            lines.append(f"| {t} | {what} | {x['seconds']:.2f} | {x['wall']:.2f} | {x['seconds'] / fl['seconds']:.2f} "
                         f"| {gb(x['peak_kb'])} | {above(x, fl):.2f} |")
    lines += ["", f"{n_pairs} pair{'s' if n_pairs > 1 else ''} of T tokens per run; attribute_edges(per_position=True) "
              "scores every edge of the graph at every position. Times and peaks as in the table above."]
    return "\n".join(lines)


def code_label() -> str:
    """Which atp_plugin was measured: the repository's HEAD (and whether atp_plugin/ differs from
    it), or the directory it was imported from when that is not this repository."""
    pkg = Path(atp_plugin.__file__).resolve().parent
    if pkg != REPO_ROOT / "atp_plugin":
        return f"atp_plugin imported from {pkg}"
    git = ["git", "-C", str(REPO_ROOT)]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "atp_plugin"], capture_output=True, text=True).stdout
    return f"commit {head}" + (" plus uncommitted changes to atp_plugin/" if dirty.strip() else "")


def fit_table(budget: float, lengths: list[int]) -> str:
    """Markdown: per method, by estimate()'s memory profile, the largest batch of pairs at each of
    ``lengths`` and the longest prompt of one pair (past the model's n_ctx, for a model of this
    shape with a longer context) whose peak fits ``budget`` bytes beside the loaded model."""
    model = build_model()
    room = budget - status_kb("VmRSS") * 1024  # what the process holds with the model loaded
    lines = ["| method | " + " | ".join(f"largest batch at T = {t}" for t in lengths)
             + " | longest T, one pair |", "|---|" + "---:|" * (len(lengths) + 1)]
    for method in METHODS:
        prof = profile(node_probe(model, resolve(NODES, plugins.adapters()), method), D_VOCAB, PROBE_LENGTHS)
        cells = [str(prof.largest_batch(t, room)) for t in lengths]
        longest = max((t for t in range(16, 65536, 16) if prof.peak(t, 1) <= room), default=0)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {longest} |")
    lines += ["", f"Budget {budget / 1e9:g} GB for the whole process: {room / 2**30:.2f} GiB left after building the "
              "model (interpreter, torch and weights). From estimate()'s memory profile (probes at T = 32, 64, 96, "
              "two batches of one and of two pairs), tensor memory only: the allocator's overhead comes on top "
              "(on this CPU the measured peaks above exceed the estimate by up to the error shown there). "
              "GPT-2's own context is 1024 tokens; the longest T is for a model of this shape with a longer one."]
    return "\n".join(lines)


def low_precision_table() -> str:
    """Markdown: relative L2 error and top-50 overlap of bfloat16 / float16 scores against float32
    on the bench_atp.py model and task, per method."""
    clean, corrupt, answer, wrong = make_task()
    metric = metrics.logit_diff(answer, wrong)

    def scores(model: HookedTransformer, method: str) -> torch.Tensor:
        result = atp_plugin.attribute(model, clean, corrupt, metric, nodes=NODES, method=method,
                                      batch_size=len(clean), progress=False)
        for key, s in result.scores.items():
            if s.dtype != torch.float32 or not torch.isfinite(s).all():
                raise AssertionError(f"{method} {key}: scores {s.dtype}, finite {bool(torch.isfinite(s).all())}")
        return torch.cat([result.scores[k].flatten() for k in sorted(result.scores)])

    reference = {m: scores(build_bench_model(), m) for m in METHODS}
    lines = ["| method | dtype | relative L2 error | top-50 overlap |", "|---|---|---:|---:|"]
    for name, dtype in LOW_DTYPES.items():
        model = build_bench_model().to(dtype)
        for method in METHODS:
            low, ref = scores(model, method), reference[method]
            err = float(torch.linalg.vector_norm(low - ref) / torch.linalg.vector_norm(ref))
            top = set(ref.topk(TOP_K).indices.tolist()) & set(low.topk(TOP_K).indices.tolist())
            lines.append(f"| {method} | {name} | {err:.4f} | {len(top) / TOP_K:.2f} |")
    lines += ["", f"bench_atp.py's model (6 layers, d_model 256, float32 weights cast with model.to(dtype)) and task "
              f"({len(clean)} pairs x {clean.shape[1]} tokens); nodes {', '.join(NODES)}, all positions, "
              f"{ref.numel()} scores per method. Error: ||s - s32|| / ||s32|| over all scores; overlap: "
              f"|top-{TOP_K}(s) & top-{TOP_K}(s32)| / {TOP_K}. Scores are float32 and finite in every run."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[128, 512],
                        help="prompt lengths (default 128 512; --T 1024 alone takes 10-20 min on 2 busy cores)")
    parser.add_argument("--pairs", type=int, default=1, help="prompt pairs per run (default 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per child, median taken (default 3 for T < 512, else 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every child (default 1)")
    parser.add_argument("--device", default="cpu", help="label of the machine in the table (default cpu; "
                                                         "the runs themselves are on CPU)")
    parser.add_argument("--fit", type=float, metavar="BYTES",
                        help="instead: by estimate(), the largest batch at each --T and the longest prompt of one "
                             "pair that fit in BYTES (e.g. 24e9) with the model loaded")
    parser.add_argument("--low-precision", action="store_true",
                        help="instead: bfloat16 / float16 against float32 on bench_atp.py's model")
    parser.add_argument("--edges", action="store_true",
                        help="instead: the floor and attribute_edges (atp, atp+qk) at each --T")
    parser.add_argument("--out", type=Path, help="markdown file to write the section into")
    parser.add_argument("--section", default="scale", help="section name in --out (default scale)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.child:
        print(json.dumps(child(args.child, args.pairs, args.T[0], args.repeats or 1)))
        return
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO_ROOT), *sys.argv[1:]])
    started = time.perf_counter()
    if args.fit:
        body = fit_table(args.fit, args.T)
    elif args.low_precision:
        body = low_precision_table()
    else:
        results: dict[int, Results] = {}
        for t in args.T:
            repeats = args.repeats or (3 if t < 512 else 1)
            results[t] = {}
            for what in ("floor", *EDGE_METHODS) if args.edges else ("floor", *METHODS, NAIVE, "verify"):
                results[t][what] = spawn(what, args, t, repeats)
                print(f"T={t} {what}: {results[t][what]}", flush=True)
        body = edge_table(results, args.pairs) if args.edges else scale_table(results, args.pairs)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    header = (f"`{command}` on {datetime.date.today().isoformat()}, {code_label()}; device {args.device}, "
              f"torch {torch.__version__}, {args.threads} thread(s) per process, {os.cpu_count()} CPUs "
              f"(load average {load} at the end); {time.perf_counter() - started:.0f} s in all.")
    text = header + "\n\n" + body
    print(text)
    if args.out:
        write_section(args.out, f"bench_scale:{args.section}", text)
        print(f"written: {args.out} (section {args.section})")


if __name__ == "__main__":
    main()
